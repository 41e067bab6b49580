"""Open associations with a connection's AE titles, timeouts and local address.

Every socket operation runs under a deadline: the connection timeout bounds
the TCP connect, the ACSE timeout the association and release, the DIMSE
timeout each response, and the network timeout bounds idle reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
from pacsbridge.tls.context import (
    TlsConfigurationError,
    TlsMode,
    TlsSettings,
    build_client_context,
    sha256_fingerprint,
)

if TYPE_CHECKING:
    from pacsbridge.tls.handshake import HandshakeResult

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
    # None for plain DICOM (TLS inactive).
    tls: TlsSettings | None = None
    # In encryption-only mode, refuse to associate until an admin has pinned
    # a fingerprint. Forwarding sets this; Echo and the command line do not,
    # so that they can show the fingerprint for confirmation.
    require_pin: bool = False

    @classmethod
    def from_settings(
        cls,
        settings: ConnectionSettings,
        *,
        bind_address: str | None = None,
        client_certificate: Path | None = None,
        client_key: Path | None = None,
        require_pin: bool = False,
    ) -> Endpoint:
        """Build the endpoint of a stored connection, with TLS settings unless its TLS mode is inactive.

        `client_certificate` and `client_key` are PEM files, used only with TLS.
        pacsbridge.tls.endpoints.endpoint_for supplies them for SCU authentication.
        """
        tls = None
        if settings.tls_mode != "inactive":
            tls = TlsSettings(
                mode=TlsMode(str(settings.tls_mode)),
                scp_certificate_pem=settings.scp_certificate_pem,
                pinned_fingerprint=settings.pinned_fingerprint,
                client_certificate=client_certificate,
                client_key=client_key,
                server_name=settings.server_name,
                check_hostname=settings.check_hostname,
                legacy_ciphers=settings.legacy_ciphers,
            )
        return cls(
            host=settings.host,
            port=settings.port,
            calling_ae_title=settings.calling_ae_title,
            called_ae_title=settings.called_ae_title,
            acse_timeout=settings.acse_timeout,
            dimse_timeout=settings.dimse_timeout,
            connection_timeout=settings.connection_timeout,
            bind_address=bind_address,
            tls=tls,
            require_pin=require_pin,
        )

    def capped(self, seconds: float) -> Endpoint:
        """Return a copy whose connect and association waits are at most `seconds`."""
        return dataclasses.replace(
            self,
            acse_timeout=min(self.acse_timeout, seconds),
            connection_timeout=min(self.connection_timeout, seconds),
        )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.called_ae_title}@{host}:{self.port}"


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
        # pynetdicom 3.0.4 report an abort without the rejection. The decoded
        # PDU still contains the result, source and reason.
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
    # The network timeout closes an association that stays idle. It also
    # bounds a peer that stops reading or responding.
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
        if endpoint.tls is not None:
            return _diagnose_tls(endpoint)
        return Failure(
            FailureKind.NETWORK,
            f"Could not open a connection to {endpoint.host} port {endpoint.port}.",
            "Check the host, the port and the network path.",
            transient=True,
        )
    if endpoint.tls is None and assoc.acceptor.primitive is None and _speaks_tls(endpoint):
        return Failure(
            FailureKind.TLS,
            f"The SCP at {endpoint.host} port {endpoint.port} expects DICOM-TLS, and this connection uses plain DICOM.",
            "Turn TLS on for this connection: --tls active with --scp-cert FILE, or --tls encryption-only "
            "to see the SCP's certificate first.",
            transient=False,
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
            "The SCP does not support the requested service (for example Storage or Modality Worklist "
            "Information Model - FIND) with these transfer syntaxes: check its configuration.",
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


def _speaks_tls(endpoint: Endpoint) -> bool:
    """Tell whether a TLS handshake succeeds at `endpoint`, to explain a plain association that broke off."""
    from pacsbridge.tls.handshake import TlsFailure

    try:
        probe_endpoint_tls(
            dataclasses.replace(endpoint, tls=TlsSettings(TlsMode.ENCRYPTION_ONLY)).capped(5.0)
        )
    except (TlsFailure, OSError):
        return False
    return True


def probe_endpoint_tls(endpoint: Endpoint) -> HandshakeResult:
    """Make a separate TLS handshake with `endpoint` from its bind address; raise TlsFailure with the reason."""
    from pacsbridge.tls.handshake import probe_tls

    if endpoint.tls is None:
        raise ValueError(f"{endpoint.address} has TLS inactive: there is no handshake to probe")
    return probe_tls(
        endpoint.host,
        endpoint.port,
        endpoint.tls,
        timeout=endpoint.connection_timeout,
        bind_address=endpoint.bind_address,
    )


def _diagnose_tls(endpoint: Endpoint) -> Failure:
    from pacsbridge.tls.handshake import TlsFailure

    try:
        probe_endpoint_tls(endpoint)
    except TlsFailure as exc:
        return exc.failure
    return Failure(
        FailureKind.TLS,
        "The TLS connection failed during association set-up, though a separate handshake succeeded.",
        "Check the SCP's TLS log; it may limit connections per client.",
        transient=True,
    )


def peer_certificate_der(assoc: Association) -> bytes | None:
    """Return the SCP's certificate (DER) of a TLS association, or None for plain DICOM."""
    sock = getattr(assoc.dul.socket, "socket", None)
    getpeercert = getattr(sock, "getpeercert", None)
    return getpeercert(binary_form=True) if getpeercert else None


def _check_peer(assoc: Association, endpoint: Endpoint) -> None:
    """Abort `assoc` unless the peer certificate is the pinned one (encryption-only mode)."""
    from pacsbridge.tls.handshake import pin_failure

    tls = endpoint.tls
    if tls is None or tls.mode != TlsMode.ENCRYPTION_ONLY:
        return
    der = peer_certificate_der(assoc)
    seen = sha256_fingerprint(der) if der else ""
    failure = pin_failure(tls, seen)
    if failure is None and endpoint.require_pin and not tls.pinned_fingerprint:
        failure = Failure(
            FailureKind.TLS,
            "The SCP's certificate has not been confirmed yet (encryption-only mode).",
            "Run Echo, compare the SHA-256 fingerprint with the PACS admin, and confirm it.",
            transient=False,
        )
    if failure is not None:
        assoc.abort()
        LOGGER.warning("TLS peer check failed for %s: %s", endpoint.address, failure.summary)
        raise DicomNetworkError(failure)


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
    if endpoint.tls is not None:
        try:
            context = build_client_context(endpoint.tls)
        except TlsConfigurationError as exc:
            raise DicomNetworkError(
                Failure(FailureKind.TLS, f"TLS is not set up correctly: {exc}.", "Fix the TLS settings.", False)
            ) from None
        kwargs["tls_args"] = (context, endpoint.tls.server_name or endpoint.host)
    assoc = ae.associate(endpoint.host, endpoint.port, **kwargs)
    if assoc.is_established:
        # pynetdicom 3.0.4 leaves the socket blocking once connected, so a peer
        # that stops reading would block a C-STORE send for ever. A deadline on
        # every socket operation turns that into a timeout and an abort.
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.settimeout(max(endpoint.dimse_timeout, endpoint.acse_timeout))
        _check_peer(assoc, endpoint)
        _bound_send_queue(assoc)
        LOGGER.info(
            "association established with %s (%d contexts accepted, %s)",
            endpoint.address,
            len(assoc.accepted_contexts),
            "plain" if endpoint.tls is None else endpoint.tls.description,
        )
        return assoc
    failure = _diagnose(assoc, watcher, endpoint)
    LOGGER.warning("association with %s failed: %s", endpoint.address, failure.summary)
    raise DicomNetworkError(failure)


# P-DATA PDUs that may wait to be written to the socket. pynetdicom 3.0.4 queues
# every PDU of a data set at once, so a 1 GB loop streamed from its file would
# otherwise sit in memory until the peer has read it.
MAX_QUEUED_PDUS = 64


def _bound_send_queue(assoc: Association) -> None:
    """Make the DICOM upper layer of `assoc` wait while MAX_QUEUED_PDUS PDUs are still unsent."""
    dul = assoc.dul
    queue_send = dul.send_pdu

    def send_pdu(primitive: object) -> None:
        while dul.to_provider_queue.qsize() >= MAX_QUEUED_PDUS and dul.is_alive() and not assoc.is_aborted:
            time.sleep(0.001)
        queue_send(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]


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
