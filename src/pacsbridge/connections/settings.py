"""Connection settings for a PACS/VNA (storage SCP) or a Modality Worklist SCP.

`ConnectionSettings` contains every field an admin sets. `validate_settings` checks
them all at once and returns the problems it found, each naming the field, the
value and the fix. Nothing is stored until `ValidationReport.ok` is true.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import zoneinfo
from dataclasses import dataclass, field

from pacsbridge.connections.aetitle import check_ae_title
from pacsbridge.connections.certificates import check_scp_certificate_pem
from pacsbridge.connections.charset import check_character_set
from pacsbridge.connections.problems import Problem, ValidationReport

DEFAULT_TIMEOUT_SECONDS = 300.0
MAX_TIMEOUT_SECONDS = 86_400.0
DEFAULT_CHARACTER_SET = "ISO_IR 100"
# JPEG Baseline quality (libjpeg scale, 1 to 100). At 90 ultrasound frames keep
# more than 40 dB PSNR while the files shrink about tenfold (docs/conformance.md).
DEFAULT_JPEG_QUALITY = 90
# Below this quality block artefacts become visible on B-mode speckle.
LOW_JPEG_QUALITY = 75


class ConnectionKind(enum.StrEnum):
    PACS = "pacs"
    MWL = "mwl"


class TlsMode(enum.StrEnum):
    INACTIVE = "inactive"
    ACTIVE = "active"
    ENCRYPTION_ONLY = "encryption-only"


class ScuAuthentication(enum.StrEnum):
    ANONYMOUS = "anonymous"
    CLIENT_CERTIFICATE = "client-certificate"


class Compression(enum.StrEnum):
    AS_RECEIVED = "as-received"
    NONE = "none"
    JPEG_LOSSLESS = "jpeg-lossless"
    JPEG_BASELINE = "jpeg-baseline"


class MonochromeMode(enum.StrEnum):
    NEVER = "never"
    B_MODE_ONLY = "b-mode-only"


@dataclass
class ConnectionSettings:
    """Every field of one connection, as the admin entered it."""

    name: str
    kind: ConnectionKind
    host: str
    port: int
    calling_ae_title: str
    called_ae_title: str
    timezone: str = "UTC"
    character_set: str = DEFAULT_CHARACTER_SET
    tls_mode: TlsMode = TlsMode.INACTIVE
    # PEM text of the SCP certificate (or chain) the admin uploaded.
    scp_certificate_pem: str | None = None
    # SHA-256 of the SCP certificate confirmed in encryption-only mode, hex.
    pinned_fingerprint: str | None = None
    # TLS server name (SNI) to send and, with check_hostname, to check, instead of `host`.
    server_name: str | None = None
    # In active mode, also check that the SCP certificate names `server_name` or `host`.
    check_hostname: bool = False
    # Allow CBC cipher suites for old TLS stacks (weaker than the BCP 195 profile).
    legacy_ciphers: bool = False
    scu_authentication: ScuAuthentication = ScuAuthentication.ANONYMOUS
    image_compression: Compression = Compression.AS_RECEIVED
    loop_compression: Compression = Compression.AS_RECEIVED
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    monochrome: MonochromeMode = MonochromeMode.NEVER
    acse_timeout: float = DEFAULT_TIMEOUT_SECONDS
    dimse_timeout: float = DEFAULT_TIMEOUT_SECONDS
    connection_timeout: float = DEFAULT_TIMEOUT_SECONDS
    # True for endpoints that may receive test data only.
    test_only: bool = False
    worklist_filters: dict[str, object] = field(default_factory=dict)

    def replace(self, **changes: object) -> ConnectionSettings:
        return dataclasses.replace(self, **changes)

    @property
    def is_secured(self) -> bool:
        return self.tls_mode != TlsMode.INACTIVE


# RFC 1123 host name: labels of letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def normalize_fingerprint(text: object) -> str | None:
    """Return a SHA-256 fingerprint as 64 lower-case hex digits, or None when `text` is not one.

    Accepts the colon form that Echo and 'openssl x509 -fingerprint' print
    (such as 8E:BF:...), in any case and with spaces.
    """
    if not isinstance(text, str):
        return None
    compact = "".join(text.split()).replace(":", "").lower()
    return compact if _FINGERPRINT.match(compact) else None


def check_host(host: str, field_name: str = "host") -> list[Problem]:
    """Check that `host` is an IPv4/IPv6 address or an RFC 1123 host name."""
    if not host or not host.strip():
        return [Problem.error(field_name, host, "is empty", "Enter the host name or IP address of the SCP.")]
    if host != host.strip():
        return [Problem.error(field_name, host, "has leading or trailing spaces", "Remove the spaces.")]
    try:
        ipaddress.ip_address(host.strip("[]"))
        return []
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # An all-digit last label is a mistyped IPv4 address (such as 256.1.1.1),
    # never a host name: top-level domains are not numeric.
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return [
            Problem.error(
                field_name,
                host,
                "is neither an IP address nor a valid host name",
                "Use an IPv4 or IPv6 address, or a host name made of letters, digits, hyphens and dots.",
            )
        ]
    return []


def check_port(port: object) -> list[Problem]:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return [
            Problem.error(
                "port",
                port,
                "is not a TCP port",
                "Use a whole number from 1 to 65535 (104 and 11112 are common for DICOM, 2762 for DICOM-TLS).",
            )
        ]
    return []


def check_timezone(name: str) -> list[Problem]:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        return [
            Problem.error(
                "timezone",
                name,
                "is not an IANA time zone",
                "Use a name such as Europe/Berlin, America/New_York or UTC.",
            )
        ]
    return []


def check_timeout(field_name: str, value: object) -> list[Problem]:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_TIMEOUT_SECONDS
    ):
        return [
            Problem.error(
                field_name,
                value,
                "is not a valid timeout",
                f"Use a number of seconds greater than 0 and at most {MAX_TIMEOUT_SECONDS:.0f}; "
                f"the default is {DEFAULT_TIMEOUT_SECONDS:.0f}.",
            )
        ]
    return []


def check_jpeg_quality(value: object, *, used: bool = True) -> list[Problem]:
    """Check the JPEG Baseline quality: a whole number from 1 to 100.

    A quality below LOW_JPEG_QUALITY is warned about only when it is `used`, that is
    when images or loops are compressed as JPEG Baseline.
    """
    fix = f"Use a whole number from 1 to 100; the default is {DEFAULT_JPEG_QUALITY}."
    if isinstance(value, bool):
        return [Problem.error("jpeg_quality", value, "is not a whole number", fix)]
    try:
        quality = int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        return [Problem.error("jpeg_quality", value, "is not a whole number", fix)]
    if not isinstance(quality, int):
        return [Problem.error("jpeg_quality", value, "is not a whole number", fix)]
    if not 1 <= quality <= 100:
        return [Problem.error("jpeg_quality", value, "is outside 1 to 100", fix)]
    if used and quality < LOW_JPEG_QUALITY:
        return [
            Problem.warning(
                "jpeg_quality",
                value,
                f"is below {LOW_JPEG_QUALITY}: JPEG Baseline artefacts may show in ultrasound images",
                f"Keep {DEFAULT_JPEG_QUALITY} unless the PACS admin asks for smaller files.",
            )
        ]
    return []


def _check_enum(field_name: str, value: object, enum_type: type[enum.StrEnum]) -> list[Problem]:
    try:
        enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        return [Problem.error(field_name, value, "is not a known choice", f"Use one of: {allowed}.")]
    return []


def _check_tls(settings: ConnectionSettings) -> list[Problem]:
    problems: list[Problem] = []
    if settings.scp_certificate_pem:
        problems += check_scp_certificate_pem(settings.scp_certificate_pem)
    if settings.tls_mode == TlsMode.ACTIVE and not settings.scp_certificate_pem:
        problems.append(
            Problem.error(
                "scp_certificate",
                None,
                "is missing, but TLS mode 'active' verifies the SCP against it",
                "Upload the SCP's certificate (PEM or Base64 .cer), or choose TLS mode 'encryption-only'.",
            )
        )
    if settings.server_name is not None:
        problems += check_host(settings.server_name, "server_name")
    problems += _check_flag("check_hostname", settings.check_hostname)
    problems += _check_flag("legacy_ciphers", settings.legacy_ciphers)
    problems += _check_tls_options_used(settings)
    if settings.pinned_fingerprint is not None and normalize_fingerprint(settings.pinned_fingerprint) is None:
        problems.append(
            Problem.error(
                "pinned_fingerprint",
                settings.pinned_fingerprint,
                "is not a SHA-256 fingerprint",
                "Use the 64 hex digits that Echo reported, with or without colons (8E:BF:... or 8ebf...).",
            )
        )
    return problems


def _check_flag(field_name: str, value: object) -> list[Problem]:
    if not isinstance(value, bool):
        return [Problem.error(field_name, value, "is not true or false", "Use true or false.")]
    return []


def _check_tls_options_used(settings: ConnectionSettings) -> list[Problem]:
    """Warn about TLS options that the chosen TLS mode ignores, so that no admin relies on them."""
    problems: list[Problem] = []
    if settings.tls_mode == TlsMode.INACTIVE:
        ignored = [
            name
            for name, value in (
                ("server_name", settings.server_name),
                ("check_hostname", settings.check_hostname is True),
                ("legacy_ciphers", settings.legacy_ciphers is True),
            )
            if value
        ]
        if settings.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE:
            ignored.append("scu_authentication")
        for name in ignored:
            problems.append(
                Problem.warning(
                    name,
                    getattr(settings, name),
                    "has no effect while TLS is inactive",
                    "Choose TLS mode 'active' or 'encryption-only' to use it.",
                )
            )
    elif settings.tls_mode == TlsMode.ACTIVE and normalize_fingerprint(settings.pinned_fingerprint) is not None:
        problems.append(
            Problem.warning(
                "pinned_fingerprint",
                settings.pinned_fingerprint,
                "has no effect in TLS mode 'active', because a pin applies only in TLS mode 'encryption-only'",
                "Choose TLS mode 'encryption-only' to use the pin, or remove the pin.",
            )
        )
    if settings.tls_mode == TlsMode.ENCRYPTION_ONLY and settings.check_hostname is True:
        problems.append(
            Problem.warning(
                "check_hostname",
                True,
                "has no effect in TLS mode 'encryption-only', which checks the pinned fingerprint instead",
                "Choose TLS mode 'active' to check the host name against the SCP certificate.",
            )
        )
    return problems


def validate_settings(settings: ConnectionSettings) -> ValidationReport:
    """Check every field of `settings` and return all errors and warnings found."""
    problems: list[Problem] = []
    if not isinstance(settings.name, str) or not settings.name.strip():
        problems.append(
            Problem.error("name", settings.name, "is empty", "Give the connection a display name.")
        )
    problems += _check_enum("kind", settings.kind, ConnectionKind)
    problems += check_ae_title("calling_ae_title", settings.calling_ae_title)
    problems += check_ae_title("called_ae_title", settings.called_ae_title)
    problems += check_host(settings.host)
    problems += check_port(settings.port)
    problems += check_timezone(settings.timezone)
    problems += check_character_set("character_set", settings.character_set)
    problems += _check_enum("tls_mode", settings.tls_mode, TlsMode)
    problems += _check_enum("scu_authentication", settings.scu_authentication, ScuAuthentication)
    problems += _check_enum("image_compression", settings.image_compression, Compression)
    problems += _check_enum("loop_compression", settings.loop_compression, Compression)
    baseline = Compression.JPEG_BASELINE.value
    problems += check_jpeg_quality(
        settings.jpeg_quality, used=baseline in (str(settings.image_compression), str(settings.loop_compression))
    )
    problems += _check_enum("monochrome", settings.monochrome, MonochromeMode)
    for name in ("acse_timeout", "dimse_timeout", "connection_timeout"):
        problems += check_timeout(name, getattr(settings, name))
    problems += _check_tls(settings)
    return ValidationReport(problems)
