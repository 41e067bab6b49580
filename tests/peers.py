"""Worklist peers for tests: DCMTK wlmscpfs processes and pynetdicom fake worklist SCPs.

Each peer listens on a free loopback port, and each wlmscpfs serves its own
temporary data folder.
"""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]

# The example worklist database that Debian's dcmtk package ships, one folder per AE title.
DCMTK_EXAMPLE_WORKLISTS = Path("/usr/share/doc/dcmtk/examples/wlistdb/OFFIS")

FindHandler = Callable[[evt.Event], Iterator[tuple[int, Dataset | None]]]


def require_dcmtk(*tools: str) -> None:
    """Skip the calling test unless every DCMTK tool in `tools` is on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package dcmtk)")


def make_worklist_folder(root: Path, ae_title: str) -> Path:
    """Create the folder wlmscpfs serves for `ae_title`, with the lockfile it requires."""
    folder = root / ae_title
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lockfile").touch()
    return folder


def write_worklist_file(item: Dataset, path: Path) -> Path:
    """Write `item` as a DICOM file that wlmscpfs reads as one worklist entry."""
    item = item.copy()
    meta = FileMetaDataset()
    # A worklist file has no SOP class of its own, so the MWL FIND model is used as a placeholder.
    meta.MediaStorageSOPClassUID = ModalityWorklistInformationFind
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    item.file_meta = meta
    item.save_as(path, enforce_file_format=True)
    return path


def convert_dump(dump: Path, target: Path) -> Path:
    """Convert a DCMTK dump file (plain or gzipped) into a worklist file with dump2dcm."""
    source = dump
    if dump.suffix == ".gz":
        source = target.with_suffix(".dump")
        source.write_bytes(gzip.decompress(dump.read_bytes()))
    subprocess.run(
        ["dump2dcm", "--write-xfer-little", str(source), str(target)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return target


def copy_dcmtk_examples(folder: Path) -> list[Path]:
    """Convert DCMTK's example worklist dumps into `folder`; skip the test when they are missing."""
    dumps = sorted(DCMTK_EXAMPLE_WORKLISTS.glob("*.dump")) + sorted(DCMTK_EXAMPLE_WORKLISTS.glob("*.dump.gz"))
    if not dumps:
        pytest.skip(f"DCMTK's example worklists are not installed in {DCMTK_EXAMPLE_WORKLISTS}")
    return [convert_dump(dump, folder / (dump.name.split(".")[0] + ".wl")) for dump in dumps]


@contextmanager
def wlmscpfs(data_root: Path, *options: str) -> Iterator[int]:
    """Run DCMTK wlmscpfs in single-process mode on a free port serving `data_root`; yield the port.

    `data_root` contains one folder per called AE title (see `make_worklist_folder`).
    """
    require_dcmtk("wlmscpfs")
    port = free_port()
    process = subprocess.Popen(
        ["wlmscpfs", "--single-process", "--data-files-path", str(data_root), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def fake_worklist_scp(on_find: FindHandler, *, ae_title: str = "FAKEMWL") -> Iterator[int]:
    """Run a pynetdicom worklist SCP whose C-FIND responses come from `on_find`; yield its port.

    Only Explicit VR Little Endian is accepted, so identifiers built by
    `raw_identifier` reach the peer byte for byte.
    """
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(ModalityWorklistInformationFind, [ExplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def raw_identifier(item: Dataset, sent_character_set: str | None) -> Dataset:
    """Encode `item` with its own character set, then replace the Specific Character Set on the wire.

    The returned dataset contains raw elements, so pynetdicom sends the text bytes
    unchanged next to `sent_character_set` (None drops the element). This is
    how a server with a misspelled or missing character set behaves.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, item)
    encoded = buffer.getvalue()

    original = _character_set_element(item.SpecificCharacterSet)
    if original not in encoded:
        raise ValueError("the Specific Character Set element was not found in the encoded item")
    replacement = b"" if sent_character_set is None else _character_set_element(sent_character_set)
    return read_dataset(io.BytesIO(encoded.replace(original, replacement, 1)), False, True)


def _character_set_element(value: str | list[str]) -> bytes:
    text = value if isinstance(value, str) else "\\".join(value)
    payload = text.encode("ascii")
    if len(payload) % 2:
        payload += b" "
    return struct.pack("<HH", 0x0008, 0x0005) + b"CS" + struct.pack("<H", len(payload)) + payload
