"""The SQL delivery queue on SQLite: claims per (destination, study), leases, take-over, release and health."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from forward_helpers import (
    add_archive,
    add_pacs,
    open_test_database,
    store_study,
    write_instances,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.db import close_database
from pacsbridge.db.forwarding import (
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    DestinationHealth,
    DestinationState,
)
from pacsbridge.db.models import utc_now
from pacsbridge.forward import health
from pacsbridge.forward.policy import Decision, ForwardingPolicy
from pacsbridge.forward.queue import LeaseLostError
from pacsbridge.forward.sql_queue import SqlDeliveryQueue, write_transaction
from pacsbridge.ingest.blobstore import BlobStore

POLICY = ForwardingPolicy(lease_seconds=60, heartbeat_seconds=15, claim_batch_size=3)
STORED = Decision(DeliveryState.STORED, AttemptOutcome.STORED, "0x0000 success", status_code=0)


@pytest.fixture
def sessions(tmp_path: Path):
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    with sessions.begin() as session:
        add_pacs(session, "PACS-A", 11112)
        add_pacs(session, "PACS-B", 11113)
        add_archive(session, "ward", ["PACS-A", "PACS-B"])
        store_study(session, blobs, "ward", write_instances(tmp_path / "s1", 4))
        store_study(session, blobs, "ward", write_instances(tmp_path / "s2", 2))
    yield sessions
    close_database(sessions)


def deliveries(sessions: sessionmaker[Session]) -> list[Delivery]:
    with sessions.begin() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)).all())


def attempts_of(sessions: sessionmaker[Session], delivery_id: int) -> list[DeliveryAttempt]:
    with sessions.begin() as session:
        query = select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id).order_by(DeliveryAttempt.id)
        return list(session.scalars(query).all())


def test_claim_takes_one_group_capped(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    claim = queue.claim("w1", now=utc_now())
    assert claim is not None
    assert len(claim.deliveries) == 3
    rows = {row.id: row for row in deliveries(sessions)}
    groups = {(rows[i].connection_id, rows[i].study_id) for i in claim.delivery_ids}
    assert groups == {(claim.connection_id, claim.study_id)}
    for delivery_id in claim.delivery_ids:
        assert rows[delivery_id].state == DeliveryState.SENDING
        assert rows[delivery_id].lease_owner == "w1"
        assert rows[delivery_id].attempts == 1


def test_claims_never_overlap(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    now = utc_now()
    seen: list[int] = []
    while (claim := queue.claim("w", now=now)) is not None:
        seen += claim.delivery_ids
    assert sorted(seen) == [row.id for row in deliveries(sessions)]
    assert len(seen) == len(set(seen))


def test_claim_skips_future_held_and_down(sessions) -> None:
    now = utc_now()
    with sessions.begin() as session:
        rows = session.scalars(select(Delivery)).all()
        for row in rows:
            if row.connection_id == 1:
                row.state = DeliveryState.HELD
            else:
                row.state = DeliveryState.RETRYING
                row.next_attempt_at = now + dt.timedelta(minutes=5)
    queue = SqlDeliveryQueue(sessions, POLICY)
    assert queue.claim("w", now=now) is None

    with sessions.begin() as session:
        for row in session.scalars(select(Delivery).where(Delivery.connection_id == 2)):
            row.next_attempt_at = now
        session.add(DestinationHealth(connection_id=2, state=DestinationState.DOWN, consecutive_failures=3))
    assert queue.claim("w", now=now) is None


def test_record_closes_attempt(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    claim = queue.claim("w1", now=utc_now())
    assert claim is not None
    delivery_id = claim.delivery_ids[0]
    queue.record(claim, delivery_id, STORED, now=utc_now())
    row = next(row for row in deliveries(sessions) if row.id == delivery_id)
    assert row.state == DeliveryState.STORED
    assert row.status_code == 0
    assert row.lease_owner is None
    [attempt] = attempts_of(sessions, delivery_id)
    assert attempt.outcome == AttemptOutcome.STORED
    assert attempt.status_code == 0
    assert attempt.finished_at is not None


def test_expired_lease_taken_over(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    start = utc_now()
    first = queue.claim("dead-worker", now=start)
    assert first is not None
    later = start + dt.timedelta(seconds=POLICY.lease_seconds + 1)
    claims = []
    while (claim := queue.claim("w2", now=later)) is not None:
        claims.append(claim)
    taken = next(claim for claim in claims if set(claim.delivery_ids) == set(first.delivery_ids))
    assert all(delivery.taken_over for delivery in taken.deliveries)
    assert all(delivery.attempts == 2 for delivery in taken.deliveries)
    lost, current = attempts_of(sessions, first.delivery_ids[0])
    assert lost.outcome == AttemptOutcome.LEASE_LOST
    assert lost.worker == "dead-worker"
    assert current.worker == "w2"
    assert current.finished_at is None

    with pytest.raises(LeaseLostError):
        queue.record(first, first.delivery_ids[0], STORED, now=later)


def test_live_lease_not_taken_over(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    start = utc_now()
    first = queue.claim("w1", now=start)
    assert first is not None
    soon = start + dt.timedelta(seconds=POLICY.lease_seconds - 1)
    while (claim := queue.claim("w2", now=soon)) is not None:
        assert not set(claim.delivery_ids) & set(first.delivery_ids)


def test_heartbeat_extends_lease(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    start = utc_now()
    claim = queue.claim("w1", now=start)
    assert claim is not None
    queue.record(claim, claim.delivery_ids[0], STORED, now=start)
    later = start + dt.timedelta(seconds=50)
    held = queue.heartbeat(claim, now=later)
    assert held == set(claim.delivery_ids[1:])
    assert queue.claim("w2", now=start + dt.timedelta(seconds=POLICY.lease_seconds + 1)) is not None
    rows = {row.id: row for row in deliveries(sessions)}
    assert rows[claim.delivery_ids[1]].lease_owner == "w1"


def test_release_returns_unsent(sessions) -> None:
    queue = SqlDeliveryQueue(sessions, POLICY)
    now = utc_now()
    claim = queue.claim("w1", now=now)
    assert claim is not None
    queue.record(claim, claim.delivery_ids[0], STORED, now=now)
    assert queue.release(claim, now=now) == len(claim.deliveries) - 1
    rows = {row.id: row for row in deliveries(sessions)}
    for delivery_id in claim.delivery_ids[1:]:
        assert rows[delivery_id].state == DeliveryState.QUEUED
        assert rows[delivery_id].attempts == 0
        [attempt] = attempts_of(sessions, delivery_id)
        assert attempt.outcome == AttemptOutcome.NOT_SENT


def test_destination_down_then_probe_up(sessions) -> None:
    policy = ForwardingPolicy(down_after_failures=2, probe_base_seconds=30, probe_cap_seconds=300)
    now = utc_now()
    with write_transaction(sessions) as session:
        assert not health.note_connection_failure(session, 1, "refused", now=now, policy=policy)
        assert health.note_connection_failure(session, 1, "refused", now=now, policy=policy)
        for row in session.scalars(select(Delivery).where(Delivery.connection_id == 1)):
            row.state = DeliveryState.RETRYING
            row.next_attempt_at = now + dt.timedelta(hours=1)
    with write_transaction(sessions) as session:
        assert health.claim_due_probe(session, now=now, policy=policy) is None
    probe_time = now + dt.timedelta(seconds=30)
    with write_transaction(sessions) as session:
        assert health.claim_due_probe(session, now=probe_time, policy=policy) == 1
        assert health.claim_due_probe(session, now=probe_time, policy=policy) is None
    with write_transaction(sessions) as session:
        assert health.note_reachable(session, 1, now=probe_time)
    for row in deliveries(sessions):
        if row.connection_id == 1:
            assert row.next_attempt_at == probe_time


def test_probe_delay_backs_off_to_cap() -> None:
    policy = ForwardingPolicy(probe_base_seconds=30, probe_cap_seconds=300)
    assert [policy.probe_delay(n) for n in range(6)] == [30, 60, 120, 240, 300, 300]


def test_endpoint_change_during_send_holds_retry(sessions) -> None:
    from pacsbridge.db import update_connection

    queue = SqlDeliveryQueue(sessions, POLICY)
    now = utc_now()
    claim = queue.claim("w1", now=now)
    assert claim is not None
    with sessions.begin() as session:
        update_connection(session, "PACS-A" if claim.connection_id == 1 else "PACS-B", port=4242)
    retry = Decision(
        DeliveryState.RETRYING,
        AttemptOutcome.RETRY,
        "refused",
        last_error="refused",
        next_attempt_at=now + dt.timedelta(seconds=30),
    )
    queue.record(claim, claim.delivery_ids[0], retry, now=now)
    row = next(row for row in deliveries(sessions) if row.id == claim.delivery_ids[0])
    assert row.state == DeliveryState.HELD
    assert row.reason is not None
    assert row.reason.startswith("connection changed from port ")
