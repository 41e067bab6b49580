"""Delivery status for admins, and the actions they take: retry now, cancel, release held deliveries.

Per instance and destination the state is the Delivery row itself. Per study
and destination, and per study over all its destinations, the state follows
the rules of `pacsbridge.forward.progress`, which `pacsbridge studies list`
uses too.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsbridge.db.connections import DEFAULT_ORGANIZATION, find_organization
from pacsbridge.db.forwarding import (
    Archive,
    AuditEvent,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    InstanceState,
    Study,
)
from pacsbridge.db.models import ConnectionRecord, utc_now
from pacsbridge.forward.health import DestinationDown, find_down, request_probe
from pacsbridge.forward.progress import Progress, summarize
from pacsbridge.ingest.archives import StudyNotFoundError, get_archive, list_archives

__all__ = [
    "ActionResult",
    "DeliveryActionError",
    "DeliveryView",
    "OutstandingWork",
    "Progress",
    "StudyView",
    "cancel",
    "connection_delivery_ids",
    "find_outstanding",
    "held_hint",
    "list_studies",
    "release",
    "retry_now",
    "summarize",
]

LOGGER = logging.getLogger(__name__)

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
# States in which a delivery waits for a worker, or for an admin to release it.
WAITING_STATES = frozenset({DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.RETRYING, DeliveryState.HELD})
# States in which a delivery waits for an admin's decision: retry or cancel.
ATTENTION_STATES = frozenset({DeliveryState.NEEDS_ATTENTION, DeliveryState.FAILED})
# Maximum number of delivery ids listed in one hint; the rest are shown as "…".
MAX_IDS_SHOWN = 20


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
    # The detail of the last try of a stored delivery: its status and how the instance was prepared.
    stored_detail: str | None = None
    # While sending: the worker holding the lease, and when another worker may take the delivery over.
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    # Set while the destination is marked down: workers claim none of its deliveries until a probe succeeds.
    destination_down: DestinationDown | None = None

    @property
    def detail(self) -> str:
        """The one line that explains what happened or what to do next."""
        return self.detail_at(utc_now())

    def detail_at(self, now: dt.datetime) -> str:
        """Return `detail` as it reads at `now`, which decides whether a next try or probe time has passed."""
        if self.state == DeliveryState.STORED:
            stored = self.warning_text or f"status {_hex(self.status_code)}"
            # The last try's detail ends with how the instance was prepared, in brackets, when it was changed.
            last = self.stored_detail
            if last and last.endswith(")") and " (" in last:
                return f"{stored} {last[last.index(' (') :].strip()}"
            return stored
        if self.state in (DeliveryState.QUEUED, DeliveryState.RETRYING) and self.destination_down is not None:
            waiting = (
                f"waiting for the destination to come back (next probe {self.destination_down.next_probe_text(now)})"
            )
            return f"{waiting}; last error: {self.last_error}" if self.last_error else waiting
        if self.state == DeliveryState.RETRYING:
            return f"next try {self._next_try_text(now)}; last error: {self.last_error or 'none recorded'}"
        if self.state in (DeliveryState.NEEDS_ATTENTION, DeliveryState.FAILED, DeliveryState.HELD):
            return self.reason or self.last_error or ""
        if self.state == DeliveryState.SENDING and self.lease_owner and self.lease_expires_at is not None:
            if self.lease_expires_at <= now:
                return (
                    f"worker {self.lease_owner} stopped renewing its lease at "
                    f"{self.lease_expires_at.isoformat(timespec='seconds')}: the next worker run takes it over"
                )
            return f"being sent by worker {self.lease_owner} (lease until {self.lease_expires_at.isoformat(timespec='seconds')})"
        return ""

    def _next_try_text(self, now: dt.datetime) -> str:
        if self.next_attempt_at is None or self.next_attempt_at <= now:
            return "due now, when a worker runs"
        return self.next_attempt_at.isoformat(timespec="seconds")

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
            "detail": self.detail,
            "attempt_log": [attempt.as_dict() for attempt in self.attempt_log],
        }


@dataclass(frozen=True)
class ConflictView:
    """A second version of a stored SOP Instance UID with other content: kept, never forwarded."""

    instance_id: int
    sop_instance_uid: str
    blob_sha256: str
    reason: str | None
    created_at: dt.datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "sop_instance_uid": self.sop_instance_uid,
            "state": InstanceState.NEEDS_ATTENTION.value,
            "blob_sha256": self.blob_sha256,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
        }


@dataclass
class StudyView:
    """The deliveries of one study, grouped by destination, and its conflicting instances."""

    archive: str
    study_instance_uid: str
    deliveries: list[DeliveryView] = field(default_factory=list)
    conflicts: list[ConflictView] = field(default_factory=list)
    # Destinations marked down, by connection name.
    down: dict[str, DestinationDown] = field(default_factory=dict)

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
                    "counts": dict(Counter(delivery.state.value for delivery in rows)),
                    "down": None if name not in self.down else self.down[name].as_dict(),
                }
                for name, rows in self.destinations().items()
            ],
            "deliveries": [delivery.as_dict() for delivery in self.deliveries],
            "conflicting_instances": [conflict.as_dict() for conflict in self.conflicts],
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
    """Return the deliveries and conflicting instances of the organization's studies, or of one archive or study.

    Raises ArchiveNotFoundError for an unknown `archive` and StudyNotFoundError
    for an unknown `study_uid` (or one of another archive), so that a mistyped
    filter does not look like a study without deliveries.
    """
    archive_name = _check_filters(session, archive, study_uid, organization)
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
    conflicts_query = (
        select(Instance, Study, Archive)
        .join(Study, Instance.study_id == Study.id)
        .join(Archive, Study.archive_id == Archive.id)
        .where(Study.organization_id == owner.id, Instance.state == InstanceState.NEEDS_ATTENTION)
        .order_by(Study.id, Instance.id)
    )
    if archive_name is not None:
        query = query.where(Archive.name == archive_name)
        conflicts_query = conflicts_query.where(Archive.name == archive_name)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
        conflicts_query = conflicts_query.where(Study.study_instance_uid == study_uid)
    rows = session.execute(query).all()
    attempts = _attempt_views(session, [row.Delivery.id for row in rows]) if with_attempts else {}
    stored_details = _last_details(
        session, [row.Delivery.id for row in rows if row.Delivery.state == DeliveryState.STORED]
    )
    down = find_down(session, {row.Delivery.connection_id for row in rows})

    studies: dict[int, StudyView] = {}
    for delivery, instance, study, archive_row, connection in rows:
        view = studies.setdefault(study.id, StudyView(archive_row.name, study.study_instance_uid))
        destination_down = down.get(connection.id)
        if destination_down is not None:
            view.down[connection.name] = destination_down
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
                stored_detail=stored_details.get(delivery.id),
                lease_owner=delivery.lease_owner if delivery.state == DeliveryState.SENDING else None,
                lease_expires_at=delivery.lease_expires_at if delivery.state == DeliveryState.SENDING else None,
                destination_down=destination_down,
            )
        )

    for instance, study, archive_row in session.execute(conflicts_query).all():
        view = studies.setdefault(study.id, StudyView(archive_row.name, study.study_instance_uid))
        view.conflicts.append(
            ConflictView(
                instance_id=instance.id,
                sop_instance_uid=instance.sop_instance_uid,
                blob_sha256=instance.blob_sha256,
                reason=instance.reason,
                created_at=instance.created_at,
            )
        )
    return [studies[study_id] for study_id in sorted(studies)]


def _check_filters(session: Session, archive: str | None, study_uid: str | None, organization: str) -> str | None:
    """Return the stored name of `archive`, after checking that the archive and the study exist."""
    archive_name = None if archive is None else get_archive(session, archive, organization=organization).name
    if study_uid is None:
        return archive_name
    owner = find_organization(session, organization)
    found = None
    if owner is not None:
        found = session.execute(
            select(Archive.name)
            .join(Study, Study.archive_id == Archive.id)
            .where(Study.organization_id == owner.id, Study.study_instance_uid == study_uid)
        ).scalar()
    if found is not None and archive_name in (None, found):
        return archive_name

    if found is not None:
        where = f"in archive {archive_name!r} (it is in archive {found!r})"
    else:
        where = f"in organization {organization!r}"
    known = [known.name for known in list_archives(session, organization=organization)]
    if known:
        hint = (
            "Known archives: " + ", ".join(repr(name) for name in known) + ". "
            'List their studies with "pacsbridge studies list --archive NAME".'
        )
    else:
        hint = 'No archives exist yet: create one with "pacsbridge archives create NAME".'
    raise StudyNotFoundError(f"study {study_uid!r} not found {where}. {hint}")


def _last_details(session: Session, delivery_ids: list[int]) -> dict[int, str | None]:
    """Return the detail of each delivery's last try."""
    if not delivery_ids:
        return {}
    last_tries = (
        select(func.max(DeliveryAttempt.id))
        .where(DeliveryAttempt.delivery_id.in_(delivery_ids))
        .group_by(DeliveryAttempt.delivery_id)
    )
    rows = session.execute(
        select(DeliveryAttempt.delivery_id, DeliveryAttempt.detail).where(DeliveryAttempt.id.in_(last_tries))
    )
    return {delivery_id: detail for delivery_id, detail in rows}


def _attempt_views(session: Session, delivery_ids: list[int]) -> dict[int, list[AttemptView]]:
    attempts: dict[int, list[AttemptView]] = {}
    if not delivery_ids:
        return attempts
    for attempt in session.scalars(
        select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(delivery_ids)).order_by(DeliveryAttempt.id)
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
    return attempts


# Outstanding work ---------------------------------------------------------------


@dataclass(frozen=True)
class OutstandingDestination:
    """The deliveries to one destination that are not stored or cancelled, counted per state."""

    connection_id: int
    connection: str
    counts: dict[DeliveryState, int]
    down: DestinationDown | None = None


@dataclass(frozen=True)
class OutstandingWork:
    """The deliveries of all organizations left waiting or needing an admin, reported by `worker --drain` at its end."""

    destinations: list[OutstandingDestination]
    held_ids: list[int]

    def count(self, states: frozenset[DeliveryState]) -> int:
        return sum(count for entry in self.destinations for state, count in entry.counts.items() if state in states)

    @property
    def waiting(self) -> int:
        """Deliveries queued, being sent, retrying or held: a worker or an admin still has to act on them."""
        return self.count(WAITING_STATES)

    def lines(self, now: dt.datetime) -> list[str]:
        """Return the report lines: one per destination, then what to do about held and needs-attention deliveries."""
        lines = []
        for entry in self.destinations:
            counts = ", ".join(
                _state_count(entry.counts[state], state) for state in DeliveryState if entry.counts.get(state)
            )
            line = f"{entry.connection}: {counts or 'nothing left to send'}"
            if entry.down is not None:
                line += f"; {entry.down.describe(now)}"
            lines.append(line)
        if self.held_ids:
            lines.append(held_hint(len(self.held_ids), self.held_ids))
        attention = self.count(ATTENTION_STATES)
        if attention:
            lines.append(
                f"{_deliveries(attention)} {'needs' if attention == 1 else 'need'} attention or failed: "
                'see the reasons with "pacsbridge deliveries", then retry or cancel them.'
            )
        return lines


def _deliveries(count: int) -> str:
    return f"{count} {'delivery' if count == 1 else 'deliveries'}"


def _state_count(count: int, state: DeliveryState) -> str:
    if state == DeliveryState.HELD:
        return f"{count} held (needs release)"
    if state == DeliveryState.NEEDS_ATTENTION:
        return f"{count} {'needs' if count == 1 else 'need'} attention"
    return f"{count} {state.value}"


def held_hint(count: int, ids: Sequence[int] = (), *, connection: str | None = None) -> str:
    """Return the sentence on how to release `count` held deliveries, listing up to 20 of their `ids`."""
    subject = _deliveries(count) if connection is None else f"{_deliveries(count)} to {connection}"
    shown = ", ".join(map(str, ids[:MAX_IDS_SHOWN])) + (", …" if len(ids) > MAX_IDS_SHOWN else "")
    release = '"pacsbridge deliveries release --all"'
    if count == 1:
        alternative = f"give its ID: {shown}" if ids else "give its ID"
        return f"{subject} is held: release it with {release} (or {alternative})."
    alternative = f"give their IDs: {shown}" if ids else "give their IDs"
    return f"{subject} are held: release them with {release} (or {alternative})."


def find_outstanding(session: Session) -> OutstandingWork:
    """Count the deliveries of every organization that are neither stored nor cancelled, per destination."""
    states = WAITING_STATES | ATTENTION_STATES
    rows = session.execute(
        select(Delivery.connection_id, ConnectionRecord.name, Delivery.state, func.count())
        .join(ConnectionRecord, Delivery.connection_id == ConnectionRecord.id)
        .where(Delivery.state.in_(states))
        .group_by(Delivery.connection_id, ConnectionRecord.name, Delivery.state)
    ).all()
    down = find_down(session)
    names: dict[int, str] = {}
    counts: dict[int, dict[DeliveryState, int]] = {}
    for connection_id, name, state, count in rows:
        names[connection_id] = name
        counts.setdefault(connection_id, {})[state] = count
    for connection_id in down:
        if connection_id not in names:
            record = session.get(ConnectionRecord, connection_id)
            names[connection_id] = record.name if record is not None else f"connection id={connection_id}"
    destinations = [
        OutstandingDestination(
            connection_id, names[connection_id], counts.get(connection_id, {}), down.get(connection_id)
        )
        for connection_id in sorted(names, key=lambda key: (names[key].casefold(), key))
    ]
    held_ids = list(
        session.scalars(select(Delivery.id).where(Delivery.state == DeliveryState.HELD).order_by(Delivery.id))
    )
    return OutstandingWork(destinations, held_ids)


def connection_delivery_ids(session: Session, connection_id: int, state: DeliveryState) -> list[int]:
    """Return the ids of the connection's deliveries in `state`, oldest first."""
    return list(
        session.scalars(
            select(Delivery.id)
            .where(Delivery.connection_id == connection_id, Delivery.state == state)
            .order_by(Delivery.id)
        )
    )


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
                f'deliveries not found: {", ".join(map(str, ids))}. List them with "pacsbridge deliveries"'
            )
        return []
    query = select(Delivery).join(Study, Delivery.study_id == Study.id).where(Study.organization_id == owner.id)
    if ids is None:
        return list(session.scalars(query.where(Delivery.state.in_(states)).order_by(Delivery.id)).all())
    rows = list(session.scalars(query.where(Delivery.id.in_(ids)).order_by(Delivery.id)).all())
    missing = sorted(set(ids) - {row.id for row in rows})
    if missing:
        raise DeliveryActionError(
            f'deliveries not found: {", ".join(map(str, missing))}. List them with "pacsbridge deliveries"'
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

    The maximum retry age counts again from now. The old reason and last error
    are cleared, because the worker checks the delivery rules again before it
    sends (the attempt log keeps the history). A destination marked down is
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
        row.last_error = None
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
            'ended (see "pacsbridge deliveries")'
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
