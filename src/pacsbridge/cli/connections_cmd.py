"""`pacsbridge connections`: add, list, show and edit PACS and Modality Worklist connections.

It also runs Echo against a stored connection, pins the SCP certificate of an
encryption-only connection, and issues, rotates and exports the client
certificates of SCU authentication.

Invalid settings print one line per problem on stderr, in the form
"error: <field> <value>: <reason>. <fix>", and exit with status 2 without
storing anything. Warnings print as "warning: ..." and the connection is saved.
An unknown connection name exits with status 1.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import enum
import ipaddress
import json
import logging
import re
import shlex
import typing
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from cryptography import x509
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.cli.app import app
from pacsbridge.cli.common import command_actor
from pacsbridge.cli.echo_cmd import format_report
from pacsbridge.config import BIND_ADDRESS_ENV, DATA_DIR_ENV, AppConfig, ConfigError, load_config
from pacsbridge.connections import (
    ConnectionKind,
    ConnectionSettings,
    InvalidSettingsError,
    Problem,
    ScuAuthentication,
    Severity,
    TlsMode,
)
from pacsbridge.connections.settings import normalize_fingerprint
from pacsbridge.db import (
    ConnectionNotFoundError,
    ConnectionRecord,
    DatabaseError,
    check_connection,
    close_database,
    get_connection,
    list_connections,
    open_database,
    save_connection,
    to_settings,
    update_connection,
)
from pacsbridge.db.connections import DEFAULT_ORGANIZATION, find_organization, get_or_create_organization
from pacsbridge.db.forwarding import DeliveryState
from pacsbridge.db.models import CertificateAuthorityRecord, ClientCertificateRecord, ClientCertificateStatus
from pacsbridge.dicomnet.association import probe_endpoint_tls
from pacsbridge.dicomnet.echo import ECHO_WAIT_CAP_SECONDS, EchoReport, echo
from pacsbridge.forward.status import MAX_IDS_SHOWN, connection_delivery_ids, held_hint
from pacsbridge.ingest.archives import ArchiveError, delete_connection
from pacsbridge.tls.certificates import (
    MAX_UPLOAD_BYTES,
    CertificateError,
    CertificateInfo,
    colon_fingerprint,
    describe_certificate,
    parse_certificate_upload,
    sha256_fingerprint,
    write_output_file,
)
from pacsbridge.tls.client_ca import (
    DEFAULT_GRACE_DAYS,
    ClientCertificateError,
    ClientIdentity,
    authority_certificate_pem,
    effective_status,
    ensure_client_certificate,
    find_active_certificate,
    find_authority,
    reissue_all,
    rotate_client_certificate,
)
from pacsbridge.tls.endpoints import prepare_client_identity, stored_endpoint
from pacsbridge.tls.handshake import TlsFailure
from pacsbridge.tls.secret_key import SECRET_KEY_ENV, SecretKey, SecretKeyError, load_secret_key

LOGGER = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_INVALID = 2

connections_app = typer.Typer(
    name="connections",
    help="Add, list, show and edit PACS (C-STORE) and Modality Worklist connections, test them with Echo "
    "and manage their TLS pins and client certificates.",
    no_args_is_help=True,
)
app.add_typer(connections_app, name="connections")

# Command-line option of each ConnectionSettings field, for messages.
OPTION_NAMES = {
    "name": "--name",
    "kind": "--kind",
    "host": "--host",
    "port": "--port",
    "calling_ae_title": "--calling-aet",
    "called_ae_title": "--called-aet",
    "timezone": "--timezone",
    "character_set": "--charset",
    "tls_mode": "--tls",
    "scp_certificate_pem": "--scp-cert",
    "pinned_fingerprint": "--pinned-fingerprint",
    "server_name": "--server-name",
    "check_hostname": "--check-hostname",
    "legacy_ciphers": "--legacy-ciphers",
    "scu_authentication": "--scu-auth",
    "image_compression": "--image-compression",
    "loop_compression": "--loop-compression",
    "jpeg_quality": "--jpeg-quality",
    "monochrome": "--monochrome",
    "acse_timeout": "--acse-timeout",
    "dimse_timeout": "--dimse-timeout",
    "connection_timeout": "--connection-timeout",
    "test_only": "--test-only",
    "worklist_filters": "--worklist-filters",
}
REQUIRED_FOR_ADD = ("kind", "host", "port", "calling_ae_title", "called_ae_title")
# validate_settings reports problems of the uploaded certificate under this field name.
CERTIFICATE_FIELD = "scp_certificate"

_COMPRESSION_CHOICES = "as-received|none|jpeg-lossless|jpeg-baseline"

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        show_default=False,
        help=f"Data directory with the database and blobs (default: ${DATA_DIR_ENV}, else ./pacsbridge-data).",
    ),
]
KindOption = Annotated[
    str | None,
    typer.Option("--kind", metavar="pacs|mwl", help="pacs (C-STORE destination) or mwl (Modality Worklist)."),
]
HostOption = Annotated[
    str | None, typer.Option("--host", metavar="HOST", help="Host name or IPv4/IPv6 address of the SCP.")
]
PortOption = Annotated[str | None, typer.Option("--port", metavar="PORT", help="TCP port of the SCP (1-65535).")]
CallingAetOption = Annotated[
    str | None, typer.Option("--calling-aet", metavar="AET", help="AE title pacsbridge sends as calling AE.")
]
CalledAetOption = Annotated[
    str | None, typer.Option("--called-aet", metavar="AET", help="AE title of the SCP (called AE).")
]
TimezoneOption = Annotated[
    str | None,
    typer.Option("--timezone", metavar="ZONE", help="IANA time zone of the SCP, such as Europe/Berlin (default: UTC)."),
]
CharsetOption = Annotated[
    str | None,
    typer.Option(
        "--charset",
        metavar="TERM",
        help="Specific Character Set defined term(s), backslash-separated for ISO 2022 (default: ISO_IR 100).",
    ),
]
TlsOption = Annotated[
    str | None,
    typer.Option("--tls", metavar="inactive|active|encryption-only", help="TLS mode (default: inactive)."),
]
ScpCertOption = Annotated[
    str | None,
    typer.Option(
        "--scp-cert",
        metavar="FILE",
        help="File with the SCP certificate (PEM, Base64 .cer or DER). An empty value removes it.",
    ),
]
PinnedFingerprintOption = Annotated[
    str | None,
    typer.Option(
        "--pinned-fingerprint",
        metavar="HEX",
        help="SHA-256 fingerprint of the SCP certificate to accept in encryption-only mode: 64 hex digits, "
        "with or without colons. It has no effect in other TLS modes. An empty value removes it.",
    ),
]
ServerNameOption = Annotated[
    str | None,
    typer.Option(
        "--server-name",
        metavar="HOST",
        help="TLS server name to send (SNI) and, with --check-hostname, to check, instead of --host. "
        "An empty value removes it.",
    ),
]
_CHECK_HOSTNAME_OPTION = typer.Option(
    "--check-hostname/--no-check-hostname",
    help="With --tls active: also check that the SCP certificate names --server-name or --host (default: off).",
)
_LEGACY_CIPHERS_OPTION = typer.Option(
    "--legacy-ciphers/--no-legacy-ciphers",
    help="Also allow CBC cipher suites for old TLS stacks, which is weaker than the default BCP 195 profile "
    "(default: off).",
)
CheckHostnameOption = Annotated[bool, _CHECK_HOSTNAME_OPTION]
LegacyCiphersOption = Annotated[bool, _LEGACY_CIPHERS_OPTION]
ScuAuthOption = Annotated[
    str | None,
    typer.Option(
        "--scu-auth",
        metavar="anonymous|client-certificate",
        help="How pacsbridge authenticates to the SCP (default: anonymous).",
    ),
]
ImageCompressionOption = Annotated[
    str | None,
    typer.Option(
        "--image-compression",
        metavar=_COMPRESSION_CHOICES,
        help="Compression of still images sent to the SCP (default: as-received).",
    ),
]
LoopCompressionOption = Annotated[
    str | None,
    typer.Option(
        "--loop-compression",
        metavar=_COMPRESSION_CHOICES,
        help="Compression of cine loops sent to the SCP (default: as-received).",
    ),
]
JpegQualityOption = Annotated[
    str | None,
    typer.Option(
        "--jpeg-quality",
        metavar="N",
        help="JPEG Baseline quality from 1 to 100, used where compression is jpeg-baseline (default: 90).",
    ),
]
MonochromeOption = Annotated[
    str | None,
    typer.Option(
        "--monochrome",
        metavar="never|b-mode-only",
        help="Which images to convert to monochrome (default: never).",
    ),
]
AcseTimeoutOption = Annotated[
    str | None,
    typer.Option(
        "--acse-timeout", metavar="S", help="Seconds to wait for association set-up and release (default: 300)."
    ),
]
DimseTimeoutOption = Annotated[
    str | None,
    typer.Option("--dimse-timeout", metavar="S", help="Seconds to wait for each DIMSE response (default: 300)."),
]
ConnectionTimeoutOption = Annotated[
    str | None,
    typer.Option("--connection-timeout", metavar="S", help="Seconds to wait for the TCP connection (default: 300)."),
]
WorklistFiltersOption = Annotated[
    str | None,
    typer.Option(
        "--worklist-filters",
        metavar="JSON",
        help='Worklist query filters as a JSON object, for example \'{"modality": "US"}\'.',
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _edit_variant(option: Any) -> Any:
    """Return a copy of an `add` option for `edit`, without the "(default: …)" of its help.

    In `edit` an option that is not given keeps the connection's current value,
    so the value `add` would use is not a default there.
    """
    base, info = typing.get_args(option)
    edited = copy.copy(info)
    edited.help = re.sub(r" \(default: [^)]*\)", "", info.help or "")
    return Annotated[base, edited]


EditTimezoneOption = _edit_variant(TimezoneOption)
EditCharsetOption = _edit_variant(CharsetOption)
EditTlsOption = _edit_variant(TlsOption)
EditCheckHostnameOption = _edit_variant(Annotated[bool | None, _CHECK_HOSTNAME_OPTION])
EditLegacyCiphersOption = _edit_variant(Annotated[bool | None, _LEGACY_CIPHERS_OPTION])
EditScuAuthOption = _edit_variant(ScuAuthOption)
EditImageCompressionOption = _edit_variant(ImageCompressionOption)
EditLoopCompressionOption = _edit_variant(LoopCompressionOption)
EditMonochromeOption = _edit_variant(MonochromeOption)
EditJpegQualityOption = _edit_variant(JpegQualityOption)
EditAcseTimeoutOption = _edit_variant(AcseTimeoutOption)
EditDimseTimeoutOption = _edit_variant(DimseTimeoutOption)
EditConnectionTimeoutOption = _edit_variant(ConnectionTimeoutOption)


class _OptionProblem(Exception):
    """Raised when an option value cannot be turned into a setting, such as an unreadable file."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _fail(message: str, exit_code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code)


def load_config_or_exit(data_dir: Path | None, *, bind_address: str | None = None) -> AppConfig:
    """Resolve the configuration, exiting with status 1 when it is invalid."""
    try:
        return load_config(data_dir, bind_address=bind_address)
    except ConfigError as exc:
        _fail(str(exc), EXIT_FAILED)


@contextlib.contextmanager
def open_sessions(data_dir: Path | None, *, config: AppConfig | None = None) -> Iterator[sessionmaker[Session]]:
    """Open (and migrate) the database of `config`, else of `data_dir`, exiting with status 1 when that fails."""
    try:
        sessions = open_database(config or load_config(data_dir))
    except (ConfigError, DatabaseError) as exc:
        _fail(str(exc), EXIT_FAILED)
    try:
        yield sessions
    except OperationalError as exc:
        LOGGER.error("Database operation failed: %s", exc.orig)
        _fail(
            f"database operation failed: {exc.orig}. Try again, and check the database if it fails again.",
            EXIT_FAILED,
        )
    finally:
        close_database(sessions)


# Parsing options ------------------------------------------------------------


def _parse_int(text: str) -> int | str:
    """Return `text` as an int, or unchanged so that validation reports it with the other problems."""
    try:
        return int(text.strip())
    except ValueError:
        return text


def _parse_float(text: str) -> float | str:
    try:
        return float(text.strip())
    except ValueError:
        return text


def _read_certificate(path_text: str) -> str | None:
    """Return the PEM text of the certificate file at `path_text`, converted from Base64 or DER if needed.

    An empty path returns None, which removes the certificate. A DER file is
    reported with a note, as Echo and 'certs show' report it.
    """
    if path_text == "":
        return None
    path = Path(path_text).expanduser()
    try:
        with path.open("rb") as file:
            data = file.read(MAX_UPLOAD_BYTES + 1)
    except OSError as exc:
        raise _OptionProblem(
            Problem.error(
                CERTIFICATE_FIELD,
                path_text,
                f"cannot be read ({exc.strerror or exc})",
                "Give the path of the SCP's certificate file.",
            )
        ) from exc
    try:
        upload = parse_certificate_upload(data)
    except CertificateError as exc:
        raise _OptionProblem(Problem.error(CERTIFICATE_FIELD, path_text, exc.reason, f"{exc.fix}.")) from None
    if upload.converted_from_der:
        typer.echo(f"note: --scp-cert {path_text} was DER and has been converted to PEM.", err=True)
    return upload.pem


def _parse_worklist_filters(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _OptionProblem(
            Problem.error(
                "worklist_filters",
                text,
                f"is not valid JSON ({exc.msg} at character {exc.pos})",
                'Give a JSON object, for example \'{"modality": "US"}\'.',
            )
        ) from exc


_PARSERS: dict[str, Callable[[str], object]] = {
    "port": _parse_int,
    "acse_timeout": _parse_float,
    "dimse_timeout": _parse_float,
    "connection_timeout": _parse_float,
    "scp_certificate_pem": _read_certificate,
    # An invalid value stays as given, so that validation reports it.
    "pinned_fingerprint": lambda text: normalize_fingerprint(text) or text or None,
    "server_name": lambda text: text or None,
    "worklist_filters": _parse_worklist_filters,
}


def _parse_options(raw: Mapping[str, object]) -> tuple[dict[str, object], list[Problem]]:
    """Turn the given options (None means not given) into ConnectionSettings changes and option problems."""
    changes: dict[str, object] = {}
    problems: list[Problem] = []
    for field, value in raw.items():
        if value is None:
            continue
        parser = _PARSERS.get(field)
        if parser is None or not isinstance(value, str):
            changes[field] = value
            continue
        try:
            changes[field] = parser(value)
        except _OptionProblem as exc:
            problems.append(exc.problem)
    return changes, problems


# Reporting problems ---------------------------------------------------------


def _quote(text: str) -> str:
    """Quote `text` so that spaces show, escaping only unprintable characters (unlike repr, not backslashes)."""
    escaped = "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)
    return f"'{escaped}'"


def _command_line(*words: str) -> str:
    """Return a pacsbridge command line, with shell quoting only on the words that need it."""
    return shlex.join(["pacsbridge", *words])


def _command(*words: str) -> str:
    """Return a pacsbridge command line in double quotes, for use inside a sentence."""
    return f'"{_command_line(*words)}"'


def _display_value(value: object) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, str):
        return _quote(value)
    return str(value)


def _problem_line(problem: Problem, labels: Mapping[str, str]) -> str:
    value = labels.get(problem.field) or _display_value(problem.value)
    return f"{problem.severity.value}: {problem.field} {value}: {problem.reason}. {problem.fix}"


def _print_problems(problems: Sequence[Problem], labels: Mapping[str, str]) -> None:
    for problem in problems:
        typer.echo(_problem_line(problem, labels), err=True)


def _exit_if_errors(problems: Sequence[Problem], labels: Mapping[str, str]) -> None:
    if any(problem.severity == Severity.ERROR for problem in problems):
        _print_problems(problems, labels)
        typer.echo("Nothing was stored.", err=True)
        raise typer.Exit(EXIT_INVALID)


def _certificate_labels(scp_cert: str | None) -> dict[str, str]:
    """Name the certificate file in messages instead of the "(not shown)" placeholder."""
    if scp_cert:
        return {CERTIFICATE_FIELD: _quote(scp_cert)}
    return {}


def _collect_problems(
    option_problems: list[Problem],
    missing: Sequence[str],
    report_problems: Sequence[Problem],
) -> list[Problem]:
    """Merge option, missing-option and validation problems, one set per field."""
    missing_problems = [
        Problem.error(field, None, "is required", f"Give it with {OPTION_NAMES[field]}.") for field in missing
    ]
    covered = {problem.field for problem in option_problems} | set(missing)
    return option_problems + missing_problems + [p for p in report_problems if p.field not in covered]


# Rendering connections ------------------------------------------------------


def _security_label(record: ConnectionRecord) -> str:
    if record.tls_mode == TlsMode.INACTIVE:
        return "unsecured"
    if record.tls_mode == TlsMode.ACTIVE:
        return "tls-verified"
    return "tls-encryption-only"


def _security_flags(record: ConnectionRecord) -> list[str]:
    """Name what weakens or breaks the TLS of a connection, for the SECURITY column and the summary line."""
    if record.tls_mode == TlsMode.INACTIVE:
        return []
    flags = []
    if record.legacy_ciphers:
        flags.append("weaker ciphers")
    if record.tls_mode == TlsMode.ACTIVE:
        # In active mode the stored certificate is the trust anchor, so its expiry makes the handshake fail.
        infos = _scp_certificates(record.scp_certificate_pem)
        if infos is None:
            flags.append("certificate unreadable")
        elif any(info.expired for info in infos):
            flags.append("certificate expired")
        elif any(info.not_yet_valid for info in infos):
            flags.append("certificate not yet valid")
    return flags


def _security_text(record: ConnectionRecord) -> str:
    """Return the security label with its flags, such as 'tls-verified (weaker ciphers)'."""
    flags = _security_flags(record)
    label = _security_label(record)
    return f"{label} ({', '.join(flags)})" if flags else label


def _security_description(record: ConnectionRecord) -> str:
    if record.tls_mode == TlsMode.INACTIVE:
        return "UNSECURED: TLS is inactive, so images and patient data travel unencrypted"
    if record.tls_mode == TlsMode.ACTIVE:
        return "TLS, SCP certificate verified against the stored certificate"
    if record.pinned_fingerprint:
        return "TLS encryption, SCP certificate accepted only with the pinned fingerprint"
    return "TLS encryption only: the SCP certificate is not verified"


def _kind_description(kind: ConnectionKind) -> str:
    if kind == ConnectionKind.MWL:
        return "mwl (Modality Worklist)"
    return "pacs (C-STORE destination)"


def _address(record: ConnectionRecord) -> str:
    host = f"[{record.host}]" if ":" in record.host and not record.host.startswith("[") else record.host
    return f"{host}:{record.port}"


def _scp_certificates(pem: str | None) -> list[CertificateInfo] | None:
    """Describe each certificate of the stored PEM text, or return None when it cannot be parsed."""
    if not pem:
        return []
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii", errors="replace"))
    except ValueError:
        return None
    return [describe_certificate(certificate) for certificate in certificates]


def _certificate_summaries(pem: str | None) -> list[dict[str, object]]:
    infos = _scp_certificates(pem)
    if infos is None:
        return [{"error": "the stored certificate cannot be parsed"}]
    return [info.as_dict() for info in infos]


def _client_certificate_dict(record: ClientCertificateRecord) -> dict[str, object]:
    info = describe_certificate(x509.load_pem_x509_certificate(record.certificate_pem.encode("ascii")))
    return {
        "status": effective_status(record).value,
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": record.serial,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "sha256_fingerprint": record.fingerprint,
        "retire_after": record.retire_after.isoformat() if record.retire_after else None,
        "created_at": record.created_at.isoformat(),
    }


def _safe_pem(pem: str | None) -> str | None:
    # Validation rejects private keys, so this only guards against rows written by other means.
    if pem and "PRIVATE KEY" in pem:
        return "(not shown: contains a private key)"
    return pem


def connection_to_dict(record: ConnectionRecord) -> dict[str, object]:
    """Return every stored field of `record` as JSON-ready values, plus certificate summaries."""
    settings = to_settings(record)
    data: dict[str, object] = {"id": record.id, "organization": record.organization.name}
    for field, value in vars(settings).items():
        data[field] = value.value if isinstance(value, enum.Enum) else value
    data["scp_certificate_pem"] = _safe_pem(record.scp_certificate_pem)
    data["scp_certificates"] = _certificate_summaries(record.scp_certificate_pem)
    data["client_certificates"] = [
        _client_certificate_dict(certificate) for certificate in _newest_first(record.client_certificates)
    ]
    data["security"] = _security_label(record)
    data["security_flags"] = _security_flags(record)
    data["created_at"] = record.created_at.isoformat()
    data["updated_at"] = record.updated_at.isoformat()
    return data


def _display_width(text: str) -> int:
    width = 0
    for character in text:
        if unicodedata.combining(character):
            continue
        width += 2 if unicodedata.east_asian_width(character) in ("W", "F") else 1
    return width


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _display_width(text))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(_display_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [_pad(cell, widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _newest_first(records: Sequence[ClientCertificateRecord]) -> list[ClientCertificateRecord]:
    return sorted(records, key=lambda record: (record.created_at, record.id), reverse=True)


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _expiry_flag(info: CertificateInfo) -> str:
    if info.expired:
        return " [EXPIRED]"
    if info.not_yet_valid:
        return " [NOT YET VALID]"
    if info.expires_soon:
        return f" [EXPIRES IN {info.days_left} DAYS]"
    return ""


def _scp_certificate_lines(pem: str | None) -> list[tuple[str, str]]:
    infos = _scp_certificates(pem)
    if infos is None:
        return [("scp_certificate", "the stored certificate cannot be parsed")]
    if not infos:
        return [("scp_certificate", "(none)")]
    pairs: list[tuple[str, str]] = []
    for number, info in enumerate(infos, start=1):
        label = "scp_certificate" if len(infos) == 1 else f"scp_certificate {number}"
        pairs += [
            (label, info.subject or "(empty subject)"),
            ("  issuer", info.issuer or "(empty issuer)"),
            ("  valid", f"{_date(info.not_before)} to {_date(info.not_after)}{_expiry_flag(info)}"),
            ("  sha256", info.sha256_fingerprint_colons),
        ]
    return pairs


def _client_certificate_lines(records: Sequence[ClientCertificateRecord]) -> list[tuple[str, str]]:
    if not records:
        return [("client_certificates", "(none)")]
    pairs: list[tuple[str, str]] = [("client_certificates", str(len(records)))]
    for record in _newest_first(records):
        status = effective_status(record)
        info = describe_certificate(x509.load_pem_x509_certificate(record.certificate_pem.encode("ascii")))
        state = status.value
        if status == ClientCertificateStatus.RETIRING and record.retire_after is not None:
            state += f" until {_date(record.retire_after)}"
        pairs += [
            (f"  [{state}]", info.subject),
            ("    valid", f"{_date(info.not_before)} to {_date(info.not_after)}{_expiry_flag(info)}"),
            ("    sha256", info.sha256_fingerprint_colons),
        ]
    return pairs


def _tls_mode_text(record: ConnectionRecord) -> str:
    if record.tls_mode == TlsMode.INACTIVE:
        return "unsecured (TLS inactive)"
    return record.tls_mode.value


def _cipher_profile_text(record: ConnectionRecord) -> str:
    if record.tls_mode == TlsMode.INACTIVE:
        return "n/a (TLS inactive)"
    if record.legacy_ciphers:
        return "legacy: also CBC cipher suites for old TLS stacks (WEAKER than BCP 195)"
    return "BCP 195 (TLS 1.2 or newer, AEAD cipher suites)"


def _server_name_text(record: ConnectionRecord) -> str:
    """Describe the TLS server name (SNI) that is sent.

    Python's ssl module sends no SNI when the host is an IP address (checked with CPython 3.11).
    """
    if record.server_name:
        return record.server_name
    try:
        ipaddress.ip_address(record.host.strip("[]"))
    except ValueError:
        return f"(none: the host name {record.host} is sent)"
    return "(none: no name is sent, because the host is an IP address)"


def _show_lines(record: ConnectionRecord) -> list[str]:
    pairs = [
        ("name", record.name),
        ("kind", _kind_description(record.kind)),
        ("host", record.host),
        ("port", str(record.port)),
        ("calling_ae_title", _quote(record.calling_ae_title)),
        ("called_ae_title", _quote(record.called_ae_title)),
        ("security", _security_description(record)),
        ("tls_mode", _tls_mode_text(record)),
        ("cipher_profile", _cipher_profile_text(record)),
        ("server_name", _server_name_text(record)),
        ("check_hostname", "yes" if record.check_hostname else "no"),
        *_scp_certificate_lines(record.scp_certificate_pem),
        ("pinned_fingerprint", colon_fingerprint(record.pinned_fingerprint) if record.pinned_fingerprint else "(none)"),
        ("scu_authentication", record.scu_authentication.value),
        *_client_certificate_lines(record.client_certificates),
        ("timezone", record.timezone),
        ("character_set", record.character_set),
        ("image_compression", record.image_compression.value),
        ("loop_compression", record.loop_compression.value),
        ("jpeg_quality", str(record.jpeg_quality)),
        ("monochrome", record.monochrome.value),
        ("acse_timeout", f"{record.acse_timeout:g} s"),
        ("dimse_timeout", f"{record.dimse_timeout:g} s"),
        ("connection_timeout", f"{record.connection_timeout:g} s"),
        ("test_only", "yes" if record.test_only else "no"),
        ("worklist_filters", json.dumps(record.worklist_filters, ensure_ascii=False)),
        ("organization", record.organization.name),
        ("id", str(record.id)),
        ("created_at", record.created_at.isoformat()),
        ("updated_at", record.updated_at.isoformat()),
    ]
    width = max(len(key) for key, _ in pairs) + 1
    return [f"{key + ':':<{width}} {value}" for key, value in pairs]


def _summary(record: ConnectionRecord) -> str:
    return f"{_quote(record.name)} ({record.kind.value}, {_address(record)}, {_security_text(record)})"


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


# TLS and client certificates -------------------------------------------------

# Fields whose change can mean that another SCP certificate is presented.
_PEER_FIELDS = ("host", "port", "tls_mode", "scp_certificate_pem", "server_name")


def _uses_client_certificate(record: ConnectionRecord) -> bool:
    return record.tls_mode != TlsMode.INACTIVE and record.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE


def _sentence(text: str) -> str:
    """Return `text` ending with a full stop, for messages that continue after it."""
    return text if text.endswith(".") else f"{text}."


def _secret_key_or_exit() -> SecretKey:
    try:
        return load_secret_key()
    except SecretKeyError as exc:
        _fail(str(exc), EXIT_FAILED)


def _issue_client_certificate_if_needed(session: Session, record: ConnectionRecord) -> None:
    """Issue the first client certificate of a connection with SCU authentication.

    A missing PACSBRIDGE_SECRET_KEY only warns, because the connection is
    valid without it and the certificate can be issued later. A wrong key
    exits with status 1 and stores nothing.
    """
    if not _uses_client_certificate(record) or find_active_certificate(session, record) is not None:
        return
    try:
        secret_key = load_secret_key()
    except SecretKeyError as exc:
        typer.echo(f"warning: no client certificate was issued yet: {exc}", err=True)
        typer.echo(
            f"Then run {_command('connections', 'client-cert', record.name)} to issue and download it.",
            err=True,
        )
        return
    try:
        certificate, _ = ensure_client_certificate(session, record, secret_key)
    except (SecretKeyError, ClientCertificateError) as exc:
        _fail(f"{_sentence(str(exc))} Nothing was stored.", EXIT_FAILED)
    typer.echo(
        f"Issued client certificate SHA-256 {colon_fingerprint(certificate.fingerprint)}, valid until "
        f"{_date(certificate.not_after)}. Give the PACS admin the organization's CA certificate to trust, "
        "because the SCP then also accepts later client certificates. Download both with "
        f"{_command('connections', 'client-cert', record.name, '--ca')}."
    )


def _advisory_warnings(
    settings: ConnectionSettings, *, certificate_given: bool, security_changed: bool
) -> list[Problem]:
    """Warn about an uploaded SCP certificate that has expired or expires soon, and about an unsecured connection.

    These settings are valid, so they are stored, but they limit what the
    connection can do.
    """
    problems: list[Problem] = []
    infos = _scp_certificates(settings.scp_certificate_pem) if certificate_given else None
    for number, info in enumerate(infos or [], start=1):
        subject = "" if len(infos or []) == 1 else f"contains certificate {number} ({info.subject}), which "
        if info.expired:
            reason = f"{subject}expired on {_date(info.not_after)}"
        elif info.expires_soon:
            reason = f"{subject}expires in {info.days_left} days, on {_date(info.not_after)}"
        else:
            continue
        problems.append(
            Problem.warning(
                CERTIFICATE_FIELD,
                None,
                reason,
                "TLS handshakes fail once the SCP certificate has expired. Ask the PACS admin for the renewed "
                "certificate and upload it with --scp-cert.",
            )
        )
    if security_changed and settings.tls_mode == TlsMode.INACTIVE and settings.kind == ConnectionKind.MWL:
        problems.append(
            Problem.warning(
                "tls_mode",
                TlsMode.INACTIVE.value,
                "makes the worklist connection unsecured, so queries and their answers, with patient names and "
                "IDs, cross the network unencrypted",
                "Choose --tls active or --tls encryption-only unless the worklist server is on a network you trust.",
            )
        )
    elif security_changed and settings.tls_mode == TlsMode.INACTIVE and not settings.test_only:
        problems.append(
            Problem.warning(
                "tls_mode",
                TlsMode.INACTIVE.value,
                "makes the connection unsecured, so only test data will be forwarded to it",
                "To send real studies, choose --tls active or --tls encryption-only. To mark it as a test "
                "connection, give --test-only.",
            )
        )
    return problems


def _kept_security_notes(
    before: ConnectionSettings, after: ConnectionSettings, changes: Mapping[str, object]
) -> list[str]:
    """Say which pins and certificates an edit kept, so that nothing is kept or cleared unnoticed."""
    notes: list[str] = []
    changed = [field for field in _PEER_FIELDS if getattr(before, field) != getattr(after, field)]
    if after.pinned_fingerprint and changed and "pinned_fingerprint" not in changes:
        options = ", ".join(OPTION_NAMES[field] for field in changed)
        notes.append(
            f"the pinned fingerprint {colon_fingerprint(after.pinned_fingerprint)} was kept although {options} "
            f"changed. Run {_command('connections', 'echo', after.name)} to check that the SCP still "
            "presents that certificate, and 'connections confirm-fingerprint' to pin a new one, or remove the pin "
            "with --pinned-fingerprint ''."
        )
    if before.tls_mode != TlsMode.INACTIVE and after.tls_mode == TlsMode.INACTIVE:
        notes.append(
            "TLS is now inactive: the SCP certificate, the pinned fingerprint and the client certificates are kept "
            "but not used until TLS is turned on again."
        )
    if (
        before.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE
        and after.scu_authentication != ScuAuthentication.CLIENT_CERTIFICATE
    ):
        notes.append(
            "SCU authentication is now off: the client certificates are kept and used again when it is turned on."
        )
    return notes


# Commands -------------------------------------------------------------------


@connections_app.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="Display name, unique in the organization.")],
    kind: KindOption = None,
    host: HostOption = None,
    port: PortOption = None,
    calling_aet: CallingAetOption = None,
    called_aet: CalledAetOption = None,
    test_only: Annotated[
        bool, typer.Option("--test-only/--no-test-only", help="Send only test data to this connection.")
    ] = False,
    timezone: TimezoneOption = None,
    charset: CharsetOption = None,
    tls: TlsOption = None,
    scp_cert: ScpCertOption = None,
    pinned_fingerprint: PinnedFingerprintOption = None,
    server_name: ServerNameOption = None,
    check_hostname: CheckHostnameOption = False,
    legacy_ciphers: LegacyCiphersOption = False,
    scu_auth: ScuAuthOption = None,
    image_compression: ImageCompressionOption = None,
    loop_compression: LoopCompressionOption = None,
    jpeg_quality: JpegQualityOption = None,
    monochrome: MonochromeOption = None,
    acse_timeout: AcseTimeoutOption = None,
    dimse_timeout: DimseTimeoutOption = None,
    connection_timeout: ConnectionTimeoutOption = None,
    worklist_filters: WorklistFiltersOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add a connection. --kind, --host, --port, --calling-aet and --called-aet are required."""
    changes, option_problems = _parse_options(
        {
            "kind": kind,
            "host": host,
            "port": port,
            "calling_ae_title": calling_aet,
            "called_ae_title": called_aet,
            "test_only": test_only,
            "timezone": timezone,
            "character_set": charset,
            "tls_mode": tls,
            "scp_certificate_pem": scp_cert,
            "pinned_fingerprint": pinned_fingerprint,
            "server_name": server_name,
            "check_hostname": check_hostname,
            "legacy_ciphers": legacy_ciphers,
            "scu_authentication": scu_auth,
            "image_compression": image_compression,
            "loop_compression": loop_compression,
            "jpeg_quality": jpeg_quality,
            "monochrome": monochrome,
            "acse_timeout": acse_timeout,
            "dimse_timeout": dimse_timeout,
            "connection_timeout": connection_timeout,
            "worklist_filters": worklist_filters,
        }
    )
    missing = [field for field in REQUIRED_FOR_ADD if field not in changes]
    # Missing required fields stay None here and are reported as missing, not as invalid.
    blank: dict[str, Any] = {field: None for field in REQUIRED_FOR_ADD}
    settings = ConnectionSettings(name=name, **blank).replace(**changes)
    labels = _certificate_labels(scp_cert)

    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        report = check_connection(session, settings)
        problems = _collect_problems(option_problems, missing, report.problems)
        _exit_if_errors(problems, labels)
        try:
            record, report = save_connection(session, settings)
        except InvalidSettingsError as exc:
            _exit_if_errors(exc.problems, labels)
            raise
        advisories = _advisory_warnings(to_settings(record), certificate_given=bool(scp_cert), security_changed=True)
        if timezone is None and record.kind == ConnectionKind.PACS:
            advisories.append(
                Problem.warning(
                    "timezone",
                    record.timezone,
                    "was not given, so dates and times whose instant is known are converted to UTC before sending",
                    "Give the PACS's own zone with pacsbridge connections edit NAME --timezone ZONE, "
                    "such as Europe/Berlin.",
                )
            )
        _print_problems(report.warnings + advisories, labels)
        typer.echo(f"Added connection {_summary(record)}.")
        _issue_client_certificate_if_needed(session, record)


@connections_app.command("edit")
def edit_command(
    name: Annotated[str, typer.Argument(help="Name of the connection to change.")],
    new_name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="New display name.")] = None,
    kind: KindOption = None,
    host: HostOption = None,
    port: PortOption = None,
    calling_aet: CallingAetOption = None,
    called_aet: CalledAetOption = None,
    test_only: Annotated[
        bool | None, typer.Option("--test-only/--no-test-only", help="Send only test data to this connection.")
    ] = None,
    timezone: EditTimezoneOption = None,
    charset: EditCharsetOption = None,
    tls: EditTlsOption = None,
    scp_cert: ScpCertOption = None,
    pinned_fingerprint: PinnedFingerprintOption = None,
    server_name: ServerNameOption = None,
    check_hostname: EditCheckHostnameOption = None,
    legacy_ciphers: EditLegacyCiphersOption = None,
    scu_auth: EditScuAuthOption = None,
    image_compression: EditImageCompressionOption = None,
    loop_compression: EditLoopCompressionOption = None,
    jpeg_quality: EditJpegQualityOption = None,
    monochrome: EditMonochromeOption = None,
    acse_timeout: EditAcseTimeoutOption = None,
    dimse_timeout: EditDimseTimeoutOption = None,
    connection_timeout: EditConnectionTimeoutOption = None,
    worklist_filters: WorklistFiltersOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Change the given fields of a connection. Options not given keep their current values.

    A change of host, port, AE titles or TLS settings holds the connection's
    queued and retrying deliveries until they are released.
    """
    changes, option_problems = _parse_options(
        {
            "name": new_name,
            "kind": kind,
            "host": host,
            "port": port,
            "calling_ae_title": calling_aet,
            "called_ae_title": called_aet,
            "test_only": test_only,
            "timezone": timezone,
            "character_set": charset,
            "tls_mode": tls,
            "scp_certificate_pem": scp_cert,
            "pinned_fingerprint": pinned_fingerprint,
            "server_name": server_name,
            "check_hostname": check_hostname,
            "legacy_ciphers": legacy_ciphers,
            "scu_authentication": scu_auth,
            "image_compression": image_compression,
            "loop_compression": loop_compression,
            "jpeg_quality": jpeg_quality,
            "monochrome": monochrome,
            "acse_timeout": acse_timeout,
            "dimse_timeout": dimse_timeout,
            "connection_timeout": connection_timeout,
            "worklist_filters": worklist_filters,
        }
    )
    if not changes and not option_problems:
        _fail("no changes given. Give the options to change, for example --host or --port.", EXIT_INVALID)
    labels = _certificate_labels(scp_cert)

    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            record = get_connection(session, name)
        except ConnectionNotFoundError as exc:
            _fail(str(exc), EXIT_FAILED)
        before = to_settings(record)
        merged = before.replace(**changes)
        report = check_connection(session, merged, existing=record)
        _exit_if_errors(_collect_problems(option_problems, [], report.problems), labels)
        try:
            record, report = update_connection(session, name, **changes)
        except InvalidSettingsError as exc:
            _exit_if_errors(exc.problems, labels)
            raise
        advisories = _advisory_warnings(
            to_settings(record),
            certificate_given=bool(scp_cert),
            security_changed="tls_mode" in changes or "test_only" in changes,
        )
        _print_problems(report.warnings + advisories, labels)
        typer.echo(f"Updated connection {_summary(record)}.")
        for note in _kept_security_notes(before, to_settings(record), changes):
            typer.echo(f"note: {note}", err=True)
        derivation_note = _derivation_change_note(before, to_settings(record))
        if derivation_note:
            typer.echo(f"note: {derivation_note}", err=True)
        _issue_client_certificate_if_needed(session, record)
        for line in _delivery_next_steps(session, record):
            typer.echo(line)


# Settings whose change gives lossy or monochrome instances other derived SOP Instance UIDs.
_DERIVATION_FIELDS = ("image_compression", "loop_compression", "jpeg_quality", "monochrome")


def _derivation_change_note(before: ConnectionSettings, after: ConnectionSettings) -> str | None:
    """Warn that instances already sent keep their old derived UIDs, so a resend adds copies beside them."""
    changed = [field for field in _DERIVATION_FIELDS if str(getattr(before, field)) != str(getattr(after, field))]
    if not changed:
        return None
    options = ", ".join(OPTION_NAMES[field] for field in changed)
    return (
        f"{options} changed. Instances already sent lossy compressed or as monochrome keep their derived SOP "
        "Instance UIDs; a resend after this change makes new derived instances, so the PACS holds both. "
        "Delete the earlier ones on the PACS before 'pacsbridge studies resend'."
    )


def _delivery_next_steps(session: Session, record: ConnectionRecord) -> list[str]:
    """Return what to do about the connection's held and needs-attention deliveries after an edit."""
    lines = []
    held = connection_delivery_ids(session, record.id, DeliveryState.HELD)
    if held:
        lines.append(held_hint(len(held), held, connection=_quote(record.name)))
    attention = connection_delivery_ids(session, record.id, DeliveryState.NEEDS_ATTENTION)
    if attention:
        shown = " ".join(map(str, attention[:MAX_IDS_SHOWN])) + (" ..." if len(attention) > MAX_IDS_SHOWN else "")
        count = len(attention)
        subject = f"{count} {'delivery' if count == 1 else 'deliveries'} to {_quote(record.name)}"
        lines.append(
            f"{subject} {'needs' if count == 1 else 'need'} attention: retry "
            f'{"it" if count == 1 else "them"} with "pacsbridge deliveries retry {shown}".'
        )
    return lines


@connections_app.command("list")
def list_command(json_output: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """List the connections with their address, AE titles and security."""
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        records = list_connections(session)
        if json_output:
            _echo_json([connection_to_dict(record) for record in records])
            return
        if not records:
            typer.echo("No connections yet. Add one with 'pacsbridge connections add'.")
            return
        header = ("NAME", "KIND", "ADDRESS", "CALLING AET", "CALLED AET", "SECURITY", "TEST ONLY")
        rows = [
            (
                record.name,
                record.kind.value,
                _address(record),
                _quote(record.calling_ae_title),
                _quote(record.called_ae_title),
                _security_text(record),
                "yes" if record.test_only else "no",
            )
            for record in records
        ]
        for line in _table(header, rows):
            typer.echo(line)


@connections_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Name of the connection.")],
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show every field of one connection."""
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            record = get_connection(session, name)
        except ConnectionNotFoundError as exc:
            _fail(str(exc), EXIT_FAILED)
        if json_output:
            _echo_json(connection_to_dict(record))
            return
        for line in _show_lines(record):
            typer.echo(line)


@connections_app.command("delete")
def delete_command(
    name: Annotated[str, typer.Argument(help="Name of the connection to delete.")],
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking for confirmation.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Delete a connection that no archive links and no delivery refers to, with its client certificates."""
    if not yes and not typer.confirm(f"Delete connection {_quote(name)} and its client certificates?"):
        _fail("nothing was deleted.", EXIT_FAILED)
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            record = delete_connection(session, name, actor=command_actor())
        except ConnectionNotFoundError as exc:
            _fail(str(exc), EXIT_FAILED)
        except ArchiveError as exc:
            _fail(f"{exc}.", EXIT_FAILED)
        typer.echo(f"Deleted connection {_quote(record.name)}.")


BindAddressOption = Annotated[
    str | None,
    typer.Option(
        "--bind-address",
        metavar="IP",
        help=f"Local IP address to send from (default: ${BIND_ADDRESS_ENV}, else chosen by the operating system).",
    ),
]


def _load_for_network(
    session: Session, name: str, *, with_client_certificate: bool = True
) -> tuple[ConnectionSettings, ClientIdentity | None]:
    """Return the settings of connection `name` and its decrypted client certificate, or exit 1 on failure."""
    try:
        record = get_connection(session, name)
    except ConnectionNotFoundError as exc:
        _fail(str(exc), EXIT_FAILED)
    settings = to_settings(record)
    if not with_client_certificate:
        return settings, None
    try:
        return settings, prepare_client_identity(session, record)
    except (SecretKeyError, ClientCertificateError) as exc:
        _fail(_sentence(str(exc)), EXIT_FAILED)


def _pinning_hint(settings: ConnectionSettings, report: EchoReport) -> str | None:
    """Tell how to pin the fingerprint that Echo saw, or what to do when it differs from the pin."""
    if settings.tls_mode != TlsMode.ENCRYPTION_ONLY:
        return None
    handshake = next((step for step in report.steps if step.name == "tls-handshake"), None)
    if handshake is None:
        return None
    peer = handshake.data.get("peer_certificate")
    quoted = _quote(settings.name)
    if isinstance(peer, dict) and not settings.pinned_fingerprint:
        fingerprint = str(peer["sha256"])
        return (
            f"The SCP certificate is not pinned yet. Its SHA-256 fingerprint is {colon_fingerprint(fingerprint)}. "
            "Compare it with the fingerprint the PACS admin reads on the SCP, then pin it with:\n"
            f"  pacsbridge connections confirm-fingerprint {quoted} {fingerprint}"
        )
    if "different from the pinned one" in handshake.detail:
        return (
            "If the PACS admin confirms that the certificate was replaced, pin the new one with "
            f"{_command('connections', 'confirm-fingerprint', settings.name, 'FINGERPRINT')}."
        )
    return None


@connections_app.command("echo")
def echo_command(
    name: Annotated[str, typer.Argument(help="Name of the connection.")],
    json_output: JsonOption = False,
    bind_address: BindAddressOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Test a stored connection with its TLS settings, client certificate and timeouts.

    Exits 0 only when the association was accepted and C-ECHO succeeded. In
    encryption-only mode without a pin, it prints the SCP certificate's
    fingerprint and how to confirm it.
    """
    config = load_config_or_exit(data_dir, bind_address=bind_address)
    with open_sessions(data_dir, config=config) as sessions:
        # The transaction ends before the network I/O, so a slow SCP does not hold a database lock.
        with sessions.begin() as session:
            settings, identity = _load_for_network(session, name)
        with stored_endpoint(settings, identity, bind_address=config.bind_address) as endpoint:
            report = echo(endpoint)
    hint = _pinning_hint(settings, report)
    if json_output:
        data = report.as_dict()
        data["connection"] = settings.name
        data["bind_address"] = config.bind_address
        if hint is not None:
            data["hint"] = hint
        _echo_json(data)
    else:
        typer.echo(format_report(report))
        if hint is not None:
            typer.echo(hint)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@connections_app.command("confirm-fingerprint")
def confirm_fingerprint_command(
    name: Annotated[str, typer.Argument(help="Name of an encryption-only connection.")],
    fingerprint: Annotated[
        str,
        typer.Argument(help="SHA-256 fingerprint of the SCP certificate: 64 hex digits, with or without colons."),
    ],
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Pin without connecting, when the fingerprint came from the PACS admin."),
    ] = False,
    bind_address: BindAddressOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Pin the SCP certificate of an encryption-only connection.

    Unless --offline is given, a TLS handshake checks first that the SCP
    presents a certificate with this fingerprint right now.
    """
    pin = normalize_fingerprint(fingerprint)
    if pin is None:
        _fail(
            f"fingerprint {_quote(fingerprint)} is not a SHA-256 fingerprint. Give the 64 hex digits that "
            "'pacsbridge connections echo' printed, with or without colons.",
            EXIT_INVALID,
        )
    config = load_config_or_exit(data_dir, bind_address=bind_address)
    with open_sessions(data_dir, config=config) as sessions:
        with sessions.begin() as session:
            settings, identity = _load_for_network(session, name, with_client_certificate=not offline)
        if settings.tls_mode != TlsMode.ENCRYPTION_ONLY:
            _fail(
                f"connection {_quote(settings.name)} has TLS mode {settings.tls_mode.value!r}, and only "
                "'encryption-only' checks a pinned fingerprint. Use --tls encryption-only, or upload the SCP "
                "certificate with --scp-cert for TLS mode 'active'.",
                EXIT_INVALID,
            )
        if not offline:
            seen = _fingerprint_seen_now(settings, identity, config.bind_address)
            if seen != pin:
                _fail(
                    f"the SCP presents a certificate with SHA-256 {colon_fingerprint(seen)} right now, not "
                    f"{colon_fingerprint(pin)}. Nothing was pinned. Check the fingerprint with the PACS admin.",
                    EXIT_FAILED,
                )
        with sessions.begin() as session:
            try:
                update_connection(session, name, pinned_fingerprint=pin)
            except ConnectionNotFoundError as exc:
                _fail(str(exc), EXIT_FAILED)
    previous = f" (replacing {colon_fingerprint(settings.pinned_fingerprint)})" if settings.pinned_fingerprint else ""
    checked = "without a check against the SCP (--offline)" if offline else "after checking it against the SCP"
    typer.echo(f"Pinned SHA-256 {colon_fingerprint(pin)} for connection {_quote(settings.name)}{previous}, {checked}.")


def _fingerprint_seen_now(
    settings: ConnectionSettings, identity: ClientIdentity | None, bind_address: str | None
) -> str:
    """Make a TLS handshake with the SCP and return its certificate's fingerprint, or exit 1 on failure."""
    # Without the old pin, so that a replaced certificate can be confirmed.
    unpinned = settings.replace(pinned_fingerprint=None)
    with stored_endpoint(unpinned, identity, bind_address=bind_address) as endpoint:
        assert endpoint.tls is not None
        try:
            result = probe_endpoint_tls(endpoint.capped(ECHO_WAIT_CAP_SECONDS))
        except TlsFailure as exc:
            _fail(f"{exc.failure.summary} {exc.failure.action} Nothing was pinned.", EXIT_FAILED)
    if result.peer is None:
        _fail("the SCP presented no certificate during the TLS handshake. Nothing was pinned.", EXIT_FAILED)
    return result.peer.fingerprint


@connections_app.command("rotate-client-cert")
def rotate_client_cert_command(
    name: Annotated[str, typer.Argument(help="Name of a connection with SCU authentication.")],
    grace_days: Annotated[
        int,
        typer.Option(
            "--grace-days",
            metavar="DAYS",
            help="Days the previous certificate stays marked as retiring, as a record of when the PACS admin "
            "may remove it from the SCP. pacsbridge stops sending it at once either way. 0 marks it retired.",
        ),
    ] = DEFAULT_GRACE_DAYS,
    data_dir: DataDirOption = None,
) -> None:
    """Issue a new client certificate and send with it from now on.

    SCPs that trust the organization's CA certificate (recommended, see
    'client-cert --ca') accept the new certificate at once. An SCP that
    trusts only the previous client certificate rejects pacsbridge until its
    PACS admin adds the new one. The previous certificate is marked as
    retiring for --grace-days, but it is no longer sent.
    """
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            record = get_connection(session, name)
        except ConnectionNotFoundError as exc:
            _fail(str(exc), EXIT_FAILED)
        if not _uses_client_certificate(record):
            _fail(
                f"connection {_quote(record.name)} does not authenticate with a client certificate. Turn it on "
                f"with {_command('connections', 'edit', record.name, '--scu-auth', 'client-certificate')} "
                "(TLS must be active or encryption-only).",
                EXIT_INVALID,
            )
        secret_key = _secret_key_or_exit()
        try:
            new, previous = rotate_client_certificate(session, record, secret_key, grace_days=grace_days)
        except ClientCertificateError as exc:
            _fail(_sentence(str(exc)), EXIT_INVALID)
        except SecretKeyError as exc:
            _fail(str(exc), EXIT_FAILED)
        typer.echo(
            f"Issued client certificate SHA-256 {colon_fingerprint(new.fingerprint)}, valid until "
            f"{_date(new.not_after)}. pacsbridge sends with it from now on."
        )
        typer.echo(
            "SCPs that trust the organization's CA certificate accept it at once. An SCP that trusts only the "
            "previous client certificate rejects pacsbridge until its PACS admin adds the new one. Download it "
            f"with {_command('connections', 'client-cert', record.name)}, or better the CA certificate with "
            f"{_command('connections', 'client-cert', record.name, '--ca')}."
        )
        if previous is None:
            typer.echo("The connection had no active client certificate before.")
        elif previous.status == ClientCertificateStatus.RETIRING:
            assert previous.retire_after is not None
            typer.echo(
                f"The previous certificate SHA-256 {colon_fingerprint(previous.fingerprint)} is no longer sent. It "
                f"is marked as retiring until {_date(previous.retire_after)} ({grace_days} days), and the PACS "
                "admin can remove it from the SCP's trusted certificates."
            )
        else:
            typer.echo(
                f"The previous certificate SHA-256 {colon_fingerprint(previous.fingerprint)} is retired and no "
                "longer sent."
            )


@connections_app.command("client-cert")
def client_cert_command(
    name: Annotated[str, typer.Argument(help="Name of a connection with SCU authentication.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="Write the PEM to FILE (replacing it) instead of printing it."),
    ] = None,
    ca: Annotated[
        bool,
        typer.Option(
            "--ca",
            help="Append the organization's CA certificate after the client certificate. Recommended: an SCP "
            "that trusts the CA also accepts rotated client certificates without a change.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Print or write the active client certificate (PEM) for the PACS admin, but never its private key.

    The first certificate is issued now if the connection has none yet. Have
    the PACS admin trust the organization's CA certificate (--ca) rather than
    the client certificate alone, so that the SCP accepts the next certificate
    after 'rotate-client-cert' at once.
    """
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            record = get_connection(session, name)
        except ConnectionNotFoundError as exc:
            _fail(str(exc), EXIT_FAILED)
        active = find_active_certificate(session, record)
        if active is None and _uses_client_certificate(record):
            try:
                active, _ = ensure_client_certificate(session, record, _secret_key_or_exit())
            except (SecretKeyError, ClientCertificateError) as exc:
                _fail(_sentence(str(exc)), EXIT_FAILED)
        if active is None:
            _fail(
                f"connection {_quote(record.name)} has no client certificate. Turn on SCU authentication with "
                f"{_command('connections', 'edit', record.name, '--scu-auth', 'client-certificate')} "
                "(TLS must be active or encryption-only).",
                EXIT_FAILED,
            )
        pem = active.certificate_pem
        if ca:
            ca_pem = authority_certificate_pem(session, record)
            assert ca_pem is not None, "an issued client certificate implies its CA"
            pem += ca_pem
    ca_hint = (
        None
        if ca
        else "note: have the PACS admin trust the organization's CA certificate (recommended), which "
        f"{_command('connections', 'client-cert', record.name, '--ca')} appends, so that the SCP accepts "
        "rotated client certificates at once."
    )
    if out is None:
        typer.echo(pem, nl=False)
        if ca_hint is not None:
            typer.echo(ca_hint, err=True)
        return
    try:
        write_output_file(out, pem.encode("ascii"), mode=0o644, overwrite=True)
    except OSError as exc:
        _fail(f"cannot write {str(out)!r} ({exc.strerror or exc}). Choose another --out file.", EXIT_FAILED)
    contents = "client certificate and CA certificate" if ca else "client certificate"
    typer.echo(f"Wrote the {contents} (SHA-256 {colon_fingerprint(active.fingerprint)}) to {out}.", err=True)
    if ca_hint is not None:
        typer.echo(ca_hint, err=True)


@connections_app.command("reissue-client-certs")
def reissue_client_certs_command(
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm the replacement. Without it, only the plan is printed.")
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Replace the organization's CA and every client certificate, for when PACSBRIDGE_SECRET_KEY was lost.

    Creates a new CA and new client certificates for all connections with SCU
    authentication, encrypted with the current PACSBRIDGE_SECRET_KEY. The old
    client certificates are retired at once. No old private key is decrypted,
    so this works after the old key is lost. Every SCP that checks client
    certificates rejects pacsbridge until its PACS admin trusts the new CA
    certificate ('client-cert NAME --ca').
    """
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        secret_key = _secret_key_or_exit()
        organization = find_organization(session, DEFAULT_ORGANIZATION)
        connections = [] if organization is None else list_connections(session)
        to_issue = [record.name for record in connections if _uses_client_certificate(record)]
        authority = None if organization is None else find_authority(session, organization)
        if not yes:
            _print_reissue_plan(authority, to_issue, secret_key)
            _fail(
                f"nothing was changed. Run {_command('connections', 'reissue-client-certs', '--yes')} to make "
                "these changes.",
                EXIT_INVALID,
            )
        if authority is None and not to_issue:
            typer.echo(
                "Nothing to reissue, because the organization has no CA and no connection with SCU authentication."
            )
            return
        organization = get_or_create_organization(session, DEFAULT_ORGANIZATION)
        try:
            result = reissue_all(session, organization, secret_key)
        except ClientCertificateError as exc:
            _fail(_sentence(str(exc)), EXIT_FAILED)
        new_fingerprint = sha256_fingerprint(
            x509.load_pem_x509_certificate(result.authority.certificate_pem.encode("ascii"))
        )
        replaced = (
            f" It replaces the CA SHA-256 {colon_fingerprint(result.previous_authority_fingerprint)}."
            if result.previous_authority_fingerprint
            else ""
        )
        typer.echo(f"Created a new organization CA, SHA-256 {colon_fingerprint(new_fingerprint)}.{replaced}")
        typer.echo(f"Retired {len(result.retired)} client certificate(s).")
        for connection, certificate in result.issued:
            typer.echo(
                f"Issued client certificate SHA-256 {colon_fingerprint(certificate.fingerprint)} for connection "
                f"{_quote(connection.name)}."
            )
        if result.issued:
            typer.echo(
                "Give the new CA certificate to the PACS admin of each hospital, to trust in place of the old CA "
                "or client certificate. Until then, SCPs that check client certificates reject pacsbridge. "
                "Download it per connection with:"
            )
            for connection, _ in result.issued:
                typer.echo(f"  {_command_line('connections', 'client-cert', connection.name, '--ca')}")


def _print_reissue_plan(
    authority: CertificateAuthorityRecord | None, to_issue: list[str], secret_key: SecretKey
) -> None:
    """Print what 'reissue-client-certs --yes' would replace."""
    if authority is None:
        typer.echo("The organization has no CA yet. One would be created.")
    else:
        fingerprint = sha256_fingerprint(x509.load_pem_x509_certificate(authority.certificate_pem.encode("ascii")))
        typer.echo(f"The organization's CA SHA-256 {colon_fingerprint(fingerprint)} would be replaced by a new one.")
    names = ", ".join(_quote(name) for name in to_issue) or "(none)"
    typer.echo(f"Connections that would get a new client certificate: {names}.")
    typer.echo("All current client certificates would be retired at once.")
    typer.echo(f"The new private keys would be encrypted with the current {SECRET_KEY_ENV} (key id {secret_key.id}).")
