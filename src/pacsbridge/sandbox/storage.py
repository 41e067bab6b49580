"""A storage SCP of our own for the demo and for tests, built on pynetdicom.

It writes each received instance to a folder as a Part-10 file named after its
SOP Instance UID, exactly as received (no re-encoding), and can be set to
accept only some transfer syntaxes or to respond with a chosen status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

LOGGER = logging.getLogger(__name__)

UNCOMPRESSED_ONLY = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class SandboxStorageServer:
    """A storage SCP on a free loopback port that keeps what it receives in `folder`."""

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "PB-SANDBOX-PACS",
        host: str = "127.0.0.1",
        port: int = 0,
        transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
        status_for: Callable[[Dataset], int] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._status_for = status_for
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, list(transfer_syntaxes))
        # Retired ultrasound classes that older devices still write.
        for uid in ("1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3"):
            self._ae.add_supported_context(uid, list(transfer_syntaxes))
        self._server = None
        self._lock = threading.Lock()
        self.received: list[Path] = []

    def _on_store(self, event: evt.Event) -> int:
        status = self._status_for(event.dataset) if self._status_for else 0x0000
        if status not in (0x0000, 0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116):
            return status
        uid = event.request.AffectedSOPInstanceUID
        path = self.folder / f"{uid}.dcm"
        tmp = path.with_suffix(".part")
        with tmp.open("wb") as handle:
            handle.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(handle, event.file_meta, enforce_standard=True)
            handle.write(event.request.DataSet.getvalue())
        tmp.replace(path)
        with self._lock:
            self.received.append(path)
        LOGGER.info("sandbox storage SCP stored %s", uid)
        return status

    def start(self) -> SandboxStorageServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = self._server.server_address[1]
        LOGGER.info("sandbox storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> SandboxStorageServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
