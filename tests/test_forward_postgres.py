"""Claims on PostgreSQL (127.0.0.1:5432): two workers claiming at once never lease the same delivery.

The test creates a throwaway database pb_fwd_<random> and drops it at the
end. It skips when no server accepts the users postgres or root without a
password there.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from forward_helpers import add_archive, add_pacs, store_study, write_instances
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from pacsbridge.config import load_config
from pacsbridge.db import close_database, downgrade, open_database
from pacsbridge.db.forwarding import (
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
)
from pacsbridge.db.models import utc_now
from pacsbridge.forward.policy import Decision, ForwardingPolicy
from pacsbridge.forward.sql_queue import SqlDeliveryQueue
from pacsbridge.ingest.blobstore import BlobStore

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_USERS = ("postgres", "root")
STORED = Decision(DeliveryState.STORED, AttemptOutcome.STORED, "0x0000 success", status_code=0)


@pytest.fixture
def postgres_url() -> Iterator[URL]:
    failures = []
    for user in POSTGRES_USERS:
        url = URL.create("postgresql+psycopg", username=user, host=POSTGRES_HOST, port=POSTGRES_PORT, database="test")
        admin = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        try:
            with admin.connect():
                break
        except OperationalError as exc:
            failures.append(f"{user}: {' '.join(str(exc.orig).split())}")
            admin.dispose()
    else:
        pytest.skip(f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} is not reachable ({'; '.join(failures)})")
    database = f"pb_fwd_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    try:
        yield url.set(database=database)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


def test_two_workers_never_claim_same_delivery(tmp_path: Path, postgres_url: URL) -> None:
    config = load_config(tmp_path / "data", database_url=postgres_url.render_as_string(hide_password=False))
    sessions = open_database(config)
    blobs = BlobStore(config.blob_dir)
    try:
        with sessions.begin() as session:
            add_pacs(session, "PACS-A", 11112)
            add_pacs(session, "PACS-B", 11113)
            add_archive(session, "ward", ["PACS-A", "PACS-B"])
            for index in range(8):
                store_study(session, blobs, "ward", write_instances(tmp_path / f"study-{index}", 5))

        policy = ForwardingPolicy(claim_batch_size=3)
        start = threading.Barrier(2)
        claimed: dict[str, list[int]] = {"w1": [], "w2": []}
        errors: list[BaseException] = []

        def work(worker_id: str) -> None:
            queue = SqlDeliveryQueue(sessions, policy)
            start.wait()
            try:
                while (claim := queue.claim(worker_id, now=utc_now())) is not None:
                    claimed[worker_id] += claim.delivery_ids
                    for delivery_id in claim.delivery_ids:
                        queue.record(claim, delivery_id, STORED, now=utc_now())
            except BaseException as exc:  # The main thread asserts that there were none.
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        assert errors == []
        assert claimed["w1"]
        assert claimed["w2"]
        assert not set(claimed["w1"]) & set(claimed["w2"])
        with sessions.begin() as session:
            states = set(session.scalars(select(Delivery.state)).all())
            attempts = Counter(session.scalars(select(DeliveryAttempt.delivery_id)).all())
            total = len(session.scalars(select(Delivery.id)).all())
        assert states == {DeliveryState.STORED}
        assert len(attempts) == total == 80
        assert set(attempts.values()) == {1}
    finally:
        downgrade(sessions.kw["bind"], "base")
        close_database(sessions)
