"""Hold deliveries when an admin changes where or how a connection sends.

Queued and retrying deliveries were meant for the endpoint the admin saw when
the study was stored. After a change of host, port, AE titles or TLS
settings they become `held` until an admin releases them, so that nothing
goes to a new endpoint unnoticed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsbridge.db.forwarding import AuditEvent, Delivery, DeliveryState
from pacsbridge.db.models import ConnectionRecord, utc_now
from pacsbridge.forward.health import request_probe

LOGGER = logging.getLogger(__name__)

# Connection fields that decide which SCP receives the instances and how it is trusted.
ENDPOINT_FIELDS = (
    "host",
    "port",
    "calling_ae_title",
    "called_ae_title",
    "tls_mode",
    "scp_certificate_pem",
    "pinned_fingerprint",
    "server_name",
    "scu_authentication",
)

HOLDABLE_STATES = (DeliveryState.QUEUED, DeliveryState.RETRYING)

_FIELD_LABELS = {
    "host": "host",
    "port": "port",
    "calling_ae_title": "calling AE title",
    "called_ae_title": "called AE title",
    "tls_mode": "TLS mode",
    "scp_certificate_pem": "SCP certificate",
    "pinned_fingerprint": "pinned fingerprint",
    "server_name": "TLS server name",
    "scu_authentication": "SCU authentication",
}


def endpoint_snapshot(record: ConnectionRecord) -> dict[str, object]:
    """Return the endpoint fields of `record` as plain values, for comparing before and after a change."""
    return {name: _plain(getattr(record, name)) for name in ENDPOINT_FIELDS}


def _plain(value: object) -> object:
    return getattr(value, "value", value)


def _shown(name: str, value: object) -> str:
    if value is None or value == "":
        return "none"
    if name == "scp_certificate_pem":
        # A PEM text is too long for a message, so a SHA-256 prefix of the text is shown instead.
        return "PEM sha256 " + hashlib.sha256(str(value).encode()).hexdigest()[:12]
    if name == "pinned_fingerprint":
        return str(value)[:16] + "…"
    return str(value)


def describe_change(before: Mapping[str, object], after: Mapping[str, object]) -> str | None:
    """Return "from <old values> to <new values>" over the changed endpoint fields, or None when none changed."""
    changed = [name for name in ENDPOINT_FIELDS if before.get(name) != after.get(name)]
    if not changed:
        return None
    old = ", ".join(f"{_FIELD_LABELS[name]} {_shown(name, before.get(name))}" for name in changed)
    new = ", ".join(f"{_FIELD_LABELS[name]} {_shown(name, after.get(name))}" for name in changed)
    return f"from {old} to {new}"


def hold_reason(change: str) -> str:
    return f"connection changed {change}: release to send to the new endpoint"


def hold_deliveries_on_change(
    session: Session,
    record: ConnectionRecord,
    before: Mapping[str, object],
    *,
    actor: str = "admin",
) -> int:
    """Hold the connection's queued and retrying deliveries if its endpoint changed, and return how many.

    Writes an AuditEvent `connection.endpoint-changed` whenever the endpoint
    changed, also when no delivery was waiting. A destination marked down is
    probed at once, because the failures were those of the old endpoint. Call
    it in the transaction that changes the connection, after the new values
    are set on `record`.
    """
    change = describe_change(before, endpoint_snapshot(record))
    if change is None:
        return 0

    reason = hold_reason(change)
    now = utc_now()
    deliveries = session.scalars(
        select(Delivery).where(Delivery.connection_id == record.id, Delivery.state.in_(HOLDABLE_STATES))
    ).all()
    for delivery in deliveries:
        delivery.state = DeliveryState.HELD
        delivery.reason = reason
        delivery.updated_at = now
    request_probe(session, [record.id], now=now)
    session.add(
        AuditEvent(
            organization_id=record.organization_id,
            action="connection.endpoint-changed",
            actor=actor,
            details={
                "connection_id": record.id,
                "connection": record.name,
                "change": change,
                "held_deliveries": len(deliveries),
            },
            created_at=now,
        )
    )
    session.flush()
    LOGGER.info("Connection id=%d endpoint changed: held %d deliveries", record.id, len(deliveries))
    return len(deliveries)
