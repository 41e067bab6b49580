"""The one vocabulary for the state of a study's deliveries, per destination or over all destinations.

`pacsbridge deliveries`, `pacsbridge studies list` and `pacsbridge archives
show` all use `summarize`. The first rule that matches wins:

- not queued: there are no deliveries (a PACS linked after the upload).
- in progress: any delivery is queued, sending or retrying.
- held (needs release): any delivery is held after a connection change, and
  none is in progress. An admin must release it.
- delivered: every delivery is stored. A cancelled, failed or needs-attention
  delivery therefore never counts as delivered.
- partial: some deliveries are stored, and the others are not stored for a
  final reason (failed, cancelled) or need attention.
- needs attention: none is stored, and some need an admin's action.
- failed: none is stored, and some gave up after the maximum retry age.
- cancelled: every delivery is cancelled.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from pacsbridge.db.forwarding import DeliveryState


class Progress(enum.StrEnum):
    NOT_QUEUED = "not queued"
    IN_PROGRESS = "in progress"
    HELD = "held (needs release)"
    DELIVERED = "delivered"
    PARTIAL = "partial"
    NEEDS_ATTENTION = "needs attention"
    FAILED = "failed"
    CANCELLED = "cancelled"


IN_PROGRESS_STATES = frozenset({DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.RETRYING})


def summarize(states: Iterable[DeliveryState]) -> Progress:
    """Return the progress of a set of deliveries by the rules of the module docstring."""
    present: set[DeliveryState] = set()
    total = 0
    stored = 0
    for state in states:
        present.add(state)
        total += 1
        stored += state == DeliveryState.STORED
    if total == 0:
        return Progress.NOT_QUEUED
    if present & IN_PROGRESS_STATES:
        return Progress.IN_PROGRESS
    if DeliveryState.HELD in present:
        return Progress.HELD
    if stored == total:
        return Progress.DELIVERED
    if stored:
        return Progress.PARTIAL
    if DeliveryState.NEEDS_ATTENTION in present:
        return Progress.NEEDS_ATTENTION
    if DeliveryState.FAILED in present:
        return Progress.FAILED
    return Progress.CANCELLED
