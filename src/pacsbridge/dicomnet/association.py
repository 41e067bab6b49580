"""Open associations with a connection's AE titles, timeouts and local address.

Every socket operation runs under a deadline: the connection timeout bounds
the TCP connect, the ACSE timeout the association and release, the DIMSE
timeout each response, and the network timeout bounds idle reads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pynetdicom import AE, Association, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext

from pacsbridge.connections import ConnectionSettings
from pacsbridge.dicomnet.failures import (
    DicomNetworkError,
    Failure,
    FailureKind,
    decode_abort,
    decode_rejection,
    decode_socket_error,
)

LOGGER = logging.getLogger(__name__)

# PS3.7 limits a PDU to what the peer announces; 0 means "no limit" in
# pynetdicom, and some older SCPs reject that, so a common finite value is set.
MAX_PDU_LENGTH = 131_072


@dataclass(frozen=True)
class Endpoint:
    """The network side of a connection: where to connect and how long to wait."""

    host: str
    port: int
    calling_ae_title: str
    called_ae_title: str
    acse_timeout: float = 300.0
    dimse_timeout: float = 300.0
    connection_timeout: float = 300.0
    # Local address to bind outgoing connections to, for a fixed egress address.
    bind_address: str | None = None
    # TLS: a client-side SSLContext and the server name to send, once TLS is set up.
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None

    @classmethod
    def from_settings(cls, settings: ConnectionSettings, *, bind_address: str | None = None) -> Endpoint:
        return cls(
            host=settings.host,
            port=settings.port,
            calling_ae_title=settings.calling_ae_title,
            called_ae_title=settings.called_ae_title,
            acse_timeout=settings.acse_timeout,
            dimse_timeout=settings.dimse_timeout,
            connection_timeout=settings.connection_timeout,
            bind_address=bind_address,
        )

    def capped(self, seconds: float) -> Endpoint:
        """Return a copy whose connect and association waits are at most `seconds`."""
        return Endpoint(
            host=self.host,
            port=self.port,
            calling_ae_title=self.calling_ae_title,
            called_ae_title=self.called_ae_title,
            acse_timeout=min(self.acse_timeout, seconds),
            dimse_timeout=self.dimse_timeout,
            connection_timeout=min(self.connection_timeout, seconds),
            bind_address=self.bind_address,
            ssl_context=self.ssl_context,
            server_name=self.server_name,
        )

    @property
    def address(self) -> str:
        return f"{self.called_ae_title}@{self.host}:{self.port}"


def probe_tcp(endpoint: Endpoint) -> Failure | None:
    """Open and close a TCP connection to `endpoint`; return the failure, if any."""
    source = (endpoint.bind_address, 0) if endpoint.bind_address else None
    try:
        sock = socket.create_connection(
            (endpoint.host, endpoint.port), timeout=endpoint.connection_timeout, source_address=source
        )
    except OSError as exc:
        return decode_socket_error(exc, endpoint.host, endpoint.port, endpoint.connection_timeout)
    sock.close()
    return None


class _AssociationWatcher:
    """Record what happened during association set-up, for diagnosis."""

    def __init__(self) -> None:
        self.connected = False
        self.abort: A_ABORT | A_P_ABORT | None = None
        self.rejection: A_ASSOCIATE_RJ | None = None

    def handlers(self) -> list[tuple[evt.NotificationEvent, object]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ACSE_RECV, self._on_acse),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True

    def _on_pdu(self, event: evt.Event) -> None:
        # A peer that closes the connection right after A-ASSOCIATE-RJ can make
        # pynetdicom 3.0.4 report an abort without the rejection; the PDU as
        # decoded still carries the result, source and reason.
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.rejection = pdu

    def _on_acse(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, (A_ABORT, A_P_ABORT)):
            self.abort = primitive


def _make_ae(endpoint: Endpoint) -> AE:
    ae = AE(ae_title=endpoint.calling_ae_title)
    ae.acse_timeout = endpoint.acse_timeout
    ae.dimse_timeout = endpoint.dimse_timeout
    ae.connection_timeout = endpoint.connection_timeout
    # The network timeout closes an association that stays idle; it also
    # bounds a peer that stops reading or answering.
    ae.network_timeout = max(endpoint.dimse_timeout, endpoint.acse_timeout)
    ae.maximum_pdu_size = MAX_PDU_LENGTH
    return ae


def _diagnose(assoc: Association, watcher: _AssociationWatcher, endpoint: Endpoint) -> Failure:
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        rsp = assoc.acceptor.primitive
        codes = (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))
    elif watcher.rejection is not None:
        pdu = watcher.rejection
        codes = (int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
    else:
        codes = None
    if codes is not None:
        return decode_rejection(*codes, calling=endpoint.calling_ae_title, called=endpoint.called_ae_title)
    if not watcher.connected:
        failure = probe_tcp(endpoint)
        if failure is not None:
            return failure
        return Failure(
            FailureKind.NETWORK,
            f"Could not open a connection to {endpoint.host} port {endpoint.port}.",
            "Check the host, the port and the network path.",
            transient=True,
        )
    if watcher.abort is not None:
        if isinstance(watcher.abort, A_P_ABORT):
            return decode_abort(None, watcher.abort.provider_reason)
        # pynetdicom's A_ABORT primitive keeps the source but not the reason.
        return decode_abort(watcher.abort.abort_source, None)
    if assoc.is_aborted and assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        return Failure(
            FailureKind.NO_PRESENTATION_CONTEXT,
            "The SCP accepted the association but none of the proposed presentation contexts.",
            "The SCP does not support this service or these transfer syntaxes: check its configuration "
            "for the SOP classes being sent.",
            transient=False,
        )
    if assoc.acceptor.primitive is None:
        return Failure(
            FailureKind.ACSE_TIMEOUT,
            f"The SCP accepted the TCP connection but did not answer the association request "
            f"within {endpoint.acse_timeout:g} s.",
            "Check that the port belongs to a DICOM service and whether it expects TLS.",
            transient=True,
        )
    return Failure(
        FailureKind.CONNECTION_LOST,
        "The connection closed during association set-up.",
        "Check that the port belongs to a DICOM service and whether it expects TLS.",
        transient=True,
    )


def open_association(endpoint: Endpoint, contexts: Sequence[PresentationContext]) -> Association:
    """Request an association and return it once established.

    Raises `DicomNetworkError` with the decoded reason when the connection,
    the association request or the presentation context negotiation fails.
    """
    ae = _make_ae(endpoint)
    ae.requested_contexts = list(contexts)
    watcher = _AssociationWatcher()
    kwargs: dict[str, object] = {"ae_title": endpoint.called_ae_title, "evt_handlers": watcher.handlers()}
    if endpoint.bind_address:
        kwargs["bind_address"] = (endpoint.bind_address, 0)
    if endpoint.ssl_context is not None:
        kwargs["tls_args"] = (endpoint.ssl_context, endpoint.server_name or endpoint.host)
    assoc = ae.associate(endpoint.host, endpoint.port, **kwargs)
    if assoc.is_established:
        LOGGER.info("association established with %s (%d contexts accepted)", endpoint.address,
                    len(assoc.accepted_contexts))
        return assoc
    failure = _diagnose(assoc, watcher, endpoint)
    LOGGER.warning("association with %s failed: %s", endpoint.address, failure.summary)
    raise DicomNetworkError(failure)


@contextlib.contextmanager
def association(endpoint: Endpoint, contexts: Sequence[PresentationContext]) -> Iterator[Association]:
    """Open an association for the `with` block; release it afterwards, or abort on error."""
    assoc = open_association(endpoint, contexts)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    else:
        if assoc.is_established:
            assoc.release()
