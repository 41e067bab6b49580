"""Destination health: mark a PACS down after repeated connection failures, and probe it with Echo.

While a destination is down, workers claim none of its deliveries, so an
unreachable PACS costs one Echo per probe interval instead of one failed
association per study. The first probe runs `probe_base_seconds` after the
destination went down, and each failed probe doubles the wait up to
`probe_cap_seconds`. A successful probe marks the destination up and makes its
retrying deliveries due at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacsbridge.db.forwarding import (
    Delivery,
    DeliveryState,
    DestinationHealth,
    DestinationState,
)
from pacsbridge.forward.policy import ForwardingPolicy

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DestinationDown:
    """A destination marked down, as shown to an admin."""

    connection_id: int
    down_since: dt.datetime | None
    next_probe_at: dt.datetime | None
    consecutive_failures: int
    last_error: str | None

    def next_probe_text(self, now: dt.datetime) -> str:
        """Return the time of the next Echo probe, or "due now" once it has passed (a running worker probes it)."""
        if self.next_probe_at is None or self.next_probe_at <= now:
            return "due now, when a worker runs"
        return _time_text(self.next_probe_at)

    def describe(self, now: dt.datetime) -> str:
        """Return "destination down since …, next probe …" for `pacsbridge deliveries` and `archives show`."""
        since = "an unknown time" if self.down_since is None else _time_text(self.down_since)
        return f"destination down since {since}, next probe {self.next_probe_text(now)}"

    def as_dict(self) -> dict[str, object]:
        return {
            "state": DestinationState.DOWN.value,
            "down_since": None if self.down_since is None else self.down_since.isoformat(),
            "next_probe_at": None if self.next_probe_at is None else self.next_probe_at.isoformat(),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


def _time_text(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def find_down(session: Session, connection_ids: Iterable[int] | None = None) -> dict[int, DestinationDown]:
    """Return the destinations marked down, by connection id, of `connection_ids` or of all connections."""
    query = select(DestinationHealth).where(DestinationHealth.state == DestinationState.DOWN)
    if connection_ids is not None:
        query = query.where(DestinationHealth.connection_id.in_(list(connection_ids)))
    return {
        health.connection_id: DestinationDown(
            connection_id=health.connection_id,
            down_since=health.down_since,
            next_probe_at=health.next_probe_at,
            consecutive_failures=health.consecutive_failures,
            last_error=health.last_error,
        )
        for health in session.scalars(query)
    }


def _health(session: Session, connection_id: int, now: dt.datetime) -> DestinationHealth:
    health = session.get(DestinationHealth, connection_id)
    if health is None:
        health = DestinationHealth(
            connection_id=connection_id, state=DestinationState.UP, consecutive_failures=0, updated_at=now
        )
        session.add(health)
    return health


def note_connection_failure(
    session: Session, connection_id: int, error: str, *, now: dt.datetime, policy: ForwardingPolicy
) -> bool:
    """Count one failed connection attempt, and return True when this failure marked the destination down."""
    health = _health(session, connection_id, now)
    health.consecutive_failures += 1
    health.last_error = error
    health.updated_at = now
    if health.state == DestinationState.DOWN or health.consecutive_failures < policy.down_after_failures:
        return False
    health.state = DestinationState.DOWN
    health.down_since = now
    health.next_probe_at = now + dt.timedelta(seconds=policy.probe_delay(0))
    LOGGER.warning(
        "Connection id=%d marked down after %d connection failures; next Echo probe at %s: %s",
        connection_id,
        health.consecutive_failures,
        health.next_probe_at.isoformat(),
        error,
    )
    return True


def note_reachable(session: Session, connection_id: int, *, now: dt.datetime) -> bool:
    """Reset the failure count after the PACS responded, and return True when it was down and is up again.

    Marking a destination up makes its retrying deliveries due at once.
    """
    health = session.get(DestinationHealth, connection_id)
    if health is None:
        return False
    was_down = health.state == DestinationState.DOWN
    health.state = DestinationState.UP
    health.consecutive_failures = 0
    health.down_since = None
    health.next_probe_at = None
    health.updated_at = now
    if not was_down:
        return False
    made_due = session.execute(
        update(Delivery)
        .where(Delivery.connection_id == connection_id, Delivery.state == DeliveryState.RETRYING)
        .values(next_attempt_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    LOGGER.info("Connection id=%d is up again; %d retrying deliveries are due now", connection_id, made_due)
    return True


def claim_due_probe(session: Session, *, now: dt.datetime, policy: ForwardingPolicy) -> int | None:
    """Take the oldest due probe of a down destination and return its connection id, or None.

    The probe time moves forward as if this probe failed, in the same
    transaction, so no other worker probes the destination at the same time.
    """
    health = session.scalars(
        select(DestinationHealth)
        .where(DestinationHealth.state == DestinationState.DOWN, DestinationHealth.next_probe_at <= now)
        .order_by(DestinationHealth.next_probe_at)
        .limit(1)
    ).first()
    if health is None:
        return None
    failed_probes = max(health.consecutive_failures - policy.down_after_failures + 1, 0)
    health.next_probe_at = now + dt.timedelta(seconds=policy.probe_delay(failed_probes))
    health.updated_at = now
    return health.connection_id


def note_probe_failed(session: Session, connection_id: int, error: str, *, now: dt.datetime) -> None:
    """Count a failed Echo probe. `claim_due_probe` has already set the next probe time."""
    health = session.get(DestinationHealth, connection_id)
    if health is None:
        return
    health.consecutive_failures += 1
    health.last_error = error
    health.updated_at = now
    LOGGER.info("Echo probe of connection id=%d failed; next probe at %s", connection_id, health.next_probe_at)


def request_probe(session: Session, connection_ids: list[int], *, now: dt.datetime) -> None:
    """Make the probes of these destinations due now, if they are down (used by `deliveries retry`)."""
    if not connection_ids:
        return
    session.execute(
        update(DestinationHealth)
        .where(
            DestinationHealth.connection_id.in_(connection_ids),
            DestinationHealth.state == DestinationState.DOWN,
        )
        .values(next_probe_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
