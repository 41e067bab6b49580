"""A TLS handshake probe for Echo, and a classification of TLS failures for admins."""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509

from pacsbridge.dicomnet.failures import Failure, FailureKind
from pacsbridge.tls.certificates import colon_fingerprint
from pacsbridge.tls.context import TlsMode, TlsSettings, build_client_context, sha256_fingerprint

# After a handshake in which the server requested a client certificate, wait
# this long for its verdict. A TLS 1.3 server reports a missing or rejected
# client certificate only after the client has finished, and nginx closes the
# connection without any alert.
_POST_HANDSHAKE_WAIT_SECONDS = 1.0


@dataclass
class PeerCertificate:
    subject: str
    issuer: str
    not_after: datetime.datetime
    fingerprint: str

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        cert = x509.load_der_x509_certificate(der)
        return cls(
            subject=cert.subject.rfc4514_string() or "(empty subject)",
            issuer=cert.issuer.rfc4514_string() or "(empty issuer)",
            not_after=cert.not_valid_after_utc,
            fingerprint=sha256_fingerprint(der),
        )

    @property
    def expired(self) -> bool:
        return self.not_after < datetime.datetime.now(datetime.UTC)

    def as_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": self.not_after.isoformat(),
            "expired": self.expired,
            "sha256": self.fingerprint,
            "sha256_display": colon_fingerprint(self.fingerprint),
        }


@dataclass
class HandshakeResult:
    protocol: str
    cipher: str
    peer: PeerCertificate | None
    # The relation of the peer certificate to what the admin configured.
    trust: str

    def as_dict(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "cipher": self.cipher,
            "peer_certificate": None if self.peer is None else self.peer.as_dict(),
            "trust": self.trust,
        }


class TlsFailure(Exception):
    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(failure.message)


def _failure(summary: str, action: str, *, transient: bool = False) -> Failure:
    return Failure(FailureKind.TLS, summary, action, transient=transient)


def pin_failure(settings: TlsSettings, seen: str) -> Failure | None:
    """Return a failure when the encryption-only pin does not match the fingerprint `seen`."""
    if settings.mode != TlsMode.ENCRYPTION_ONLY or not settings.pinned_fingerprint:
        return None
    if seen == settings.pinned_fingerprint:
        return None
    return _failure(
        f"The SCP's certificate is different from the pinned one: SHA-256 {colon_fingerprint(seen)} "
        f"instead of {colon_fingerprint(settings.pinned_fingerprint)}.",
        "Nothing is sent until an admin confirms the new certificate. Ask the PACS admin whether the "
        "certificate was replaced, then confirm the new fingerprint.",
    )


def classify_tls_error(exc: BaseException, *, settings: TlsSettings, certificate_requested: bool) -> Failure:
    """Tell TLS failures apart: no TLS, no common cipher, untrusted or expired, client certificate missing."""
    text = str(exc).lower()
    has_client_certificate = settings.client_certificate is not None
    if "certificate required" in text or (
        certificate_requested and not has_client_certificate and ("handshake failure" in text or "alert" in text)
    ):
        return _failure(
            "The SCP requires a client certificate, and none is configured.",
            "Turn on SCU authentication for this connection and give the hospital the organization's CA "
            "certificate (pacsbridge connections client-cert NAME --ca), or pass --client-cert FILE --client-key FILE.",
        )
    if "bad certificate" in text or "unknown ca" in text or "certificate unknown" in text:
        return _failure(
            "The SCP did not accept our client certificate.",
            "Give the hospital the certificate that issued it, to add to the SCP's trusted certificates: for "
            "certificates pacsbridge issued, the organization's CA certificate "
            "(pacsbridge connections client-cert NAME --ca). Never send the private key.",
        )
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        if "expired" in text:
            return _failure(
                "The SCP's certificate has expired.",
                "Ask the PACS admin to renew the certificate, then upload the new one.",
            )
        if "not yet valid" in text:
            return _failure(
                "The SCP's certificate is not valid yet: check the clock of both machines.",
                "Compare the certificate's start date with the current time on both sides.",
            )
        if "hostname mismatch" in text or "ip address mismatch" in text:
            expected = settings.server_name or "the host"
            return _failure(
                f"The SCP's certificate does not name {expected}, which host name checking expects.",
                "Set the server name to a name in the certificate, or turn host name checking off "
                "(the uploaded certificate is still verified).",
            )
        return _failure(
            "The SCP's certificate is not the uploaded one, nor signed by it (untrusted).",
            "Upload the certificate the SCP actually presents (Echo shows its subject), or its issuing CA.",
        )
    if "wrong version number" in text or "record layer failure" in text or "packet length too long" in text:
        return _failure(
            "The SCP does not speak TLS on this port.",
            "Check the port: DICOM-TLS often listens on 2762, plain DICOM on 104 or 11112. "
            "Or set TLS to inactive for a test endpoint.",
        )
    if (
        "unsupported protocol" in text
        or "no protocols available" in text
        or "no shared cipher" in text
        or "handshake failure" in text
        or "insufficient security" in text
        or "protocol version" in text
    ):
        return _failure(
            "The SCP and pacsbridge have no TLS protocol version or cipher suite in common.",
            "pacsbridge needs TLS 1.2 or newer with BCP 195 cipher suites. Ask the PACS admin to enable them, "
            "or choose the legacy cipher profile for this connection (weaker).",
        )
    if isinstance(exc, (ConnectionResetError, EOFError, ssl.SSLEOFError, ssl.SSLZeroReturnError)) or "eof" in text:
        return _failure(
            "The SCP closed the connection during the TLS handshake: it probably does not speak TLS on this port.",
            "Check the port and that the SCP has TLS enabled, or set TLS to inactive for a test endpoint.",
            transient=True,
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return _failure(
            "The TLS handshake timed out: the SCP does not answer TLS on this port.",
            "Check the port and that the SCP has TLS enabled.",
            transient=True,
        )
    return _failure(f"The TLS handshake failed: {exc}.", "Check the SCP's TLS settings and log.", transient=True)


def _trust_text(settings: TlsSettings, peer: PeerCertificate | None) -> str:
    if settings.mode == TlsMode.ACTIVE:
        return "verified against the uploaded SCP certificate"
    if peer is None:
        return "no certificate presented"
    if not settings.pinned_fingerprint:
        return "not pinned yet: confirm this fingerprint to pin it"
    return "matches the pinned fingerprint"


def _closed_after_certificate_request(settings: TlsSettings) -> Failure:
    if settings.client_certificate is None:
        return classify_tls_error(
            ssl.SSLError("certificate required"), settings=settings, certificate_requested=True
        )
    return classify_tls_error(ssl.SSLError("bad certificate"), settings=settings, certificate_requested=True)


def _with_presented_certificate(
    failure: Failure, host: str, port: int, server_name: str, timeout: float, bind_address: str | None
) -> Failure:
    """Add the certificate the SCP presents to a verification failure, so the admin can compare it."""
    context = build_client_context(TlsSettings(TlsMode.ENCRYPTION_ONLY))
    source = (bind_address, 0) if bind_address else None
    try:
        with socket.create_connection((host, port), timeout=timeout, source_address=source) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return failure
    if not der:
        return failure
    peer = PeerCertificate.from_der(der)
    names = _certificate_names(der)
    presented = (
        f" The SCP presents: subject {peer.subject}, issuer {peer.issuer}, valid until "
        f"{peer.not_after:%Y-%m-%d}, SHA-256 {colon_fingerprint(peer.fingerprint)}"
        + (f", names {', '.join(names)}" if names else "")
        + "."
    )
    return Failure(failure.kind, failure.summary + presented, failure.action, failure.transient, failure.codes)


def _certificate_names(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = extension.value.get_values_for_type(x509.DNSName)
    names += [str(address) for address in extension.value.get_values_for_type(x509.IPAddress)]
    return names


def probe_tls(
    host: str,
    port: int,
    settings: TlsSettings,
    *,
    timeout: float,
    bind_address: str | None = None,
) -> HandshakeResult:
    """Make a TLS handshake with the SCP and describe it; raise TlsFailure with the reason.

    `bind_address` is the local address to connect from, as for associations,
    so a firewall that admits one source address receives the probe from it.
    """
    context = build_client_context(settings)
    requested: list[bool] = []

    def watch(conn, direction, version, content_type, msg_type, data):  # noqa: ANN001
        if direction == "read" and msg_type == ssl._TLSMessageType.CERTIFICATE_REQUEST:
            requested.append(True)

    # The message callback is CPython's (since 3.8) and the only way to see
    # that the SCP asked for a client certificate before it ended the handshake.
    if hasattr(context, "_msg_callback"):
        context._msg_callback = watch

    server_name = settings.server_name or host
    try:
        source = (bind_address, 0) if bind_address else None
        raw = socket.create_connection((host, port), timeout=timeout, source_address=source)
    except OSError as exc:
        raise TlsFailure(_failure(f"Connecting for the TLS handshake failed: {exc}.", "Check host and port.")) from None
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            protocol, cipher = tls.version() or "", (tls.cipher() or ("", "", 0))[0]
            if requested:
                tls.settimeout(_POST_HANDSHAKE_WAIT_SECONDS)
                try:
                    if tls.recv(1) == b"":
                        raise TlsFailure(_closed_after_certificate_request(settings))
                except (TimeoutError, socket.timeout):
                    pass
    except (ssl.SSLError, OSError) as exc:
        failure = classify_tls_error(exc, settings=settings, certificate_requested=bool(requested))
        if isinstance(exc, ssl.SSLCertVerificationError):
            failure = _with_presented_certificate(failure, host, port, server_name, timeout, bind_address)
        raise TlsFailure(failure) from None
    finally:
        raw.close()

    peer = PeerCertificate.from_der(der) if der else None
    if peer is not None:
        mismatch = pin_failure(settings, peer.fingerprint)
        if mismatch is not None:
            raise TlsFailure(mismatch)
        if peer.expired and settings.mode == TlsMode.ENCRYPTION_ONLY:
            raise TlsFailure(
                _failure(
                    f"The SCP's certificate expired on {peer.not_after:%Y-%m-%d}.",
                    "Ask the PACS admin to renew the certificate, then confirm the new fingerprint.",
                )
            )
    return HandshakeResult(protocol=protocol, cipher=cipher, peer=peer, trust=_trust_text(settings, peer))
