"""Helpers for the forwarding tests: databases, PACS connections, archives, stored studies and fault peers.

`store_study` writes Study, Instance and Delivery rows straight through the
ORM, in one transaction, as the upload's transactional outbox does.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import AppConfig, load_config
from pacsbridge.connections import ConnectionKind, ConnectionSettings
from pacsbridge.db import (
    get_connection,
    get_or_create_organization,
    open_database,
    save_connection,
)
from pacsbridge.db.forwarding import (
    Archive,
    ArchiveLink,
    Delivery,
    DeliveryState,
    Instance,
    Study,
)
from pacsbridge.db.models import utc_now
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.files import inspect_file

TEST_TIMEOUT_SECONDS = 5.0


def open_test_database(data_dir: Path) -> tuple[AppConfig, sessionmaker[Session]]:
    config = load_config(data_dir, environ={})
    return config, open_database(config)


def add_pacs(session: Session, name: str, port: int, *, called_ae_title: str = "STORESCP", **changes: object) -> int:
    """Store a plain-DICOM PACS connection to 127.0.0.1:`port` with short timeouts, and return its id."""
    settings = ConnectionSettings(
        name=name,
        kind=ConnectionKind.PACS,
        host="127.0.0.1",
        port=port,
        calling_ae_title="PACSBRIDGE",
        called_ae_title=called_ae_title,
        acse_timeout=TEST_TIMEOUT_SECONDS,
        dimse_timeout=TEST_TIMEOUT_SECONDS,
        connection_timeout=TEST_TIMEOUT_SECONDS,
    ).replace(**changes)
    record, _ = save_connection(session, settings)
    return record.id


def add_archive(session: Session, name: str, connections: Sequence[str], *, is_test: bool = True) -> int:
    organization = get_or_create_organization(session)
    archive = Archive(organization_id=organization.id, name=name, is_test=is_test)
    session.add(archive)
    session.flush()
    for slot, connection_name in enumerate(connections, start=1):
        record = get_connection(session, connection_name)
        session.add(ArchiveLink(archive_id=archive.id, slot=slot, connection_id=record.id))
    session.flush()
    return archive.id


def write_instances(
    folder: Path, count: int, *, study_uid: str | None = None, pixel_bytes: int = 64 * 64
) -> list[Path]:
    """Write `count` Secondary Capture files of one study, each with `pixel_bytes` bytes of pixel data."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    columns = 64 if pixel_bytes <= 64 * 4096 else 1024
    rows = max(pixel_bytes // columns, 1)
    paths = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "PB-TEST-FWD"
        ds.PatientName = "Test^Forwarding"
        ds.Modality = "OT"
        ds.InstanceNumber = number
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes([number % 256]) * (rows * columns)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"instance-{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def store_study(
    session: Session, blobs: BlobStore, archive_name: str, paths: Sequence[Path], *, is_test: bool | None = None
) -> int:
    """Store the files as one study of the archive, with a queued delivery per linked PACS, and return the study id."""
    archive = session.scalars(select(Archive).where(Archive.name == archive_name)).one()
    files = [inspect_file(path) for path in paths]
    study_uid = str(_study_uid(paths[0]))
    now = utc_now()
    study = Study(
        organization_id=archive.organization_id,
        archive_id=archive.id,
        study_instance_uid=study_uid,
        is_test=archive.is_test if is_test is None else is_test,
        created_at=now,
    )
    session.add(study)
    session.flush()
    for file in files:
        sha256, size = blobs.put_file(file.path)
        instance = Instance(
            organization_id=archive.organization_id,
            study_id=study.id,
            sop_instance_uid=file.sop_instance_uid,
            sop_class_uid=file.sop_class_uid,
            transfer_syntax_uid=file.transfer_syntax_uid,
            number_of_frames=file.number_of_frames,
            blob_sha256=sha256,
            size=size,
            created_at=now,
        )
        session.add(instance)
        session.flush()
        for link in archive.links:
            session.add(
                Delivery(
                    instance_id=instance.id,
                    connection_id=link.connection_id,
                    study_id=study.id,
                    state=DeliveryState.QUEUED,
                    first_queued_at=now,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
    session.flush()
    return study.id


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def delivery_states(sessions: sessionmaker[Session]) -> dict[int, DeliveryState]:
    with sessions.begin() as session:
        return {row.id: row.state for row in session.scalars(select(Delivery)).all()}


# Fault peers ----------------------------------------------------------------

# PS3.8 9.3.1: PDU type byte, reserved byte, 4-byte big-endian length.
PDU_HEADER = struct.Struct(">BBL")
P_DATA_TF = 0x04
# A-ABORT from the service user (source 0), reason 0.
A_ABORT_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])


def _read_exact(sock: socket.socket, length: int) -> bytes | None:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _is_dataset_fragment(pdu_body: bytes) -> bool:
    # The first PDV item: 4-byte length, presentation context ID, message
    # control header. Bit 0 of that header is 1 for a command, 0 for a data set.
    return len(pdu_body) >= 6 and not pdu_body[5] & 0x01


@contextmanager
def dataset_fault_proxy(upstream_port: int, fault: str) -> Iterator[int]:
    """Relay DICOM to 127.0.0.1:`upstream_port` until the first data set fragment, then inject `fault`.

    `fault` is "abort" (send A-ABORT to the SCU and close both connections
    while the data set is still arriving) or "stop-reading" (keep the
    connection open but never read from the SCU again). Yields the proxy port.
    """
    assert fault in ("abort", "stop-reading")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()
    sockets: list[socket.socket] = []

    def pump_upstream(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass

    def relay(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=10)
        upstream.settimeout(None)
        sockets.extend([client, upstream])
        threading.Thread(target=pump_upstream, args=(upstream, client), daemon=True).start()
        try:
            while True:
                header = _read_exact(client, PDU_HEADER.size)
                if header is None:
                    return
                pdu_type, _, length = PDU_HEADER.unpack(header)
                body = _read_exact(client, length)
                if body is None:
                    return
                if pdu_type == P_DATA_TF and _is_dataset_fragment(body):
                    if fault == "abort":
                        client.sendall(A_ABORT_PDU)
                        client.close()
                        upstream.close()
                    else:
                        stop.wait()
                    return
                upstream.sendall(header + body)
        except OSError:
            return

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            client.settimeout(None)
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass
        listener.close()
