"""Outcome policy: what a C-STORE outcome means for a delivery, and when to try again.

Status codes follow PS3.4 B.2.3 (Storage Service Class) and PS3.7 Annex C
(general DIMSE statuses); association failures follow PS3.8 (see
`pacsbridge.dicomnet.failures`). The rules are:

- stored: success (0x0000) and every warning (0x0001, 0x0107, 0x0116, 0xBxxx),
  with the warning kept. 0x0111 (duplicate SOP instance) counts as stored
  only when `duplicate_is_stored` is set; by default it needs attention.
- retry with exponential backoff, jitter and a cap, until `max_age_seconds`
  have passed since the delivery was queued, then failed. This covers
  0xA7xx (out of resources) and the network and association failures that
  `Failure.transient` marks as worth retrying: refused, timed out, DNS,
  aborted, transient rejection, DIMSE timeout, connection lost and TLS
  handshake timeout.
- retry at most `max_limited_tries` times, then needs attention: 0x0110
  (processing failure), 0x0213 (resource limitation) and 0xFE00 (cancel),
  because an SCP that keeps returning them for one instance will not change.
- needs attention at once: permanent association rejection, TLS certificate
  problems, no presentation context, encoding failures, 0xA9xx, 0xCxxx,
  0x0122, 0x0124 and every other failure status.

Sites change the numbers through `ForwardingPolicy.from_env`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.uid import UID

from pacsbridge.db.forwarding import AttemptOutcome, DeliveryState
from pacsbridge.dicomnet.failures import FailureKind
from pacsbridge.dicomnet.status import StatusCategory
from pacsbridge.dicomnet.store import StoreOutcome

ENV_PREFIX = "PACSBRIDGE_FORWARD_"

# Failure kinds that show the destination itself is unreachable, as opposed to
# a problem with one association or one instance. They count towards marking
# the destination down.
CONNECTION_FAILURE_KINDS = frozenset(
    {FailureKind.CONNECTION_REFUSED, FailureKind.CONNECTION_TIMEOUT, FailureKind.DNS, FailureKind.NETWORK}
)

DUPLICATE_STATUS = 0x0111
# Statuses retried a bounded number of times: processing failure, resource limitation, cancel.
LIMITED_RETRY_STATUSES = frozenset({0x0110, 0x0213, 0xFE00})


class PolicyError(ValueError):
    """Raised when a policy value from the environment is invalid."""


@dataclass(frozen=True)
class ForwardingPolicy:
    """Numbers and switches of forwarding, with durations in seconds."""

    retry_base_seconds: float = 30.0
    retry_factor: float = 2.0
    retry_cap_seconds: float = 3600.0
    # Each delay is multiplied by a random factor from 1 - jitter to 1, so
    # that deliveries that failed together do not all come back together.
    retry_jitter: float = 0.2
    max_age_seconds: float = 7 * 86400.0
    max_limited_tries: int = 5
    duplicate_is_stored: bool = False
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 15.0
    # Maximum number of deliveries of one (destination, study) group claimed at once.
    claim_batch_size: int = 50
    # Consecutive connection-level failures after which a destination is marked down.
    down_after_failures: int = 3
    probe_base_seconds: float = 30.0
    probe_cap_seconds: float = 300.0
    # How long an idle worker waits before looking for due deliveries again.
    poll_seconds: float = 2.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" or field.name == "retry_jitter":
                continue
            if value <= 0:
                raise PolicyError(f"forwarding policy {field.name} = {value!r} is invalid: use a positive number")
        if not 0 <= self.retry_jitter < 1:
            raise PolicyError(f"forwarding policy retry_jitter = {self.retry_jitter!r} is invalid: use 0 to 0.99")
        if self.heartbeat_seconds >= self.lease_seconds:
            raise PolicyError(
                f"forwarding policy heartbeat_seconds = {self.heartbeat_seconds!r} is invalid: it must be shorter "
                f"than lease_seconds ({self.lease_seconds!r}) so that a lease is extended before it expires"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ForwardingPolicy:
        """Build the policy from PACSBRIDGE_FORWARD_<FIELD> variables, such as PACSBRIDGE_FORWARD_LEASE_SECONDS.

        Unset variables keep the defaults. Raises PolicyError naming the variable for an invalid value.
        """
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            text = environ.get(name)
            if text is None or text.strip() == "":
                continue
            values[field.name] = _parse_env_value(name, text.strip(), str(field.type))
        try:
            return cls(**values)  # type: ignore[arg-type]
        except PolicyError as exc:
            raise PolicyError(f"{exc} (set through {ENV_PREFIX}* variables)") from None

    def retry_delay(self, attempts: int, rng: random.Random) -> float:
        """Return the wait in seconds before try number `attempts + 1`."""
        exponent = max(attempts - 1, 0)
        # A capped exponent keeps a large attempt count from overflowing the float.
        if exponent > 64:
            delay = self.retry_cap_seconds
        else:
            delay = min(self.retry_cap_seconds, self.retry_base_seconds * self.retry_factor**exponent)
        return delay * (1.0 - self.retry_jitter * rng.random())

    def probe_delay(self, probes_failed: int) -> float:
        """Return the wait in seconds before the next Echo probe of a down destination."""
        exponent = min(max(probes_failed, 0), 32)
        return min(self.probe_cap_seconds, self.probe_base_seconds * 2.0**exponent)


def _parse_env_value(name: str, text: str, type_name: str) -> object:
    if type_name == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise PolicyError(f"{name} = {text!r} is invalid: use true or false")
    try:
        return int(text) if type_name == "int" else float(text)
    except ValueError:
        kind = "a whole number" if type_name == "int" else "a number"
        raise PolicyError(f"{name} = {text!r} is invalid: use {kind}") from None


class Verdict(enum.StrEnum):
    STORED = "stored"
    RETRY = "retry"
    NEEDS_ATTENTION = "needs-attention"


@dataclass(frozen=True)
class Classification:
    """The verdict on one outcome before tries are counted, with the text to keep."""

    verdict: Verdict
    detail: str
    # Retried only while the delivery has had fewer than `max_limited_tries` tries.
    limited: bool = False
    warning_text: str | None = None


@dataclass(frozen=True)
class Decision:
    """The change to write to a delivery after one attempt."""

    state: DeliveryState
    outcome: AttemptOutcome
    detail: str
    status_code: int | None = None
    warning_text: str | None = None
    reason: str | None = None
    last_error: str | None = None
    next_attempt_at: dt.datetime | None = None
    sent_transfer_syntax: str | None = None
    # True for refused, timed-out, DNS and network failures, which count towards marking the destination down.
    connection_failure: bool = False
    # True when the worker did not connect for this delivery, for example because a delivery rule blocked it.
    # The attempt row is kept, but the delivery's `attempts` counter counts real sends only.
    not_sent: bool = False


def _status_text(code: int, meaning: str) -> str:
    return f"0x{code:04X} {meaning}"


def classify(outcome: StoreOutcome, policy: ForwardingPolicy) -> Classification:
    """Classify one C-STORE outcome as stored, to retry or needing attention."""
    if outcome.category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
        assert outcome.status is not None
        text = _status_text(outcome.status, outcome.meaning)
        warning = text if outcome.category == StatusCategory.WARNING else None
        return Classification(Verdict.STORED, text + _preparation_text(outcome), warning_text=warning)

    if outcome.status is not None:
        return _classify_status(outcome.status, outcome.meaning, policy)

    failure = outcome.failure
    if failure is None:
        return Classification(Verdict.RETRY, outcome.meaning or "no response and no reason recorded")
    text = failure.message
    if failure.kind in (FailureKind.NO_PRESENTATION_CONTEXT, FailureKind.ENCODING):
        return Classification(Verdict.NEEDS_ATTENTION, text)
    # Failure.transient separates transient from permanent rejections (PS3.8
    # result 2 or 1) and TLS handshake timeouts from certificate problems.
    return Classification(Verdict.RETRY if failure.transient else Verdict.NEEDS_ATTENTION, text)


def _preparation_text(outcome: StoreOutcome) -> str:
    """Return how the instance was prepared, for the delivery's record; empty when it went as received."""
    parts = []
    if outcome.conversion and outcome.conversion != "as-is" and outcome.sent_transfer_syntax:
        parts.append(f"{outcome.conversion} to {UID(outcome.sent_transfer_syntax).name}")
    parts += outcome.notes
    return f" ({'; '.join(parts)})" if parts else ""


def _classify_status(code: int, meaning: str, policy: ForwardingPolicy) -> Classification:
    text = _status_text(code, meaning)
    if code == DUPLICATE_STATUS:
        if policy.duplicate_is_stored:
            return Classification(Verdict.STORED, text, warning_text=text)
        return Classification(
            Verdict.NEEDS_ATTENTION,
            f"{text}: the PACS already has an instance with this UID. Check it on the PACS, then cancel "
            "this delivery, or retry it after the PACS admin removed the old instance",
        )
    if 0xA700 <= code <= 0xA7FF:
        return Classification(Verdict.RETRY, text)
    if code in LIMITED_RETRY_STATUSES:
        return Classification(Verdict.RETRY, text, limited=True)
    return Classification(Verdict.NEEDS_ATTENTION, text)


def decide(
    outcome: StoreOutcome,
    *,
    attempts: int,
    first_queued_at: dt.datetime,
    now: dt.datetime,
    policy: ForwardingPolicy,
    rng: random.Random,
) -> Decision:
    """Decide the new state of a delivery from the outcome of its try number `attempts`."""
    classification = classify(outcome, policy)
    failure = outcome.failure
    connection_failure = failure is not None and failure.kind in CONNECTION_FAILURE_KINDS
    common = {
        "status_code": outcome.status,
        "sent_transfer_syntax": outcome.sent_transfer_syntax,
        "connection_failure": connection_failure,
    }

    if classification.verdict == Verdict.STORED:
        return Decision(
            DeliveryState.STORED,
            AttemptOutcome.STORED,
            classification.detail,
            warning_text=classification.warning_text,
            **common,
        )
    if classification.verdict == Verdict.NEEDS_ATTENTION:
        return Decision(
            DeliveryState.NEEDS_ATTENTION,
            AttemptOutcome.NEEDS_ATTENTION,
            classification.detail,
            reason=classification.detail,
            last_error=classification.detail,
            **common,
        )
    return retry_decision(
        classification.detail,
        attempts=attempts,
        first_queued_at=first_queued_at,
        now=now,
        policy=policy,
        rng=rng,
        limited=classification.limited,
        **common,
    )


def retry_decision(
    detail: str,
    *,
    attempts: int,
    first_queued_at: dt.datetime,
    now: dt.datetime,
    policy: ForwardingPolicy,
    rng: random.Random,
    limited: bool = False,
    outcome: AttemptOutcome = AttemptOutcome.RETRY,
    **common: object,
) -> Decision:
    """Schedule another try, or give up when the tries or the maximum age are used up."""
    if limited and attempts >= policy.max_limited_tries:
        reason = f"the PACS answered {detail} {attempts} times: ask the PACS admin to check its log, then retry"
        return Decision(
            DeliveryState.NEEDS_ATTENTION,
            AttemptOutcome.NEEDS_ATTENTION,
            detail,
            reason=reason,
            last_error=detail,
            **common,  # type: ignore[arg-type]
        )
    age = (now - first_queued_at).total_seconds()
    if age >= policy.max_age_seconds:
        reason = (
            f"gave up after {attempts} tries over {_duration_text(age)} "
            f"(maximum {_duration_text(policy.max_age_seconds)}); last error: {detail}"
        )
        return Decision(
            DeliveryState.FAILED,
            AttemptOutcome.FAILED,
            detail,
            reason=reason,
            last_error=detail,
            **common,  # type: ignore[arg-type]
        )
    delay = policy.retry_delay(attempts, rng)
    return Decision(
        DeliveryState.RETRYING,
        outcome,
        detail,
        last_error=detail,
        next_attempt_at=now + dt.timedelta(seconds=delay),
        **common,  # type: ignore[arg-type]
    )


def _duration_text(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"
