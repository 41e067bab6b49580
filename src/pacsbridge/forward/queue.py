"""The delivery queue interface that workers use: claim a group, extend its lease, record outcomes, release.

A claim covers the due deliveries of one (destination, study) group, so one
association carries them. Claims are leases: a worker that dies or stalls
stops extending its lease, and once the lease expires another worker takes
the deliveries over and closes the unfinished attempts as `lease-lost`.
`pacsbridge.forward.sql_queue.SqlDeliveryQueue` implements this interface on
the pacsbridge database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pacsbridge.forward.policy import Decision


class LeaseLostError(RuntimeError):
    """Raised when a worker records an outcome for a delivery whose lease expired or passed to another worker."""


@dataclass(frozen=True)
class ClaimedDelivery:
    """One delivery of a claim, with what the worker needs to send its instance."""

    delivery_id: int
    attempt_id: int
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    number_of_frames: int
    blob_sha256: str
    # Tries so far, this one included.
    attempts: int
    first_queued_at: dt.datetime
    # True when this claim took the delivery over from a worker whose lease expired.
    taken_over: bool = False


@dataclass
class Claim:
    """The deliveries of one (destination, study) group leased to one worker."""

    worker_id: str
    connection_id: int
    study_id: int
    organization_id: int
    deliveries: list[ClaimedDelivery]
    lease_expires_at: dt.datetime
    # The connection's endpoint settings when the group was claimed, to notice an edit during the send.
    endpoint: Mapping[str, object] = field(default_factory=dict)

    @property
    def delivery_ids(self) -> list[int]:
        return [delivery.delivery_id for delivery in self.deliveries]


class DeliveryQueue(Protocol):
    def claim(self, worker_id: str, *, now: dt.datetime) -> Claim | None:
        """Lease the due deliveries of one (destination, study) group, oldest first, or None when nothing is due."""
        ...

    def heartbeat(self, claim: Claim, *, now: dt.datetime) -> set[int]:
        """Extend the lease of the claim's unfinished deliveries and return the ids still leased to this worker."""
        ...

    def record(self, claim: Claim, delivery_id: int, decision: Decision, *, now: dt.datetime) -> None:
        """Write the decision and close the attempt in one transaction. Raises LeaseLostError without the lease."""
        ...

    def release(self, claim: Claim, *, now: dt.datetime) -> int:
        """Put the claim's deliveries that got no outcome back in the queue, due now, and return how many."""
        ...
