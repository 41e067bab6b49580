"""Upload into an archive on a SQLite file: per-file results, the transactional outbox, blobs and resend."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conftest import SAMPLES, ULTRASOUND_SAMPLES
from pacsbridge.config import load_config
from pacsbridge.connections import ConnectionKind, ConnectionSettings, TlsMode
from pacsbridge.db import close_database, open_database, save_connection
from pacsbridge.db.forwarding import (
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    InstanceState,
    Study,
)
from pacsbridge.ingest import upload as upload_module
from pacsbridge.ingest.archives import (
    ArchiveError,
    create_archive,
    link_pacs,
    resend_study,
    summarize_studies,
    unlink,
    unsecured_reason,
)
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.files import UnreadableFileError, inspect_file
from pacsbridge.ingest.testimages import write_test_study
from pacsbridge.ingest.upload import FileOutcome, UploadResult, upload_files

ACTOR = "test-admin"
# Ultrasound samples that carry the SOP Instance UID of another sample with other bytes:
# the first two of OBXXXX1A.dcm, the third of US-RGB-8-esopecho.dcm.
REENCODED_SAMPLES = ["OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm", "color-px.dcm"]
BROKEN_SAMPLES = [
    "no_meta.dcm",
    "MR_truncated.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    "3gb-bulk-data-truncated.dcm",
    "GH364.dcm",
]


# Helpers, also used by the other ingest and archive test modules ---------------


def add_pacs(
    session: Session, name: str, *, tls: TlsMode = TlsMode.ENCRYPTION_ONLY, test_only: bool = False
) -> None:
    settings = ConnectionSettings(
        name=name,
        kind=ConnectionKind.PACS,
        host="127.0.0.1",
        port=11112,
        calling_ae_title="POCUS01",
        called_ae_title="PACS",
        tls_mode=tls,
        test_only=test_only,
    )
    save_connection(session, settings)


def add_worklist(session: Session, name: str) -> None:
    settings = ConnectionSettings(
        name=name,
        kind=ConnectionKind.MWL,
        host="127.0.0.1",
        port=11113,
        calling_ae_title="POCUS01",
        called_ae_title="MWL",
    )
    save_connection(session, settings)


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def upload(sessions: sessionmaker[Session], blobs: BlobStore, archive: str, *paths: Path) -> UploadResult:
    with sessions.begin() as session:
        return upload_files(session, blobs, archive, list(paths), actor=ACTOR)


def deliveries_of(session: Session, sop_instance_uid: str) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery).join(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Delivery.id)
        )
    )


def changed_copy(source: Path, target: Path, **changes: str) -> Path:
    """Write `source` with some data elements changed (or removed when the value is None) to `target`."""
    dataset = dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(target)
    return target


# Fixtures ------------------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    factory = open_database(load_config(tmp_path / "data", environ={}))
    yield factory
    close_database(factory)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(load_config(tmp_path / "data", environ={}).blob_dir)


@pytest.fixture
def archive(sessions: sessionmaker[Session]) -> str:
    """An archive 'Cardiology' linked to two TLS connections, 'PACS A' (slot 1) and 'PACS B' (slot 2)."""
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)
        add_pacs(session, "PACS A")
        add_pacs(session, "PACS B")
        link_pacs(session, "Cardiology", "PACS A", actor=ACTOR)
        link_pacs(session, "Cardiology", "PACS B", actor=ACTOR)
    return "Cardiology"


@pytest.fixture
def test_study(tmp_path: Path) -> list[Path]:
    return write_test_study(tmp_path / "test-study")


# Accepted files --------------------------------------------------------------------


def test_upload_test_study_accepted(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    result = upload(sessions, blobs, archive, *test_study)

    assert [file.result for file in result.files] == [FileOutcome.ACCEPTED] * 3
    assert result.ok
    with sessions.begin() as session:
        study = session.scalars(select(Study)).one()
        assert study.is_test
        assert study.patient_id == "PB-TEST-0001"
        assert study.archive.name == archive
        assert len(study.instances) == 3
        assert count(session, Delivery) == 3 * 2


def test_upload_ultrasound_samples_accepted(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str
) -> None:
    unique = [SAMPLES / name for name in ULTRASOUND_SAMPLES if name not in REENCODED_SAMPLES]

    result = upload(sessions, blobs, archive, *unique)

    not_accepted = {file.path.name: file.reason for file in result.files if file.result != FileOutcome.ACCEPTED}
    assert not_accepted == {}
    with sessions.begin() as session:
        assert count(session, Instance) == len(unique)
        assert count(session, Delivery) == len(unique) * 2
        for delivery in session.scalars(select(Delivery)):
            assert delivery.state == DeliveryState.QUEUED
            assert delivery.study_id == delivery.instance.study_id
            assert delivery.attempts == 0
            assert delivery.next_attempt_at == delivery.first_queued_at


def test_upload_reencoded_samples_need_attention(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str
) -> None:
    # These samples are other encodings of a sample uploaded first, with the same SOP Instance UID.
    first = [SAMPLES / "OBXXXX1A.dcm", SAMPLES / "US-RGB-8-esopecho.dcm"]

    result = upload(sessions, blobs, archive, *first, *(SAMPLES / name for name in REENCODED_SAMPLES))

    outcomes = {file.path.name: file.result for file in result.files}
    assert outcomes == {
        "OBXXXX1A.dcm": FileOutcome.ACCEPTED,
        "US-RGB-8-esopecho.dcm": FileOutcome.ACCEPTED,
        **{name: FileOutcome.NEEDS_ATTENTION for name in REENCODED_SAMPLES},
    }
    with sessions.begin() as session:
        assert count(session, Delivery) == len(first) * 2


def test_upload_other_organization_is_separate(sessions: sessionmaker[Session], blobs: BlobStore) -> None:
    with sessions.begin() as session:
        for organization in ("clinic-1", "clinic-2"):
            create_archive(session, "Cardiology", organization=organization, actor=ACTOR)
    source = SAMPLES / "OBXXXX1A.dcm"

    outcomes = []
    for organization in ("clinic-1", "clinic-2"):
        with sessions.begin() as session:
            result = upload_files(session, blobs, "Cardiology", [source], organization=organization, actor=ACTOR)
        outcomes.append(result.files[0].result)

    assert outcomes == [FileOutcome.ACCEPTED, FileOutcome.ACCEPTED]
    with sessions.begin() as session:
        assert count(session, Study) == 2


def test_upload_normalizes_acr_nema_dates(sessions: sessionmaker[Session], blobs: BlobStore, archive: str) -> None:
    # ExplVR_BigEnd.dcm has Study Date '1997.04.24'.
    result = upload(sessions, blobs, archive, SAMPLES / "ExplVR_BigEnd.dcm")

    assert result.files[0].result == FileOutcome.ACCEPTED
    with sessions.begin() as session:
        assert session.scalars(select(Study.study_date)).one() == "19970424"


def test_upload_copies_study_attributes(sessions: sessionmaker[Session], blobs: BlobStore, archive: str) -> None:
    source = SAMPLES / "US1_UNCR.dcm"
    header = dcmread(source, stop_before_pixels=True)

    upload(sessions, blobs, archive, source)

    with sessions.begin() as session:
        study = session.scalars(select(Study)).one()
        assert study.study_instance_uid == header.StudyInstanceUID
        assert study.patient_name == str(header.PatientName)
        assert study.patient_id == header.PatientID
        assert study.study_date == header.StudyDate
        assert study.accession_number == (header.get("AccessionNumber") or None)
        assert not study.is_test


def test_upload_multiframe_records_frames(sessions: sessionmaker[Session], blobs: BlobStore, archive: str) -> None:
    upload(sessions, blobs, archive, SAMPLES / "OBXXXX1A_2frame.dcm")

    with sessions.begin() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.number_of_frames == 2


def test_upload_blobs_match_source_bytes(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study, SAMPLES / "US1_J2KR.dcm")

    with sessions.begin() as session:
        instances = {instance.sop_instance_uid: instance for instance in session.scalars(select(Instance))}
    for source in [*test_study, SAMPLES / "US1_J2KR.dcm"]:
        data = source.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        instance = instances[dcmread(source, stop_before_pixels=True).SOPInstanceUID]
        assert instance.blob_sha256 == sha256
        assert instance.size == len(data)
        assert blobs.open_path(sha256).name == sha256
        assert blobs.open_path(sha256).read_bytes() == data


def test_upload_folder_walks_files(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    result = upload(sessions, blobs, archive, test_study[0].parent)

    assert sorted(file.path for file in result.files) == sorted(test_study)
    assert result.ok


# Rejected files -------------------------------------------------------------------


def test_upload_rejects_broken_files_one_by_one(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    good = [SAMPLES / "US1_RLE.dcm", SAMPLES / "color-px.dcm"]
    broken = [SAMPLES / name for name in BROKEN_SAMPLES] + [text_file]

    result = upload(sessions, blobs, archive, good[0], *broken, good[1])

    by_path = {file.path: file for file in result.files}
    assert not result.ok
    for path in good:
        assert by_path[path].result == FileOutcome.ACCEPTED
    for path in broken:
        assert by_path[path].result == FileOutcome.REJECTED, path.name
        assert by_path[path].reason, path.name
        assert by_path[path].instance_id is None
    assert "not a DICOM Part-10 file" in by_path[text_file].reason
    assert "truncated" in by_path[SAMPLES / "MR_truncated.dcm"].reason
    assert by_path[SAMPLES / "MR_truncated.dcm"].reason.endswith("export it again from its source")
    with sessions.begin() as session:
        assert count(session, Instance) == len(good)
        assert count(session, Delivery) == len(good) * 2


def test_upload_rejects_file_without_study_uid(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    source = changed_copy(SAMPLES / "US1_UNCR.dcm", tmp_path / "no-study.dcm", StudyInstanceUID=None)

    result = upload(sessions, blobs, archive, source)

    assert result.files[0].result == FileOutcome.REJECTED
    assert "Study Instance UID (0020,000D)" in result.files[0].reason
    with sessions.begin() as session:
        assert count(session, Study) == 0
        assert count(session, Instance) == 0


def test_upload_rejects_too_long_attribute(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    source = changed_copy(SAMPLES / "US1_UNCR.dcm", tmp_path / "long.dcm", AccessionNumber="A" * 40)

    result = upload(sessions, blobs, archive, source)

    assert result.files[0].result == FileOutcome.REJECTED
    assert "Accession Number (0008,0050) has 40 characters" in result.files[0].reason


def test_upload_rejects_study_of_other_archive(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    with sessions.begin() as session:
        create_archive(session, "Radiology", actor=ACTOR)
    upload(sessions, blobs, archive, SAMPLES / "US1_UNCR.dcm")
    same_study = changed_copy(
        SAMPLES / "US1_UNCR.dcm", tmp_path / "other.dcm", SOPInstanceUID="1.2.826.0.1.3680043.8.498.1"
    )

    result = upload(sessions, blobs, "Radiology", same_study)

    assert result.files[0].result == FileOutcome.REJECTED
    assert "already stored in archive 'Cardiology'" in result.files[0].reason
    with sessions.begin() as session:
        assert count(session, Instance) == 1


def test_upload_unknown_archive_raises(sessions: sessionmaker[Session], blobs: BlobStore) -> None:
    from pacsbridge.ingest.archives import ArchiveNotFoundError

    with pytest.raises(ArchiveNotFoundError, match="archive 'Missing' not found"):
        upload(sessions, blobs, "Missing", SAMPLES / "US1_UNCR.dcm")


# Duplicates and conflicting versions ---------------------------------------------


def test_upload_same_file_twice_is_duplicate(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    first = upload(sessions, blobs, archive, *test_study)

    second = upload(sessions, blobs, archive, *test_study)

    assert [file.result for file in second.files] == [FileOutcome.DUPLICATE] * 3
    assert second.ok
    assert [file.instance_id for file in second.files] == [file.instance_id for file in first.files]
    with sessions.begin() as session:
        assert count(session, Instance) == 3
        assert count(session, Delivery) == 3 * 2


def test_upload_same_file_in_one_call_is_duplicate(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str
) -> None:
    source = SAMPLES / "US1_RLE.dcm"

    result = upload(sessions, blobs, archive, source, source)

    assert [file.result for file in result.files] == [FileOutcome.ACCEPTED, FileOutcome.DUPLICATE]
    with sessions.begin() as session:
        assert count(session, Delivery) == 2


def test_upload_changed_bytes_needs_attention(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    original = SAMPLES / "US1_UNCR.dcm"
    upload(sessions, blobs, archive, original)
    with sessions.begin() as session:
        stored = session.scalars(select(Instance)).one()
        stored_id, stored_sha = stored.id, stored.blob_sha256
    changed = changed_copy(original, tmp_path / "changed.dcm", SeriesDescription="edited after export")

    result = upload(sessions, blobs, archive, changed)

    file = result.files[0]
    assert file.result == FileOutcome.NEEDS_ATTENTION
    assert f"already stored as instance {stored_id}" in file.reason
    assert not result.ok
    with sessions.begin() as session:
        versions = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert len(versions) == 2
        assert (versions[0].id, versions[0].blob_sha256, versions[0].state) == (stored_id, stored_sha, InstanceState.OK)
        assert versions[1].state == InstanceState.NEEDS_ATTENTION
        assert f"instance {stored_id}" in versions[1].reason
        assert (
            f"stored version SHA-256 {stored_sha}, this file SHA-256 {versions[1].blob_sha256}" in versions[1].reason
        )
        assert versions[1].deliveries == []
        assert len(versions[0].deliveries) == 2
    assert blobs.open_path(stored_sha).read_bytes() == original.read_bytes()


def test_upload_changed_bytes_again_needs_attention(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    upload(sessions, blobs, archive, SAMPLES / "US1_UNCR.dcm")
    changed = changed_copy(SAMPLES / "US1_UNCR.dcm", tmp_path / "changed.dcm", SeriesDescription="edited")
    first = upload(sessions, blobs, archive, changed)

    second = upload(sessions, blobs, archive, changed)

    assert second.files[0].result == FileOutcome.NEEDS_ATTENTION
    assert second.files[0].instance_id == first.files[0].instance_id
    assert second.files[0].reason == first.files[0].reason
    with sessions.begin() as session:
        assert count(session, Instance) == 2


# Transactional outbox ----------------------------------------------------------------


def test_upload_failure_before_commit_stores_nothing(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    archive: str,
    test_study: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[int] = []

    def fail_on_second(session: Session, instance: Instance, study: Study, connections: list) -> list[Delivery]:
        created.append(instance.id)
        if len(created) == 2:
            raise RuntimeError("simulated crash between the instance insert and the commit")
        return original(session, instance, study, connections)

    original = upload_module.create_deliveries
    monkeypatch.setattr(upload_module, "create_deliveries", fail_on_second)

    with pytest.raises(RuntimeError, match="simulated crash"):
        upload(sessions, blobs, archive, *test_study)

    assert len(created) == 2
    with sessions.begin() as session:
        assert count(session, Study) == 0
        assert count(session, Instance) == 0
        assert count(session, Delivery) == 0
        assert session.scalars(select(AuditEvent).where(AuditEvent.action == "archive.upload")).all() == []


def test_upload_after_failure_stores_everything(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    archive: str,
    test_study: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: object) -> list[Delivery]:
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(upload_module, "create_deliveries", crash)
        with pytest.raises(RuntimeError):
            upload(sessions, blobs, archive, *test_study)

    result = upload(sessions, blobs, archive, *test_study)

    assert [file.result for file in result.files] == [FileOutcome.ACCEPTED] * 3
    with sessions.begin() as session:
        assert count(session, Delivery) == 3 * 2


def test_upload_deliveries_match_instances_and_links(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study, SAMPLES / "no_meta.dcm")

    with sessions.begin() as session:
        pairs = set(session.execute(select(Delivery.instance_id, Delivery.connection_id)).all())
        instance_ids = set(session.scalars(select(Instance.id)))
        link_ids = {link.connection_id for link in session.scalars(select(Study)).one().archive.links}
        assert pairs == {(instance, connection) for instance in instance_ids for connection in link_ids}


def test_upload_without_links_creates_no_deliveries(
    sessions: sessionmaker[Session], blobs: BlobStore, test_study: list[Path]
) -> None:
    with sessions.begin() as session:
        create_archive(session, "Unlinked", actor=ACTOR)

    result = upload(sessions, blobs, "Unlinked", *test_study)

    assert result.ok
    with sessions.begin() as session:
        assert count(session, Instance) == 3
        assert count(session, Delivery) == 0


def test_upload_writes_audit_event(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    result = upload(sessions, blobs, archive, *test_study)

    with sessions.begin() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "archive.upload")).one()
        assert event.actor == ACTOR
        assert event.details["accepted"] == 3
        assert event.details["instance_ids"] == [file.instance_id for file in result.files]
        assert "PB-TEST-0001" not in str(event.details)


# Unsecured and test-only connections -------------------------------------------------


@pytest.fixture
def unsecured_archive(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as session:
        create_archive(session, "Plain", actor=ACTOR)
        add_pacs(session, "Unsecured PACS", tls=TlsMode.INACTIVE)
        link_pacs(session, "Plain", "Unsecured PACS", actor=ACTOR)
    return "Plain"


def test_unsecured_real_study_needs_attention(
    sessions: sessionmaker[Session], blobs: BlobStore, unsecured_archive: str
) -> None:
    result = upload(sessions, blobs, unsecured_archive, SAMPLES / "US1_UNCR.dcm")

    assert result.files[0].result == FileOutcome.ACCEPTED
    assert result.files[0].deliveries == {"Unsecured PACS": "needs-attention"}
    with sessions.begin() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert delivery.state == DeliveryState.NEEDS_ATTENTION
        assert delivery.reason == unsecured_reason("Unsecured PACS")
        assert delivery.reason.startswith("connection is unsecured")


def test_unsecured_test_study_queued(
    sessions: sessionmaker[Session], blobs: BlobStore, unsecured_archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, unsecured_archive, *test_study)

    with sessions.begin() as session:
        states = session.scalars(select(Delivery.state)).all()
        assert states == [DeliveryState.QUEUED] * 3


def test_unsecured_test_archive_real_study_queued(sessions: sessionmaker[Session], blobs: BlobStore) -> None:
    with sessions.begin() as session:
        create_archive(session, "Sandbox", is_test=True, actor=ACTOR)
        add_pacs(session, "Unsecured PACS", tls=TlsMode.INACTIVE)
        link_pacs(session, "Sandbox", "Unsecured PACS", actor=ACTOR)

    upload(sessions, blobs, "Sandbox", SAMPLES / "US1_UNCR.dcm")

    with sessions.begin() as session:
        assert session.scalars(select(Study)).one().is_test
        assert session.scalars(select(Delivery)).one().state == DeliveryState.QUEUED


def test_test_only_pacs_real_study_needs_attention(sessions: sessionmaker[Session], blobs: BlobStore) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)
        add_pacs(session, "Vendor test PACS", test_only=True)
        link_pacs(session, "Cardiology", "Vendor test PACS", actor=ACTOR)

    upload(sessions, blobs, "Cardiology", SAMPLES / "US1_UNCR.dcm")

    with sessions.begin() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert delivery.state == DeliveryState.NEEDS_ATTENTION
        assert "test-only" in delivery.reason


def test_real_file_in_test_study_rejected(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path], tmp_path: Path
) -> None:
    upload(sessions, blobs, archive, *test_study)
    header = dcmread(test_study[0], stop_before_pixels=True)
    real = changed_copy(
        SAMPLES / "US1_UNCR.dcm",
        tmp_path / "real.dcm",
        StudyInstanceUID=header.StudyInstanceUID,
        SOPInstanceUID="1.2.826.0.1.3680043.8.498.2",
    )

    result = upload(sessions, blobs, archive, real)

    assert result.files[0].result == FileOutcome.REJECTED
    assert "stored as test data" in result.files[0].reason


# Linking later and resend ----------------------------------------------------------


def test_link_later_creates_no_deliveries_until_resend(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study)
    study_uid = dcmread(test_study[0], stop_before_pixels=True).StudyInstanceUID
    with sessions.begin() as session:
        add_pacs(session, "PACS C")
        link_pacs(session, archive, "PACS C", actor=ACTOR)
    with sessions.begin() as session:
        assert count(session, Delivery) == 3 * 2
        summary = summarize_studies(session)[0]
        assert [(d.connection, d.state) for d in summary.destinations][-1] == ("PACS C", "not queued")

    with sessions.begin() as session:
        result = resend_study(session, study_uid, connection_name="PACS C", actor=ACTOR)

    assert result.created["PACS C"] == 3
    with sessions.begin() as session:
        assert count(session, Delivery) == 3 * 3
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.resend")).one()
        assert event.details["created"] == 3


def test_resend_resets_final_deliveries(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study)
    study_uid = dcmread(test_study[0], stop_before_pixels=True).StudyInstanceUID
    with sessions.begin() as session:
        deliveries = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        final_states = [DeliveryState.STORED, DeliveryState.FAILED, DeliveryState.CANCELLED]
        for delivery, state in zip(deliveries, final_states + [DeliveryState.NEEDS_ATTENTION], strict=False):
            delivery.state = state
            delivery.attempts = 2
            delivery.status_code = 0xA700
            delivery.lease_owner = "worker-1"
            session.add(DeliveryAttempt(delivery_id=delivery.id, worker="worker-1", status_code=0xA700))
        deliveries[4].state = DeliveryState.SENDING
        deliveries[5].state = DeliveryState.HELD
        old_queued_at = deliveries[0].first_queued_at

    with sessions.begin() as session:
        result = resend_study(session, study_uid, actor=ACTOR)

    assert sum(result.reset.values()) == 4
    assert sum(result.unchanged.values()) == 2
    assert sum(result.created.values()) == 0
    with sessions.begin() as session:
        deliveries = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        for delivery in deliveries[:4]:
            assert delivery.state == DeliveryState.QUEUED
            assert delivery.attempts == 2
            assert delivery.status_code is None
            assert delivery.lease_owner is None
            assert delivery.first_queued_at > old_queued_at
            assert len(delivery.attempt_log) == 1
        assert deliveries[4].state == DeliveryState.SENDING
        assert deliveries[5].state == DeliveryState.HELD


def test_resend_keeps_unsecured_block(
    sessions: sessionmaker[Session], blobs: BlobStore, unsecured_archive: str
) -> None:
    upload(sessions, blobs, unsecured_archive, SAMPLES / "US1_UNCR.dcm")
    study_uid = dcmread(SAMPLES / "US1_UNCR.dcm", stop_before_pixels=True).StudyInstanceUID

    with sessions.begin() as session:
        result = resend_study(session, study_uid, actor=ACTOR)

    assert result.blocked == {"Unsecured PACS": unsecured_reason("Unsecured PACS")}
    assert result.reset["Unsecured PACS"] == 0
    assert result.needs_attention_again["Unsecured PACS"] == 1
    assert result.describe("Unsecured PACS") == (
        "0 deliveries created, 0 queued again, "
        f"1 needs attention again ({unsecured_reason('Unsecured PACS')}), "
        "0 left as they are (still queued, sending, retrying or held)"
    )
    with sessions.begin() as session:
        assert session.scalars(select(Delivery)).one().state == DeliveryState.NEEDS_ATTENTION


def test_unsecured_reason_names_connection() -> None:
    reason = unsecured_reason("Unsecured PACS")
    assert reason == (
        "connection is unsecured: only test data may be sent without TLS. Turn on TLS with "
        "\"pacsbridge connections edit 'Unsecured PACS' --tls active --scp-cert FILE\" (or --tls encryption-only), "
        "then \"pacsbridge deliveries retry ID\"."
    )
    assert "test archive" not in reason


def test_file_rejections_end_with_next_step(tmp_path: Path) -> None:
    no_sop = changed_copy(SAMPLES / "US1_UNCR.dcm", tmp_path / "no-sop.dcm", SOPInstanceUID=None)
    with pytest.raises(UnreadableFileError) as missing:
        inspect_file(no_sop)
    assert "no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018)" in str(missing.value)
    assert str(missing.value).endswith("export it again from its source")

    two_rows = dcmread(SAMPLES / "US1_UNCR.dcm")
    two_rows.Rows = [32768, 0]
    two_rows.save_as(tmp_path / "two-rows.dcm")
    with pytest.raises(UnreadableFileError) as invalid:
        inspect_file(tmp_path / "two-rows.dcm")
    assert "Rows 32768 and 0; Columns " in str(invalid.value)
    assert "[" not in str(invalid.value)


def test_resend_skips_conflicting_versions(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    original = SAMPLES / "US1_UNCR.dcm"
    upload(sessions, blobs, archive, original)
    upload(sessions, blobs, archive, changed_copy(original, tmp_path / "changed.dcm", SeriesDescription="x"))

    with sessions.begin() as session:
        resend_study(session, dcmread(original, stop_before_pixels=True).StudyInstanceUID, actor=ACTOR)
        conflicting = session.scalars(select(Instance).where(Instance.state == InstanceState.NEEDS_ATTENTION)).one()
        assert conflicting.deliveries == []
        assert count(session, Delivery) == 2


def test_resend_unlinked_connection_rejected(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study)
    study_uid = dcmread(test_study[0], stop_before_pixels=True).StudyInstanceUID
    with sessions.begin() as session:
        add_pacs(session, "PACS C")

    with sessions.begin() as session, pytest.raises(ArchiveError, match="'PACS C' is not linked"):
        resend_study(session, study_uid, connection_name="PACS C", actor=ACTOR)


def test_unlink_cancels_waiting_deliveries(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study)
    with sessions.begin() as session:
        first = session.scalars(select(Delivery).order_by(Delivery.id)).first()
        first.state = DeliveryState.STORED

    with sessions.begin() as session:
        _, cancelled = unlink(session, archive, 1, actor=ACTOR)

    assert cancelled == 2
    with sessions.begin() as session:
        states = session.execute(select(Delivery.connection_id, Delivery.state).order_by(Delivery.id)).all()
        pacs_a = states[0][0]
        assert [state for connection, state in states if connection == pacs_a] == [
            DeliveryState.STORED,
            DeliveryState.CANCELLED,
            DeliveryState.CANCELLED,
        ]
        assert all(state == DeliveryState.QUEUED for connection, state in states if connection != pacs_a)


def test_summary_states_per_destination(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, test_study: list[Path]
) -> None:
    upload(sessions, blobs, archive, *test_study)
    with sessions.begin() as session:
        for delivery in session.scalars(select(Delivery)):
            delivery.state = DeliveryState.STORED if delivery.connection.name == "PACS A" else DeliveryState.FAILED

    with sessions.begin() as session:
        summary = summarize_studies(session, archive_name=archive)[0]

    assert summary.instance_count == 3
    assert [(d.connection, d.state, d.counts) for d in summary.destinations] == [
        ("PACS A", "delivered", {"stored": 3}),
        ("PACS B", "failed", {"failed": 3}),
    ]


def test_prepare_file_missing_path_rejected(blobs: BlobStore, tmp_path: Path) -> None:
    prepared = upload_module.prepare_file(blobs, tmp_path / "gone.dcm")

    assert prepared.rejection is not None
    assert not blobs.folder.exists() or not any(blobs.folder.rglob("*"))


def test_prepare_file_rejected_writes_no_blob(blobs: BlobStore) -> None:
    prepared = upload_module.prepare_file(blobs, SAMPLES / "MR_truncated.dcm")

    assert prepared.rejection is not None
    assert prepared.sha256 is None
    assert not blobs.folder.exists() or not any(blobs.folder.rglob("*"))


def test_prepare_file_reads_copy_not_original(blobs: BlobStore, tmp_path: Path) -> None:
    # The blob store keeps its own copy, so later changes to the source do not reach it.
    source = shutil.copy(SAMPLES / "US1_RLE.dcm", tmp_path / "copy.dcm")
    prepared = upload_module.prepare_file(blobs, Path(source))
    Path(source).write_bytes(b"overwritten")

    assert prepared.sha256 is not None
    assert blobs.open_path(prepared.sha256).read_bytes() == (SAMPLES / "US1_RLE.dcm").read_bytes()
