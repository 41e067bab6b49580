"""pynetdicom peers for behaviour that real DICOM software does not produce on demand."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@contextmanager
def storage_peer(
    *,
    ae_title: str = "FAKEPACS",
    require_called_aet: bool = False,
    transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
    status_for: Callable[[Dataset], int] = lambda ds: 0x0000,
    received: list[Dataset] | None = None,
) -> Iterator[int]:
    """Run a pynetdicom storage SCP on a free port and yield the port."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(Verification)
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(transfer_syntaxes))

    def on_store(event: evt.Event) -> int:
        if received is not None:
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(ds)
        return status_for(event.dataset)

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


@contextmanager
def silent_peer() -> Iterator[int]:
    """Accept TCP connections and never respond, like a service that hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        listener.close()
