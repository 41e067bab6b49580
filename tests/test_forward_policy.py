"""The outcome policy: which C-STORE outcomes store, retry or need attention, and the retry schedule."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest

from pacsbridge.db.forwarding import AttemptOutcome, DeliveryState
from pacsbridge.dicomnet.failures import Failure, FailureKind, decode_rejection
from pacsbridge.dicomnet.status import describe_status
from pacsbridge.dicomnet.store import StoreOutcome
from pacsbridge.forward.policy import ForwardingPolicy, PolicyError, decide

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)
POLICY = ForwardingPolicy()


def status_outcome(code: int) -> StoreOutcome:
    meaning = describe_status(code, service="storage")
    return StoreOutcome(Path("x.dcm"), "1.2.3", "1.2.840.10008.5.1.4.1.1.7", meaning.category, meaning.meaning, code)


def failure_outcome(failure: Failure) -> StoreOutcome:
    return StoreOutcome(Path("x.dcm"), "1.2.3", "1.2.840.10008.5.1.4.1.1.7", describe_status(0xC000).category,
                        failure.summary, None, failure=failure)


def decide_now(outcome: StoreOutcome, attempts: int = 1, age: float = 0.0, policy: ForwardingPolicy = POLICY):
    return decide(
        outcome,
        attempts=attempts,
        first_queued_at=NOW - dt.timedelta(seconds=age),
        now=NOW,
        policy=policy,
        rng=random.Random(1),
    )


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (0x0000, DeliveryState.STORED),
        (0x0001, DeliveryState.STORED),
        (0x0107, DeliveryState.STORED),
        (0x0116, DeliveryState.STORED),
        (0xB000, DeliveryState.STORED),
        (0xB006, DeliveryState.STORED),
        (0xB007, DeliveryState.STORED),
        (0xA700, DeliveryState.RETRYING),
        (0xA7FF, DeliveryState.RETRYING),
        (0x0110, DeliveryState.RETRYING),
        (0x0213, DeliveryState.RETRYING),
        (0xA900, DeliveryState.NEEDS_ATTENTION),
        (0xC000, DeliveryState.NEEDS_ATTENTION),
        (0xCFFF, DeliveryState.NEEDS_ATTENTION),
        (0x0122, DeliveryState.NEEDS_ATTENTION),
        (0x0124, DeliveryState.NEEDS_ATTENTION),
        (0x0111, DeliveryState.NEEDS_ATTENTION),
        (0x0117, DeliveryState.NEEDS_ATTENTION),
    ],
)
def test_status_code_decides_state(code: int, state: DeliveryState) -> None:
    decision = decide_now(status_outcome(code))
    assert decision.state == state
    assert decision.status_code == code


def test_warning_is_kept_with_code_and_meaning() -> None:
    decision = decide_now(status_outcome(0xB000))
    assert decision.outcome == AttemptOutcome.STORED
    assert decision.warning_text is not None
    assert decision.warning_text.startswith("0xB000 coercion of data elements")


def test_success_has_no_warning() -> None:
    assert decide_now(status_outcome(0x0000)).warning_text is None


def test_duplicate_needs_attention_by_default() -> None:
    decision = decide_now(status_outcome(0x0111))
    assert decision.reason is not None
    assert "the PACS already has an instance with this UID" in decision.reason


def test_duplicate_stored_where_site_allows() -> None:
    decision = decide_now(status_outcome(0x0111), policy=ForwardingPolicy(duplicate_is_stored=True))
    assert decision.state == DeliveryState.STORED
    assert decision.warning_text is not None
    assert decision.warning_text.startswith("0x0111")


@pytest.mark.parametrize(
    ("kind", "transient", "state"),
    [
        (FailureKind.CONNECTION_REFUSED, True, DeliveryState.RETRYING),
        (FailureKind.CONNECTION_TIMEOUT, True, DeliveryState.RETRYING),
        (FailureKind.DNS, True, DeliveryState.RETRYING),
        (FailureKind.NETWORK, True, DeliveryState.RETRYING),
        (FailureKind.ACSE_TIMEOUT, True, DeliveryState.RETRYING),
        (FailureKind.ABORTED, True, DeliveryState.RETRYING),
        (FailureKind.DIMSE_TIMEOUT, True, DeliveryState.RETRYING),
        (FailureKind.CONNECTION_LOST, True, DeliveryState.RETRYING),
        (FailureKind.TLS, True, DeliveryState.RETRYING),
        (FailureKind.TLS, False, DeliveryState.NEEDS_ATTENTION),
        (FailureKind.NO_PRESENTATION_CONTEXT, False, DeliveryState.NEEDS_ATTENTION),
        (FailureKind.ENCODING, False, DeliveryState.NEEDS_ATTENTION),
    ],
)
def test_failure_kind_decides_state(kind: FailureKind, transient: bool, state: DeliveryState) -> None:
    decision = decide_now(failure_outcome(Failure(kind, "It failed.", "Fix it.", transient)))
    assert decision.state == state


def test_connection_failures_count_for_health() -> None:
    refused = decide_now(failure_outcome(Failure(FailureKind.CONNECTION_REFUSED, "Refused.", "Start it.", True)))
    aborted = decide_now(failure_outcome(Failure(FailureKind.ABORTED, "Aborted.", "Check.", True)))
    assert refused.connection_failure
    assert not aborted.connection_failure


def test_rejection_transient_retries_permanent_needs_attention() -> None:
    transient = decode_rejection(2, 3, 1, calling="PB", called="PACS")
    permanent = decode_rejection(1, 1, 7, calling="PB", called="PACS")
    assert decide_now(failure_outcome(transient)).state == DeliveryState.RETRYING
    decision = decide_now(failure_outcome(permanent))
    assert decision.state == DeliveryState.NEEDS_ATTENTION
    assert decision.reason is not None
    assert "called AE title not recognized" in decision.reason


def test_limited_status_needs_attention_after_max_tries() -> None:
    policy = ForwardingPolicy(max_limited_tries=5)
    assert decide_now(status_outcome(0x0110), attempts=4, policy=policy).state == DeliveryState.RETRYING
    decision = decide_now(status_outcome(0x0110), attempts=5, policy=policy)
    assert decision.state == DeliveryState.NEEDS_ATTENTION
    assert decision.reason is not None
    assert "5 times" in decision.reason


def test_retry_fails_after_max_age() -> None:
    policy = ForwardingPolicy(max_age_seconds=3600)
    outcome = status_outcome(0xA700)
    assert decide_now(outcome, attempts=9, age=3599, policy=policy).state == DeliveryState.RETRYING
    decision = decide_now(outcome, attempts=10, age=3600, policy=policy)
    assert decision.state == DeliveryState.FAILED
    assert decision.outcome == AttemptOutcome.FAILED
    assert decision.reason is not None
    assert "gave up after 10 tries" in decision.reason


def test_backoff_grows_with_cap_and_jitter() -> None:
    policy = ForwardingPolicy(retry_base_seconds=30, retry_factor=2, retry_cap_seconds=3600, retry_jitter=0.2)
    rng = random.Random(7)
    for attempts, full in [(1, 30), (2, 60), (3, 120), (8, 3600), (50, 3600), (10_000, 3600)]:
        delay = policy.retry_delay(attempts, rng)
        assert full * 0.8 <= delay <= full, (attempts, delay)


def test_retry_schedules_next_attempt() -> None:
    decision = decide_now(status_outcome(0xA700), attempts=1)
    assert decision.next_attempt_at is not None
    assert NOW + dt.timedelta(seconds=24) <= decision.next_attempt_at <= NOW + dt.timedelta(seconds=30)


def test_policy_from_env_reads_values() -> None:
    policy = ForwardingPolicy.from_env(
        {
            "PACSBRIDGE_FORWARD_LEASE_SECONDS": "2",
            "PACSBRIDGE_FORWARD_HEARTBEAT_SECONDS": "0.5",
            "PACSBRIDGE_FORWARD_MAX_LIMITED_TRIES": "3",
            "PACSBRIDGE_FORWARD_DUPLICATE_IS_STORED": "yes",
        }
    )
    assert policy.lease_seconds == 2.0
    assert policy.heartbeat_seconds == 0.5
    assert policy.max_limited_tries == 3
    assert policy.duplicate_is_stored is True
    assert policy.retry_base_seconds == 30.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PACSBRIDGE_FORWARD_LEASE_SECONDS", "soon", "use a number"),
        ("PACSBRIDGE_FORWARD_MAX_LIMITED_TRIES", "2.5", "use a whole number"),
        ("PACSBRIDGE_FORWARD_DUPLICATE_IS_STORED", "maybe", "use true or false"),
        ("PACSBRIDGE_FORWARD_RETRY_BASE_SECONDS", "-1", "use a positive number"),
        ("PACSBRIDGE_FORWARD_HEARTBEAT_SECONDS", "90", "shorter than lease_seconds"),
    ],
)
def test_policy_from_env_rejects_invalid(name: str, value: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ForwardingPolicy.from_env({name: value})
