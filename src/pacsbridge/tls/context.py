"""TLS client contexts for DICOM associations, and the checks made on the peer.

Two modes secure a connection:

- active: the SCP certificate the admin uploaded is the trust anchor. A leaf
  certificate works alone (X509_V_FLAG_PARTIAL_CHAIN), and host name checking
  is off unless asked for, because hospital certificates often name internal
  hosts or nothing at all.
- encryption-only: for endpoints whose admin cannot hand over a certificate.
  The chain is not verified; instead the SHA-256 fingerprint of the peer
  certificate must equal the one an admin confirmed. Without a confirmed
  fingerprint, only Echo and the command line may connect, to show it.

Cipher suites follow BCP 195 (RFC 9325): TLS 1.2 or newer, and for TLS 1.2
only ECDHE or DHE key exchange with AEAD ciphers. A legacy profile for old
TLS stacks adds CBC suites with forward secrecy and is flagged as weaker.
"""

from __future__ import annotations

import enum
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

# TLS 1.2 suites of the BCP 195 recommendations; TLS 1.3 suites are
# OpenSSL's defaults, which are all AEAD.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
# Legacy profile: adds CBC suites with forward secrecy for stacks that have no AEAD.
LEGACY_CIPHERS = BCP195_CIPHERS + ":ECDHE+AES:DHE+AES:!SHA1:@SECLEVEL=1"


class TlsMode(enum.StrEnum):
    ACTIVE = "active"
    ENCRYPTION_ONLY = "encryption-only"


class TlsConfigurationError(ValueError):
    """Raised when TLS settings cannot make a context: the message names the setting."""


@dataclass(frozen=True)
class TlsSettings:
    mode: TlsMode
    # PEM text of the SCP certificate or chain (the trust anchor in active mode).
    scp_certificate_pem: str | None = None
    # SHA-256 of the SCP certificate confirmed by an admin, lower-case hex.
    pinned_fingerprint: str | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    check_hostname: bool = False
    legacy_ciphers: bool = False

    @property
    def description(self) -> str:
        text = "TLS, SCP certificate verified" if self.mode == TlsMode.ACTIVE else "TLS, encryption only"
        if self.legacy_ciphers:
            text += " (legacy cipher profile: weaker)"
        return text


def sha256_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def build_client_context(settings: TlsSettings) -> ssl.SSLContext:
    """Return a client SSLContext for `settings`; raise TlsConfigurationError naming what is missing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers(LEGACY_CIPHERS if settings.legacy_ciphers else BCP195_CIPHERS)
    except ssl.SSLError as exc:
        raise TlsConfigurationError(f"the cipher profile is not supported by this OpenSSL: {exc}") from None

    if settings.mode == TlsMode.ACTIVE:
        if not settings.scp_certificate_pem:
            raise TlsConfigurationError(
                "TLS mode 'active' needs the SCP's certificate: give it with --scp-cert FILE, "
                "or use --tls encryption-only"
            )
        try:
            context.load_verify_locations(cadata=settings.scp_certificate_pem)
        except ssl.SSLError as exc:
            raise TlsConfigurationError(f"the SCP certificate could not be loaded: {exc}") from None
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.check_hostname = settings.check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    if settings.client_certificate or settings.client_key:
        if not (settings.client_certificate and settings.client_key):
            raise TlsConfigurationError("a client certificate needs both --client-cert FILE and --client-key FILE")
        try:
            context.load_cert_chain(settings.client_certificate, settings.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigurationError(
                f"the client certificate {settings.client_certificate} or key {settings.client_key} "
                f"could not be loaded: {exc}"
            ) from None
    return context
