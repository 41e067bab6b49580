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
