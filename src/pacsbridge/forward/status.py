"""Delivery status for admins, and the actions they take: retry now, cancel, release held deliveries.

Per instance and destination the state is the Delivery row itself. Per study
and destination (and per study over all its destinations) the progress is:

- delivered: every delivery stored (cancelled ones do not count);
- partial: some stored, some not;
- in progress: none stored yet, and some queued, sending, retrying or held;
- failed: none stored and none in progress (all failed or need attention);
- cancelled: every delivery cancelled.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsbridge.db.connections import DEFAULT_ORGANIZATION, find_organization
from pacsbridge.db.forwarding import (
    Archive,
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Study,
)
from pacsbridge.db.models import ConnectionRecord, utc_now
from pacsbridge.forward.health import request_probe

LOGGER = logging.getLogger(__name__)

ACTIVE_STATES = frozenset({DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.RETRYING, DeliveryState.HELD})
RETRYABLE_STATES = frozenset({DeliveryState.NEEDS_ATTENTION, DeliveryState.FAILED, DeliveryState.RETRYING})
CANCELLABLE_STATES = frozenset(
    {
        DeliveryState.QUEUED,
        DeliveryState.RETRYING,
        DeliveryState.NEEDS_ATTENTION,
        DeliveryState.FAILED,
        DeliveryState.HELD,
    }
)


class Progress(enum.StrEnum):
    DELIVERED = "delivered"
    PARTIAL = "partial"
    IN_PROGRESS = "in progress"
    FAILED = "failed"
    CANCELLED = "cancelled"


def summarize(states: Iterable[DeliveryState]) -> Progress:
    """Return the progress of a set of deliveries (see the module docstring)."""
    counted = [state for state in states if state != DeliveryState.CANCELLED]
    if not counted:
        return Progress.CANCELLED
    stored = sum(state == DeliveryState.STORED for state in counted)
    if stored == len(counted):
        return Progress.DELIVERED
    if stored:
        return Progress.PARTIAL
    if any(state in ACTIVE_STATES for state in counted):
        return Progress.IN_PROGRESS
    return Progress.FAILED


@dataclass(frozen=True)
class AttemptView:
    started_at: dt.datetime
    finished_at: dt.datetime | None
    worker: str
    outcome: str | None
    status_code: int | None
    detail: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "worker": self.worker,
            "outcome": self.outcome,
            "status": self.status_code,
            "status_hex": _hex(self.status_code),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class DeliveryView:
    """One instance towards one destination, as shown to an admin."""

    id: int
    archive: str
    study_instance_uid: str
    sop_instance_uid: str
    connection: str
    state: DeliveryState
    attempts: int
    next_attempt_at: dt.datetime | None
    status_code: int | None
    warning_text: str | None
    last_error: str | None
    reason: str | None
    attempt_log: list[AttemptView] = field(default_factory=list)

    @property
    def detail(self) -> str:
        """The one line that explains what happened or what to do next."""
        if self.state == DeliveryState.STORED:
            return self.warning_text or f"status {_hex(self.status_code)}"
        if self.state == DeliveryState.RETRYING:
            when = self.next_attempt_at.isoformat(timespec="seconds") if self.next_attempt_at else "soon"
            return f"next try {when}; last error: {self.last_error or 'none recorded'}"
        if self.state in (DeliveryState.NEEDS_ATTENTION, DeliveryState.FAILED, DeliveryState.HELD):
            return self.reason or self.last_error or ""
        return ""

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "archive": self.archive,
            "study_instance_uid": self.study_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "connection": self.connection,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt_at": None if self.next_attempt_at is None else self.next_attempt_at.isoformat(),
            "status": self.status_code,
            "status_hex": _hex(self.status_code),
            "warning_text": self.warning_text,
            "last_error": self.last_error,
            "reason": self.reason,
            "attempt_log": [attempt.as_dict() for attempt in self.attempt_log],
        }


@dataclass
class StudyView:
    """The deliveries of one study, grouped by destination."""

    archive: str
    study_instance_uid: str
    deliveries: list[DeliveryView] = field(default_factory=list)

    @property
    def progress(self) -> Progress:
        return summarize(delivery.state for delivery in self.deliveries)

    def destinations(self) -> dict[str, list[DeliveryView]]:
        grouped: dict[str, list[DeliveryView]] = {}
        for delivery in self.deliveries:
            grouped.setdefault(delivery.connection, []).append(delivery)
        return grouped

    def as_dict(self) -> dict[str, object]:
        return {
            "archive": self.archive,
            "study_instance_uid": self.study_instance_uid,
            "progress": self.progress.value,
            "destinations": [
                {
                    "connection": name,
                    "progress": summarize(delivery.state for delivery in rows).value,
                    "stored": sum(delivery.state == DeliveryState.STORED for delivery in rows),
                    "total": len(rows),
                }
                for name, rows in self.destinations().items()
            ],
            "deliveries": [delivery.as_dict() for delivery in self.deliveries],
        }


def _hex(code: int | None) -> str | None:
    return None if code is None else f"0x{code:04X}"


def list_studies(
    session: Session,
    *,
    archive: str | None = None,
    study_uid: str | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    with_attempts: bool = False,
) -> list[StudyView]:
    """Return the deliveries of the organization's studies, optionally of one archive or one study."""
    owner = find_organization(session, organization)
    if owner is None:
        return []
    query = (
        select(Delivery, Instance, Study, Archive, ConnectionRecord)
        .join(Instance, Delivery.instance_id == Instance.id)
        .join(Study, Delivery.study_id == Study.id)
        .join(Archive, Study.archive_id == Archive.id)
        .join(ConnectionRecord, Delivery.connection_id == ConnectionRecord.id)
        .where(Study.organization_id == owner.id)
        .order_by(Study.id, ConnectionRecord.name, Instance.id)
    )
    if archive is not None:
        query = query.where(Archive.name == archive)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    rows = session.execute(query).all()

    attempts: dict[int, list[AttemptView]] = {}
    if with_attempts and rows:
        ids = [row.Delivery.id for row in rows]
        for attempt in session.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(ids)).order_by(DeliveryAttempt.id)
        ):
            attempts.setdefault(attempt.delivery_id, []).append(
                AttemptView(
                    started_at=attempt.started_at,
                    finished_at=attempt.finished_at,
                    worker=attempt.worker,
                    outcome=None if attempt.outcome is None else attempt.outcome.value,
                    status_code=attempt.status_code,
                    detail=attempt.detail,
                )
            )

    studies: dict[int, StudyView] = {}
    for delivery, instance, study, archive_row, connection in rows:
        view = studies.setdefault(study.id, StudyView(archive_row.name, study.study_instance_uid))
        view.deliveries.append(
            DeliveryView(
                id=delivery.id,
                archive=archive_row.name,
                study_instance_uid=study.study_instance_uid,
                sop_instance_uid=instance.sop_instance_uid,
                connection=connection.name,
                state=delivery.state,
                attempts=delivery.attempts,
                next_attempt_at=delivery.next_attempt_at if delivery.state == DeliveryState.RETRYING else None,
                status_code=delivery.status_code,
                warning_text=delivery.warning_text,
                last_error=delivery.last_error,
                reason=delivery.reason,
                attempt_log=attempts.get(delivery.id, []),
            )
        )
    return list(studies.values())


# Actions ----------------------------------------------------------------------


class DeliveryActionError(ValueError):
    """Raised when an action names deliveries that do not exist or are in a state it cannot change."""


@dataclass(frozen=True)
class ActionResult:
    changed: list[int]
    # Deliveries named explicitly that were already in the target state.
    unchanged: list[int] = field(default_factory=list)


def _select_deliveries(
    session: Session, ids: Sequence[int] | None, states: frozenset[DeliveryState], organization: str
) -> list[Delivery]:
    owner = find_organization(session, organization)
    if owner is None:
        if ids:
            raise DeliveryActionError(
                f"deliveries not found: {', '.join(map(str, ids))}. List them with 'pacsbridge deliveries'"
            )
        return []
    query = select(Delivery).join(Study, Delivery.study_id == Study.id).where(Study.organization_id == owner.id)
    if ids is None:
        return list(session.scalars(query.where(Delivery.state.in_(states)).order_by(Delivery.id)).all())
    rows = list(session.scalars(query.where(Delivery.id.in_(ids)).order_by(Delivery.id)).all())
    missing = sorted(set(ids) - {row.id for row in rows})
    if missing:
        raise DeliveryActionError(
            f"deliveries not found: {', '.join(map(str, missing))}. List them with 'pacsbridge deliveries'"
        )
    return rows


def _check_states(rows: Sequence[Delivery], allowed: frozenset[DeliveryState], action: str, target: str) -> None:
    """Raise DeliveryActionError for rows in neither an `allowed` state nor already in the `target` state."""
    wrong = [row for row in rows if row.state not in allowed and row.state.value != target]
    if wrong:
        listed = ", ".join(f"{row.id} ({row.state.value})" for row in wrong)
        allowed_text = ", ".join(sorted(state.value for state in allowed))
        raise DeliveryActionError(f"cannot {action} deliveries {listed}: the action applies to {allowed_text} only")


def _audit(session: Session, rows: Sequence[Delivery], action: str, actor: str, now: dt.datetime) -> None:
    if not rows:
        return
    study = session.get(Study, rows[0].study_id)
    assert study is not None
    session.add(
        AuditEvent(
            organization_id=study.organization_id,
            action=action,
            actor=actor,
            details={"delivery_ids": [row.id for row in rows], "count": len(rows)},
            created_at=now,
        )
    )


def retry_now(
    session: Session,
    ids: Sequence[int] | None = None,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str = "admin",
) -> ActionResult:
    """Queue needs-attention, failed and retrying deliveries for an immediate try, or all of them when `ids` is None.

    The maximum retry age counts again from now. A destination marked down is
    probed at once, because its deliveries are not claimed until it is up.
    """
    rows = _select_deliveries(session, ids, RETRYABLE_STATES, organization)
    _check_states(rows, RETRYABLE_STATES, "retry", DeliveryState.QUEUED.value)
    now = utc_now()
    changed = [row for row in rows if row.state in RETRYABLE_STATES]
    for row in changed:
        row.state = DeliveryState.QUEUED
        row.next_attempt_at = now
        row.first_queued_at = now
        row.reason = None
        row.updated_at = now
    request_probe(session, sorted({row.connection_id for row in changed}), now=now)
    _audit(session, changed, "deliveries.retry", actor, now)
    LOGGER.info("Queued %d deliveries for an immediate try", len(changed))
    return ActionResult([row.id for row in changed], [row.id for row in rows if row not in changed])


def cancel(
    session: Session, ids: Sequence[int], *, organization: str = DEFAULT_ORGANIZATION, actor: str = "admin"
) -> ActionResult:
    """Cancel deliveries that are not stored and not being sent right now."""
    rows = _select_deliveries(session, ids, CANCELLABLE_STATES, organization)
    sending = [row.id for row in rows if row.state == DeliveryState.SENDING]
    if sending:
        raise DeliveryActionError(
            f"deliveries {', '.join(map(str, sending))} are being sent right now: cancel them once the try has "
            "ended (see 'pacsbridge deliveries')"
        )
    _check_states(rows, CANCELLABLE_STATES, "cancel", DeliveryState.CANCELLED.value)
    now = utc_now()
    changed = [row for row in rows if row.state in CANCELLABLE_STATES]
    for row in changed:
        row.state = DeliveryState.CANCELLED
        row.reason = f"cancelled by {actor}"
        row.updated_at = now
    _audit(session, changed, "deliveries.cancel", actor, now)
    LOGGER.info("Cancelled %d deliveries", len(changed))
    return ActionResult([row.id for row in changed], [row.id for row in rows if row not in changed])


def release(
    session: Session,
    ids: Sequence[int] | None = None,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str = "admin",
) -> ActionResult:
    """Release held deliveries, or all of them when `ids` is None, so they go to the connection's current endpoint."""
    held = frozenset({DeliveryState.HELD})
    rows = _select_deliveries(session, ids, held, organization)
    _check_states(rows, held, "release", DeliveryState.QUEUED.value)
    now = utc_now()
    changed = [row for row in rows if row.state == DeliveryState.HELD]
    for row in changed:
        row.state = DeliveryState.QUEUED
        row.next_attempt_at = now
        row.first_queued_at = now
        row.reason = None
        row.updated_at = now
    _audit(session, changed, "deliveries.release", actor, now)
    LOGGER.info("Released %d held deliveries", len(changed))
    return ActionResult([row.id for row in changed], [row.id for row in rows if row not in changed])
