"""The delivery queue on the pacsbridge database (SQLite or PostgreSQL).

Every method runs one short transaction, so workers in several processes
(and later on several hosts) can share the queue:

- PostgreSQL: the claim selects rows `FOR UPDATE SKIP LOCKED`, so two workers
  never lock the same delivery and neither waits for the other.
- SQLite: write transactions start with `BEGIN IMMEDIATE`, which takes the
  database write lock before the first read. Writers therefore run one after
  the other (waiting up to the busy timeout), and a claim never reads rows
  that another writer changes before it commits.

A claimed delivery is `sending` with `lease_owner` and `lease_expires_at`.
A delivery counts as due when it is queued or retrying with `next_attempt_at`
in the past, or when it is `sending` and its lease has expired.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.db.engine import SQLITE_BEGIN_OPTION
from pacsbridge.db.forwarding import (
    DUE_STATES,
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    DestinationHealth,
    DestinationState,
    Instance,
    Study,
)
from pacsbridge.db.models import ConnectionRecord
from pacsbridge.forward.holds import describe_change, endpoint_snapshot, hold_reason
from pacsbridge.forward.policy import Decision, ForwardingPolicy
from pacsbridge.forward.queue import Claim, ClaimedDelivery, LeaseLostError

LOGGER = logging.getLogger(__name__)


@contextlib.contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """Provide a session whose transaction may write, committed when the block ends without an error.

    On SQLite the transaction starts with BEGIN IMMEDIATE (see the module docstring).
    """
    session = sessions()
    try:
        if _dialect(sessions) == "sqlite":
            session.connection(execution_options={SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _dialect(sessions: sessionmaker[Session]) -> str:
    bind = sessions.kw.get("bind")
    return bind.dialect.name if bind is not None else ""


def due_condition(now: dt.datetime):  # type: ignore[no-untyped-def]
    """Return the SQL condition that a delivery is due at `now` (see the module docstring)."""
    return or_(
        and_(Delivery.state.in_(DUE_STATES), Delivery.next_attempt_at <= now),
        and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < now),
    )


class SqlDeliveryQueue:
    """`pacsbridge.forward.queue.DeliveryQueue` on the pacsbridge database."""

    def __init__(self, sessions: sessionmaker[Session], policy: ForwardingPolicy) -> None:
        self.sessions = sessions
        self.policy = policy
        self._skip_locked = _dialect(sessions) == "postgresql"

    def _lock(self, query):  # type: ignore[no-untyped-def]
        if self._skip_locked:
            return query.with_for_update(skip_locked=True, of=Delivery)
        return query

    def claim(self, worker_id: str, *, now: dt.datetime) -> Claim | None:
        lease_expires_at = now + dt.timedelta(seconds=self.policy.lease_seconds)
        with write_transaction(self.sessions) as session:
            down = select(DestinationHealth.connection_id).where(DestinationHealth.state == DestinationState.DOWN)
            oldest = self._lock(
                select(Delivery)
                .where(due_condition(now), Delivery.connection_id.not_in(down))
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(1)
            )
            first = session.scalars(oldest).first()
            if first is None:
                return None

            group = self._lock(
                select(Delivery)
                .where(
                    due_condition(now),
                    Delivery.connection_id == first.connection_id,
                    Delivery.study_id == first.study_id,
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(self.policy.claim_batch_size)
            )
            rows = list(session.scalars(group).all())
            study = session.get(Study, first.study_id)
            connection = session.get(ConnectionRecord, first.connection_id)
            assert study is not None and connection is not None

            claimed = [self._lease(session, row, worker_id, now, lease_expires_at) for row in rows]
            claim = Claim(
                worker_id=worker_id,
                connection_id=first.connection_id,
                study_id=first.study_id,
                organization_id=study.organization_id,
                deliveries=claimed,
                lease_expires_at=lease_expires_at,
                endpoint=endpoint_snapshot(connection),
            )
        LOGGER.info(
            "Worker %s claimed %d deliveries of study id=%d for connection id=%d (%d taken over)",
            worker_id,
            len(claimed),
            claim.study_id,
            claim.connection_id,
            sum(delivery.taken_over for delivery in claimed),
        )
        return claim

    def _lease(
        self, session: Session, row: Delivery, worker_id: str, now: dt.datetime, lease_expires_at: dt.datetime
    ) -> ClaimedDelivery:
        taken_over = row.state == DeliveryState.SENDING
        if taken_over:
            self._close_lost_attempts(session, row, now)
        row.state = DeliveryState.SENDING
        row.lease_owner = worker_id
        row.lease_expires_at = lease_expires_at
        row.attempts += 1
        row.updated_at = now
        attempt = DeliveryAttempt(delivery_id=row.id, worker=worker_id, started_at=now)
        session.add(attempt)
        session.flush()
        instance = session.get(Instance, row.instance_id)
        assert instance is not None
        return ClaimedDelivery(
            delivery_id=row.id,
            attempt_id=attempt.id,
            instance_id=instance.id,
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            number_of_frames=instance.number_of_frames,
            blob_sha256=instance.blob_sha256,
            attempts=row.attempts,
            first_queued_at=row.first_queued_at,
            taken_over=taken_over,
        )

    def _close_lost_attempts(self, session: Session, row: Delivery, now: dt.datetime) -> None:
        LOGGER.warning(
            "Delivery id=%d: the lease of worker %s expired at %s without a recorded response; taking it over",
            row.id,
            row.lease_owner,
            row.lease_expires_at.isoformat() if row.lease_expires_at else "(unknown)",
        )
        open_attempts = session.scalars(
            select(DeliveryAttempt).where(
                DeliveryAttempt.delivery_id == row.id, DeliveryAttempt.finished_at.is_(None)
            )
        ).all()
        for attempt in open_attempts:
            attempt.finished_at = now
            attempt.outcome = AttemptOutcome.LEASE_LOST
            attempt.detail = (
                f"worker {attempt.worker} stopped extending its lease before a response was recorded; "
                "the PACS may or may not have stored the instance, so it is sent again"
            )
        row.last_error = "a worker stopped during the send (lease expired); sending again"

    def heartbeat(self, claim: Claim, *, now: dt.datetime) -> set[int]:
        lease_expires_at = now + dt.timedelta(seconds=self.policy.lease_seconds)
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(claim.delivery_ids),
                    Delivery.state == DeliveryState.SENDING,
                    Delivery.lease_owner == claim.worker_id,
                )
                .values(lease_expires_at=lease_expires_at)
                .execution_options(synchronize_session=False)
            )
            held = set(
                session.scalars(
                    select(Delivery.id).where(
                        Delivery.id.in_(claim.delivery_ids),
                        Delivery.state == DeliveryState.SENDING,
                        Delivery.lease_owner == claim.worker_id,
                    )
                ).all()
            )
        claim.lease_expires_at = lease_expires_at
        return held

    def record(self, claim: Claim, delivery_id: int, decision: Decision, *, now: dt.datetime) -> None:
        claimed = next(delivery for delivery in claim.deliveries if delivery.delivery_id == delivery_id)
        with write_transaction(self.sessions) as session:
            query = select(Delivery).where(Delivery.id == delivery_id)
            if self._skip_locked:
                query = query.with_for_update()
            delivery = session.scalars(query).one()
            if delivery.state != DeliveryState.SENDING or delivery.lease_owner != claim.worker_id:
                raise LeaseLostError(
                    f"delivery id={delivery_id} is no longer leased to worker {claim.worker_id} "
                    f"(state {delivery.state.value}, owner {delivery.lease_owner})"
                )

            attempt = session.get(DeliveryAttempt, claimed.attempt_id)
            assert attempt is not None
            attempt.finished_at = now
            attempt.outcome = decision.outcome
            attempt.status_code = decision.status_code
            attempt.detail = decision.detail

            delivery.state = decision.state
            if decision.not_sent:
                # The claim counted a try, but nothing was sent.
                delivery.attempts = max(delivery.attempts - 1, 0)
            delivery.lease_owner = None
            delivery.lease_expires_at = None
            delivery.updated_at = now
            delivery.status_code = decision.status_code
            delivery.warning_text = decision.warning_text
            delivery.reason = decision.reason
            if decision.sent_transfer_syntax is not None:
                delivery.sent_transfer_syntax = decision.sent_transfer_syntax
            if decision.state == DeliveryState.STORED:
                delivery.last_error = None
            elif decision.last_error is not None:
                delivery.last_error = decision.last_error
            if decision.next_attempt_at is not None:
                delivery.next_attempt_at = decision.next_attempt_at

            if decision.state == DeliveryState.RETRYING:
                self._hold_if_endpoint_changed(session, claim, delivery)

    def _hold_if_endpoint_changed(self, session: Session, claim: Claim, delivery: Delivery) -> None:
        # An admin may change the connection while a group is being sent. Its
        # hold then missed these deliveries, because they were `sending`.
        connection = session.get(ConnectionRecord, claim.connection_id)
        assert connection is not None
        change = describe_change(claim.endpoint, endpoint_snapshot(connection))
        if change is not None:
            delivery.state = DeliveryState.HELD
            delivery.reason = hold_reason(change)

    def release(self, claim: Claim, *, now: dt.datetime) -> int:
        by_id = {delivery.delivery_id: delivery for delivery in claim.deliveries}
        with write_transaction(self.sessions) as session:
            rows = session.scalars(
                self._lock(
                    select(Delivery).where(
                        Delivery.id.in_(claim.delivery_ids),
                        Delivery.state == DeliveryState.SENDING,
                        Delivery.lease_owner == claim.worker_id,
                    )
                )
            ).all()
            for row in rows:
                attempt = session.get(DeliveryAttempt, by_id[row.id].attempt_id)
                assert attempt is not None
                attempt.finished_at = now
                attempt.outcome = AttemptOutcome.NOT_SENT
                attempt.detail = "the worker stopped before sending this instance"
                row.attempts = max(row.attempts - 1, 0)
                row.state = DeliveryState.RETRYING if row.attempts > 0 else DeliveryState.QUEUED
                row.lease_owner = None
                row.lease_expires_at = None
                row.next_attempt_at = now
                row.updated_at = now
        if rows:
            LOGGER.info("Worker %s released %d unsent deliveries", claim.worker_id, len(rows))
        return len(rows)
