"""Network and association failures decoded into words an admin can act on.

Association rejection codes follow PS3.8 Table 9-21 (A-ASSOCIATE-RJ), abort
codes PS3.8 Table 9-26 (A-ABORT) and Table 9-27 (A-P-ABORT).
"""

from __future__ import annotations

import enum
import errno
import socket
from dataclasses import dataclass, field


class FailureKind(enum.StrEnum):
    DNS = "dns"
    CONNECTION_REFUSED = "connection-refused"
    CONNECTION_TIMEOUT = "connection-timeout"
    NETWORK = "network"
    ACSE_TIMEOUT = "acse-timeout"
    REJECTED = "rejected"
    ABORTED = "aborted"
    NO_PRESENTATION_CONTEXT = "no-presentation-context"
    DIMSE_TIMEOUT = "dimse-timeout"
    CONNECTION_LOST = "connection-lost"
    ENCODING = "encoding"
    # The instance could not be prepared as the connection requires (character set, undecodable pixels, ...).
    PREPARATION = "preparation"
    TLS = "tls"


@dataclass(frozen=True)
class Failure:
    """A decoded failure: its kind, whether a retry may help, and the action for the admin."""

    kind: FailureKind
    summary: str
    action: str
    transient: bool
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return f"{self.summary} {self.action}"

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "summary": self.summary,
            "action": self.action,
            "transient": self.transient,
            "codes": dict(self.codes),
        }


class DicomNetworkError(Exception):
    """Raised when an association cannot be set up or breaks off."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(failure.message)


# (source, reason) -> (short name, explanation and fix). Source 1 is the
# DICOM UL service-user, 2 the ACSE part of the provider, 3 its presentation part.
_REJECT_REASONS: dict[tuple[int, int], tuple[str, str]] = {
    (1, 1): (
        "no reason given",
        "The SCP gave no reason. Most often it does not know our calling AE title or our address: "
        "ask the PACS admin to register the calling AE title {calling!r} with this host's address, "
        "and check the SCP's log.",
    ),
    (1, 2): (
        "application context name not supported",
        "The SCP does not support the DICOM application context. Check that the port belongs to a DICOM service.",
    ),
    (1, 3): (
        "calling AE title not recognized",
        "The SCP does not know our calling AE title {calling!r}. Ask the PACS admin to add it, "
        "spelled exactly so (case included), with this host's address.",
    ),
    (1, 7): (
        "called AE title not recognized",
        "The SCP does not answer to the called AE title {called!r}. Enter the AE title exactly as it is "
        "configured on the SCP (case included).",
    ),
    (2, 1): ("no reason given", "The SCP's DICOM stack rejected the request. Check the SCP's log."),
    (2, 2): (
        "protocol version not supported",
        "The SCP does not support DICOM protocol version 1. Check that the port belongs to a DICOM service.",
    ),
    (3, 1): (
        "temporary congestion",
        "The SCP is busy. Try again later, or ask the PACS admin to allow more simultaneous associations.",
    ),
    (3, 2): (
        "local limit exceeded",
        "The SCP has reached its limit of associations. Try again later, or ask the PACS admin to raise the limit.",
    ),
}

_SOURCE_NAMES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}

_PROVIDER_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


def decode_rejection(result: int, source: int, reason: int, *, calling: str, called: str) -> Failure:
    """Decode an A-ASSOCIATE-RJ (result, source, reason) into a `Failure`."""
    transient = result == 2
    result_name = "transient" if transient else "permanent"
    source_name = _SOURCE_NAMES.get(source, f"source {source}")
    reason_name, action = _REJECT_REASONS.get(
        (source, reason), (f"reason {reason}", "Check the SCP's log for the cause.")
    )
    return Failure(
        kind=FailureKind.REJECTED,
        summary=f"The SCP rejected the association ({result_name}, by the {source_name}: {reason_name}).",
        action=action.format(calling=calling, called=called),
        transient=transient,
        codes={"result": result, "source": source, "reason": reason},
    )


def decode_abort(source: int | None, reason: int | None) -> Failure:
    """Decode an A-ABORT (source 0 user, 2 provider) or an A-P-ABORT (source None)."""
    reason_text = _PROVIDER_ABORT_REASONS.get(reason or 0, f"reason {reason}")
    if source == 0:
        summary = "The SCP aborted the association."
        action = "Check the SCP's log: it often aborts when it does not accept our calling AE title or the data."
    else:
        summary = f"The association was aborted by the DICOM protocol layer ({reason_text})."
        action = "Check that the host and port belong to a DICOM service and that TLS settings match on both sides."
    codes = {key: value for key, value in (("source", source), ("reason", reason)) if value is not None}
    return Failure(FailureKind.ABORTED, summary, action, transient=True, codes=codes)


def decode_socket_error(exc: BaseException, host: str, port: int, timeout: float) -> Failure:
    """Decode an exception raised while opening a TCP connection."""
    if isinstance(exc, socket.gaierror):
        return Failure(
            FailureKind.DNS,
            f"The host name {host!r} could not be resolved ({exc.strerror}).",
            "Check the spelling of the host, or enter its IP address.",
            transient=True,
        )
    if isinstance(exc, ConnectionRefusedError):
        return Failure(
            FailureKind.CONNECTION_REFUSED,
            f"Connection to {host} port {port} was refused: nothing is listening there.",
            "Check the host and port, and that the DICOM service is running.",
            transient=True,
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Failure(
            FailureKind.CONNECTION_TIMEOUT,
            f"No answer from {host} port {port} within {timeout:g} s.",
            "A firewall probably drops the packets: ask the network admin to allow TCP from this host's "
            "address to that port, and check the host and port.",
            transient=True,
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Failure(
            FailureKind.NETWORK,
            f"{host} cannot be reached from here ({exc.strerror}).",
            "Check the host address and the network route to it.",
            transient=True,
        )
    return Failure(
        FailureKind.NETWORK,
        f"Connecting to {host} port {port} failed: {exc}.",
        "Check the host, the port and the network path.",
        transient=True,
    )
