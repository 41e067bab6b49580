"""`pacsbridge connections`: add, list, show and edit PACS and Modality Worklist connections.

Invalid settings print one line per problem on stderr, in the form
"error: <field> <value>: <reason>. <fix>", and exit with status 2 without
storing anything. Warnings print as "warning: ..." and the connection is saved.
An unknown connection name exits with status 1.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.cli.app import app
from pacsbridge.config import DATA_DIR_ENV, ConfigError, load_config
from pacsbridge.connections import (
    ConnectionKind,
    ConnectionSettings,
    InvalidSettingsError,
    Problem,
    Severity,
    TlsMode,
)
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

LOGGER = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_INVALID = 2

connections_app = typer.Typer(
    name="connections",
    help="Add, list, show and edit PACS (C-STORE) and Modality Worklist connections.",
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
    "scu_authentication": "--scu-auth",
    "image_compression": "--image-compression",
    "loop_compression": "--loop-compression",
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
        help="SHA-256 fingerprint of the SCP certificate to accept in encryption-only mode, 64 lower-case hex "
        "digits. An empty value removes it.",
    ),
]
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


class _OptionProblem(Exception):
    """Raised when an option value cannot be turned into a setting, such as an unreadable file."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _fail(message: str, exit_code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def open_sessions(data_dir: Path | None) -> Iterator[sessionmaker[Session]]:
    """Open (and migrate) the database of `data_dir`, exiting with status 1 when that fails."""
    try:
        sessions = open_database(load_config(data_dir))
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
    """Return the PEM text of the certificate file at `path_text`, converted from DER if needed.

    An empty path returns None, which removes the certificate.
    """
    if path_text == "":
        return None
    path = Path(path_text).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _OptionProblem(
            Problem.error(
                CERTIFICATE_FIELD,
                path_text,
                f"cannot be read ({exc.strerror or exc})",
                "Give the path of the SCP's certificate file.",
            )
        ) from exc

    if b"-----BEGIN" in data:
        # Non-ASCII bytes become U+FFFD, and validation then reports the file if it contains no certificate.
        return data.decode("ascii", errors="replace")
    try:
        certificate = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise _OptionProblem(
            Problem.error(
                CERTIFICATE_FIELD,
                path_text,
                "is neither a PEM nor a DER certificate",
                "Give the SCP's certificate in PEM, Base64 .cer or DER form.",
            )
        ) from exc
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


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
    "pinned_fingerprint": lambda text: text or None,
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


def _certificate_summaries(pem: str | None) -> list[dict[str, str]]:
    if not pem:
        return []
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii", errors="replace"))
    except ValueError:
        return [{"error": "the stored certificate cannot be parsed"}]
    return [
        {
            "subject": certificate.subject.rfc4514_string(),
            "sha256_fingerprint": certificate.fingerprint(hashes.SHA256()).hex(),
            "not_valid_after": certificate.not_valid_after_utc.isoformat(),
        }
        for certificate in certificates
    ]


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
    data["security"] = _security_label(record)
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


def _certificate_text(summary: Mapping[str, str]) -> str:
    if "error" in summary:
        return summary["error"]
    return (
        f"{summary['subject']}, SHA-256 {summary['sha256_fingerprint']}, valid until {summary['not_valid_after']}"
    )


def _show_lines(record: ConnectionRecord) -> list[str]:
    certificates = _certificate_summaries(record.scp_certificate_pem)
    if certificates:
        certificate_text = "; ".join(_certificate_text(summary) for summary in certificates)
    else:
        certificate_text = "(none)"

    pairs = [
        ("name", record.name),
        ("kind", _kind_description(record.kind)),
        ("host", record.host),
        ("port", str(record.port)),
        ("calling_ae_title", _quote(record.calling_ae_title)),
        ("called_ae_title", _quote(record.called_ae_title)),
        ("security", _security_description(record)),
        ("tls_mode", record.tls_mode.value),
        ("scp_certificate", certificate_text),
        ("pinned_fingerprint", record.pinned_fingerprint or "(none)"),
        ("scu_authentication", record.scu_authentication.value),
        ("timezone", record.timezone),
        ("character_set", record.character_set),
        ("image_compression", record.image_compression.value),
        ("loop_compression", record.loop_compression.value),
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
    return f"{_quote(record.name)} ({record.kind.value}, {_address(record)}, {_security_label(record)})"


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


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
    scu_auth: ScuAuthOption = None,
    image_compression: ImageCompressionOption = None,
    loop_compression: LoopCompressionOption = None,
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
            "scu_authentication": scu_auth,
            "image_compression": image_compression,
            "loop_compression": loop_compression,
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
        _print_problems(report.warnings, labels)
        typer.echo(f"Added connection {_summary(record)}.")


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
    timezone: TimezoneOption = None,
    charset: CharsetOption = None,
    tls: TlsOption = None,
    scp_cert: ScpCertOption = None,
    pinned_fingerprint: PinnedFingerprintOption = None,
    scu_auth: ScuAuthOption = None,
    image_compression: ImageCompressionOption = None,
    loop_compression: LoopCompressionOption = None,
    monochrome: MonochromeOption = None,
    acse_timeout: AcseTimeoutOption = None,
    dimse_timeout: DimseTimeoutOption = None,
    connection_timeout: ConnectionTimeoutOption = None,
    worklist_filters: WorklistFiltersOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Change the given fields of a connection. Options not given keep their values."""
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
            "scu_authentication": scu_auth,
            "image_compression": image_compression,
            "loop_compression": loop_compression,
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
        merged = to_settings(record).replace(**changes)
        report = check_connection(session, merged, existing=record)
        _exit_if_errors(_collect_problems(option_problems, [], report.problems), labels)
        try:
            record, report = update_connection(session, name, **changes)
        except InvalidSettingsError as exc:
            _exit_if_errors(exc.problems, labels)
            raise
        _print_problems(report.warnings, labels)
        typer.echo(f"Updated connection {_summary(record)}.")


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
                _security_label(record),
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
