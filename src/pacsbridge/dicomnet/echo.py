"""Echo: test a connection step by step and report what passed and what failed.

The report is a list of steps, each with an outcome, a duration and a detail
for the admin. New checks (TLS handshake, presentation contexts, worklist
probe) are new steps in the same list, so the report keeps its shape.
"""

from __future__ import annotations

import datetime
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsbridge.dicomnet.association import (
    Endpoint,
    open_association,
    probe_endpoint_tls,
    probe_tcp,
)
from pacsbridge.dicomnet.failures import DicomNetworkError, Failure, FailureKind
from pacsbridge.dicomnet.status import describe_status
from pacsbridge.tls.certificates import colon_fingerprint
from pacsbridge.tls.context import TlsConfigurationError, TlsMode
from pacsbridge.tls.handshake import TlsFailure

# Certificates that expire within this time are flagged.
EXPIRY_WARNING = datetime.timedelta(days=30)

LOGGER = logging.getLogger(__name__)

# Echo waits at most this long to connect and to receive an association response,
# whatever the connection's own timeouts, so a firewall that silently drops
# packets is reported within seconds instead of minutes.
ECHO_WAIT_CAP_SECONDS = 15.0


class Outcome(enum.StrEnum):
    PASSED = "passed"
    WARNING = "warning"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class EchoStep:
    """One check of the Echo report."""

    name: str
    title: str
    outcome: Outcome
    duration_ms: float
    detail: str
    action: str = ""
    data: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "title": self.title,
            "outcome": self.outcome.value,
            "duration_ms": round(self.duration_ms, 1),
            "detail": self.detail,
            "action": self.action,
            "data": self.data,
        }


@dataclass
class EchoReport:
    """The outcome of an Echo: which target, and each step in the order run."""

    host: str
    port: int
    calling_ae_title: str
    called_ae_title: str
    secured: bool
    steps: list[EchoStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the association was accepted and C-ECHO succeeded."""
        by_name = {step.name: step for step in self.steps}
        echo = by_name.get("c-echo")
        association = by_name.get("association")
        return (
            association is not None
            and association.outcome == Outcome.PASSED
            and echo is not None
            and echo.outcome in (Outcome.PASSED, Outcome.WARNING)
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "host": self.host,
            "port": self.port,
            "calling_ae_title": self.calling_ae_title,
            "called_ae_title": self.called_ae_title,
            "secured": self.secured,
            "steps": [step.as_dict() for step in self.steps],
        }


class _StepTimer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


def _failed_step(name: str, title: str, timer: _StepTimer, failure: Failure) -> EchoStep:
    return EchoStep(
        name=name,
        title=title,
        outcome=Outcome.FAILED,
        duration_ms=timer.elapsed_ms(),
        detail=failure.summary,
        action=failure.action,
        data={"failure": failure.as_dict()},
    )


def _skip_rest(report: EchoReport, names: list[tuple[str, str]], reason: str) -> None:
    for name, title in names:
        report.steps.append(EchoStep(name, title, Outcome.SKIPPED, 0.0, reason))


_STEPS = [
    ("tcp-connect", "TCP connection"),
    ("tls-handshake", "TLS handshake"),
    ("association", "Association"),
    ("c-echo", "C-ECHO"),
    ("release", "Release"),
]


def _tls_step(endpoint: Endpoint) -> EchoStep:
    assert endpoint.tls is not None
    timer = _StepTimer()
    try:
        result = probe_endpoint_tls(endpoint)
    except TlsConfigurationError as exc:
        failure = Failure(FailureKind.TLS, f"TLS is not set up correctly: {exc}.", "Fix the TLS settings.", False)
        return _failed_step("tls-handshake", "TLS handshake", timer, failure)
    except TlsFailure as exc:
        return _failed_step("tls-handshake", "TLS handshake", timer, exc.failure)

    peer = result.peer
    detail = f"{result.protocol} with {result.cipher}"
    outcome = Outcome.PASSED
    action = ""
    if peer is not None:
        detail += (
            f"; SCP certificate {peer.subject}, valid until {peer.not_after:%Y-%m-%d}, "
            f"SHA-256 {colon_fingerprint(peer.fingerprint)}; {result.trust}"
        )
        if peer.not_after - datetime.datetime.now(datetime.UTC) < EXPIRY_WARNING:
            outcome = Outcome.WARNING
            action = "The SCP's certificate expires within 30 days: ask the PACS admin to renew it."
    if endpoint.tls.mode == TlsMode.ENCRYPTION_ONLY and not endpoint.tls.pinned_fingerprint:
        outcome = Outcome.WARNING
        action = "Compare this fingerprint with the PACS admin, then confirm it to pin it."
    if endpoint.tls.legacy_ciphers:
        detail += "; legacy cipher profile (weaker)"
    return EchoStep(
        "tls-handshake",
        "TLS handshake",
        outcome,
        timer.elapsed_ms(),
        detail,
        action=action,
        data=result.as_dict(),
    )


def echo(endpoint: Endpoint, *, on_step: Callable[[EchoStep], None] | None = None) -> EchoReport:
    """Run the Echo steps against `endpoint` and return the report.

    `on_step` is called as each step finishes, so a terminal or web page can
    show progress while the remaining steps run.
    """
    endpoint = endpoint.capped(ECHO_WAIT_CAP_SECONDS)
    report = EchoReport(
        host=endpoint.host,
        port=endpoint.port,
        calling_ae_title=endpoint.calling_ae_title,
        called_ae_title=endpoint.called_ae_title,
        secured=endpoint.tls is not None,
    )

    def add(step: EchoStep) -> None:
        report.steps.append(step)
        if on_step is not None:
            on_step(step)

    # Step 1: a plain TCP connection separates network problems from DICOM ones.
    timer = _StepTimer()
    failure = probe_tcp(endpoint)
    steps = _STEPS if endpoint.tls is not None else [step for step in _STEPS if step[0] != "tls-handshake"]
    if failure is not None:
        add(_failed_step("tcp-connect", "TCP connection", timer, failure))
        _skip_rest(report, steps[1:], "Skipped because the TCP connection failed.")
        return report
    add(
        EchoStep(
            "tcp-connect",
            "TCP connection",
            Outcome.PASSED,
            timer.elapsed_ms(),
            f"Connected to {endpoint.host} port {endpoint.port}.",
        )
    )

    # Step 2 (TLS only): a separate handshake, so TLS problems are reported apart
    # from DICOM ones and the certificate can be shown for confirmation.
    if endpoint.tls is not None:
        step = _tls_step(endpoint)
        add(step)
        if step.outcome == Outcome.FAILED:
            _skip_rest(report, steps[2:], "Skipped because the TLS handshake failed.")
            return report

    # Step 3: the association request with our calling and their called AE title.
    timer = _StepTimer()
    try:
        assoc = open_association(endpoint, [build_context(Verification)])
    except DicomNetworkError as exc:
        add(_failed_step("association", "Association", timer, exc.failure))
        _skip_rest(report, steps[-2:], "Skipped because the association was not established.")
        return report
    add(
        EchoStep(
            "association",
            "Association",
            Outcome.PASSED,
            timer.elapsed_ms(),
            f"The SCP accepted calling AE title {endpoint.calling_ae_title!r} and called AE title "
            f"{endpoint.called_ae_title!r}.",
            data={"max_pdu_length": assoc.acceptor.maximum_length},
        )
    )

    # Step 4: C-ECHO itself.
    timer = _StepTimer()
    try:
        status = assoc.send_c_echo()
    except (OSError, RuntimeError) as exc:
        status = None
        LOGGER.warning("C-ECHO to %s raised %s", endpoint.address, exc)
    if status is None or "Status" not in status:
        add(
            EchoStep(
                "c-echo",
                "C-ECHO",
                Outcome.FAILED,
                timer.elapsed_ms(),
                f"No C-ECHO response within {endpoint.dimse_timeout:g} s, or the connection closed.",
                action="Check the SCP's log; raise the DIMSE timeout if the SCP is slow.",
            )
        )
        assoc.abort()
        _skip_rest(report, steps[-1:], "Skipped because C-ECHO failed.")
        return report
    meaning = describe_status(int(status.Status), service="verification")
    outcome = {
        "success": Outcome.PASSED,
        "warning": Outcome.WARNING,
    }.get(meaning.category.value, Outcome.FAILED)
    add(
        EchoStep(
            "c-echo",
            "C-ECHO",
            outcome,
            timer.elapsed_ms(),
            f"C-ECHO status 0x{meaning.code:04X}: {meaning.meaning}.",
            data={"status": meaning.code},
        )
    )

    # Step 5: an orderly release; some SCPs drop the connection instead.
    timer = _StepTimer()
    assoc.release()
    if assoc.is_released:
        add(EchoStep("release", "Release", Outcome.PASSED, timer.elapsed_ms(), "The association was released."))
    else:
        add(
            EchoStep(
                "release",
                "Release",
                Outcome.WARNING,
                timer.elapsed_ms(),
                "The SCP did not confirm the release; the connection was closed.",
                action="Harmless for Echo, but check the SCP's log if it repeats.",
            )
        )
    LOGGER.info("echo %s: %s", endpoint.address, "ok" if report.ok else "failed")
    return report
