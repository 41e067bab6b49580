"""Upload, the transactional outbox and resend on the PostgreSQL server at 127.0.0.1:5432.

The throwaway database comes from the `postgres_url` fixture of
test_db_postgres.py, which skips when no server is reachable there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from conftest import SAMPLES
from pacsbridge.config import load_config
from pacsbridge.connections import TlsMode
from pacsbridge.db import close_database, downgrade, open_database
from pacsbridge.db.forwarding import Delivery, DeliveryState, Instance, InstanceState, Study
from pacsbridge.ingest import upload as upload_module
from pacsbridge.ingest.archives import create_archive, link_pacs, resend_study, unsecured_reason
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.testimages import write_test_study
from pacsbridge.ingest.upload import FileOutcome
from test_db_postgres import postgres_url  # noqa: F401  (module fixture: a throwaway database)
from test_ingest_upload import ACTOR, add_pacs, changed_copy, count, upload


WAITING_FOR_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


@pytest.fixture
def sessions(tmp_path: Path, postgres_url: URL) -> Iterator[sessionmaker[Session]]:  # noqa: F811
    config = load_config(tmp_path / "data", database_url=postgres_url.render_as_string(hide_password=False))
    factory = open_database(config)
    yield factory
    downgrade(factory.kw["bind"], "base")
    close_database(factory)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def archive(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)
        add_pacs(session, "PACS TLS")
        add_pacs(session, "PACS Plain", tls=TlsMode.INACTIVE)
        link_pacs(session, "Cardiology", "PACS TLS", actor=ACTOR)
        link_pacs(session, "Cardiology", "PACS Plain", actor=ACTOR)
    return "Cardiology"


def test_postgres_upload_outcomes(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path
) -> None:
    test_study = write_test_study(tmp_path / "test-study")
    real = SAMPLES / "US1_UNCR.dcm"
    changed = changed_copy(real, tmp_path / "changed.dcm", SeriesDescription="edited")

    first = upload(sessions, blobs, archive, *test_study, real, SAMPLES / "no_meta.dcm")
    second = upload(sessions, blobs, archive, real, changed)

    assert [file.result for file in first.files] == [FileOutcome.ACCEPTED] * 4 + [FileOutcome.REJECTED]
    assert [file.result for file in second.files] == [FileOutcome.DUPLICATE, FileOutcome.NEEDS_ATTENTION]
    with sessions.begin() as session:
        assert count(session, Study) == 2
        assert count(session, Instance) == 5
        assert count(session, Delivery) == 4 * 2
        real_uid = str(dcmread(real, stop_before_pixels=True).SOPInstanceUID)
        blocked = session.scalars(
            select(Delivery).join(Instance).where(
                Instance.sop_instance_uid == real_uid, Delivery.state == DeliveryState.NEEDS_ATTENTION
            )
        ).one()
        assert blocked.reason == unsecured_reason("PACS Plain")
        conflicting = session.scalars(select(Instance).where(Instance.state == InstanceState.NEEDS_ATTENTION)).one()
        assert conflicting.deliveries == []


def test_postgres_failure_before_commit_stores_nothing(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> list[Delivery]:
        raise RuntimeError("simulated crash between the instance insert and the commit")

    monkeypatch.setattr(upload_module, "create_deliveries", crash)

    with pytest.raises(RuntimeError, match="simulated crash"):
        upload(sessions, blobs, archive, SAMPLES / "US1_RLE.dcm")

    with sessions.begin() as session:
        assert count(session, Study) == 0
        assert count(session, Instance) == 0
        assert count(session, Delivery) == 0


def test_postgres_resend_after_link(sessions: sessionmaker[Session], blobs: BlobStore, archive: str) -> None:
    sample = SAMPLES / "US1_RLE.dcm"
    upload(sessions, blobs, archive, sample)
    with sessions.begin() as session:
        add_pacs(session, "PACS Late")
        link_pacs(session, archive, "PACS Late", actor=ACTOR)
        assert count(session, Delivery) == 2

    with sessions.begin() as session:
        result = resend_study(session, str(dcmread(sample, stop_before_pixels=True).StudyInstanceUID), actor=ACTOR)

    assert dict(result.created) == {"PACS Late": 1}
    # The needs-attention delivery to the unsecured 'PACS Plain' goes straight back to needs-attention.
    assert sum(result.reset.values()) == 0
    assert dict(result.needs_attention_again) == {"PACS Plain": 1}
    assert sum(result.unchanged.values()) == 1  # the queued delivery to 'PACS TLS'
    with sessions.begin() as session:
        assert count(session, Delivery) == 3


def test_postgres_concurrent_uploads_store_once(
    sessions: sessionmaker[Session], blobs: BlobStore, archive: str
) -> None:
    sample = SAMPLES / "US1_RLE.dcm"
    results: list[FileOutcome] = []

    def upload_in_thread() -> None:
        results.append(upload(sessions, blobs, archive, sample).files[0].result)

    with sessions.begin() as first:
        first_result = upload_module.upload_files(first, blobs, archive, [sample], actor=ACTOR)
        thread = threading.Thread(target=upload_in_thread)
        thread.start()
        # Commit only once the second upload waits for the rows of the first on a unique index.
        with sessions() as observer:
            while not observer.scalar(text(WAITING_FOR_LOCK)):
                assert thread.is_alive(), "the second upload ended without waiting for the first"
                observer.rollback()
                time.sleep(0.02)
    thread.join(timeout=60)

    assert first_result.files[0].result == FileOutcome.ACCEPTED
    assert results == [FileOutcome.DUPLICATE]
    with sessions.begin() as session:
        assert count(session, Study) == 1
        assert count(session, Instance) == 1
        assert count(session, Delivery) == 2
