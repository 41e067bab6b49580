"""`pacsbridge worklist`: query a Modality Worklist SCP and print the scheduled patients.

Two forms: `worklist HOST PORT --calling-aet A --called-aet B ...` queries any
SCP with options given on the command line, and `worklist --connection NAME`
queries the organization's stored worklist connection with its stored
filters, timeouts and TLS settings.

Exit codes: 0 on success (also when nothing matches), 1 when the worklist is
unavailable (connection, association or failure status) or not configured,
2 for invalid input. Patient names are printed to standard output because
choosing the patient is the purpose of the command, but they never go to the log.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy.orm import Session

from pacsbridge.cli.app import app
from pacsbridge.cli.common import (
    BindAddressOpt,
    CheckHostnameOpt,
    ClientCertOpt,
    ClientKeyOpt,
    LegacyCiphersOpt,
    PinnedFingerprintOpt,
    ScpCertOpt,
    ServerNameOpt,
    TlsOpt,
    announce_encryption_only_peer,
    build_endpoint,
    tls_from_options,
)
from pacsbridge.cli.connections_cmd import (
    DataDirOption,
    load_config_or_exit,
    open_sessions,
)
from pacsbridge.connections import InvalidSettingsError, Problem, Severity
from pacsbridge.connections.charset import check_character_set
from pacsbridge.connections.settings import DEFAULT_TIMEOUT_SECONDS
from pacsbridge.dicomnet.failures import DicomNetworkError
from pacsbridge.dicomnet.worklist import (
    DEFAULT_CHARACTER_SET,
    DEFAULT_MAX_ITEMS,
    WorklistError,
    WorklistItem,
    WorklistQuery,
    WorklistResult,
    build_identifier,
    query_worklist,
)
from pacsbridge.ingest.stored_worklist import (
    NotTheWorklistError,
    StoredWorklist,
    WorklistNotConfiguredError,
    load_stored_worklist,
    query_stored_worklist,
)
from pacsbridge.tls.client_ca import ClientCertificateError
from pacsbridge.tls.secret_key import SecretKeyError

EXIT_UNAVAILABLE = 1
EXIT_INVALID_INPUT = 2

_ADD_CONNECTION_ACTION = (
    "Add one with 'pacsbridge connections add NAME --kind mwl --host HOST --port PORT "
    "--calling-aet AET --called-aet AET'."
)
# Options of the HOST PORT form, which the stored connection sets in the --connection form.
_DIRECT_ONLY_OPTIONS = (
    ("--calling-aet", "calling_aet"),
    ("--called-aet", "called_aet"),
    ("--modality", "modality"),
    ("--date", "date"),
    ("--station-aet", "station_aet"),
    ("--charset", "charset"),
    ("--fallback-charset", "fallback_charset"),
    ("--acse-timeout", "acse_timeout"),
    ("--dimse-timeout", "dimse_timeout"),
    ("--connection-timeout", "connection_timeout"),
    ("--tls", "tls"),
    ("--scp-cert", "scp_cert"),
    ("--client-cert", "client_cert"),
    ("--client-key", "client_key"),
    ("--server-name", "server_name"),
    ("--pinned-fingerprint", "pinned_fingerprint"),
    ("--check-hostname", "check_hostname"),
    ("--legacy-ciphers", "legacy_ciphers"),
)

_COLUMNS = ("Scheduled", "Patient name", "Patient ID", "Birth date", "Sex", "Accession", "Modality", "Procedure")


@app.command("worklist")
def worklist_command(
    host: Annotated[
        str | None, typer.Argument(help="Host name or IP address of the worklist SCP (not with --connection).")
    ] = None,
    port: Annotated[int | None, typer.Argument(help="TCP port of the worklist SCP (not with --connection).")] = None,
    connection: Annotated[
        str | None,
        typer.Option(
            "--connection",
            metavar="NAME",
            help="Query the organization's stored worklist connection NAME with its stored filters, "
            "timeouts and TLS settings, instead of HOST PORT.",
        ),
    ] = None,
    calling_aet: Annotated[
        str | None, typer.Option("--calling-aet", help="Our AE title, as registered on the SCP.")
    ] = None,
    called_aet: Annotated[str | None, typer.Option("--called-aet", help="The worklist SCP's AE title.")] = None,
    modality: Annotated[
        str | None,
        typer.Option("--modality", help="Modality of the scheduled step (default US). An empty value or * matches any."),
    ] = None,
    date: Annotated[
        str | None,
        typer.Option("--date", help="Scheduled date YYYYMMDD or range YYYYMMDD-YYYYMMDD (either end may be open)."),
    ] = None,
    patient_name: Annotated[
        str | None, typer.Option("--patient-name", help="Patient name pattern, where * and ? are wildcards.")
    ] = None,
    patient_id: Annotated[
        str | None, typer.Option("--patient-id", help="Patient ID. Some SCPs also accept the * and ? wildcards.")
    ] = None,
    station_aet: Annotated[
        str | None, typer.Option("--station-aet", help="Scheduled Station AE Title to match.")
    ] = None,
    charset: Annotated[
        str | None,
        typer.Option(
            "--charset",
            help=f"Specific Character Set sent when a pattern is not plain ASCII, e.g. ISO_IR 192 "
            f"(default {DEFAULT_CHARACTER_SET}).",
        ),
    ] = None,
    fallback_charset: Annotated[
        str | None,
        typer.Option(
            "--fallback-charset",
            help=f"Character set for decoding responses that carry no Specific Character Set "
            f"(default {DEFAULT_CHARACTER_SET}).",
        ),
    ] = None,
    max_items: Annotated[
        int, typer.Option("--max-items", min=1, help="Maximum number of items. Past it, the query is cancelled.")
    ] = DEFAULT_MAX_ITEMS,
    acse_timeout: Annotated[
        float | None,
        typer.Option(
            "--acse-timeout",
            help=f"Seconds to wait for association set-up and release (default {DEFAULT_TIMEOUT_SECONDS:g}).",
        ),
    ] = None,
    dimse_timeout: Annotated[
        float | None,
        typer.Option(
            "--dimse-timeout", help=f"Seconds to wait for each C-FIND response (default {DEFAULT_TIMEOUT_SECONDS:g})."
        ),
    ] = None,
    connection_timeout: Annotated[
        float | None,
        typer.Option(
            "--connection-timeout",
            help=f"Seconds to wait for the TCP connection (default {DEFAULT_TIMEOUT_SECONDS:g}).",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print {"ok": true, "items": [...], "warnings": [...], "truncated": bool}, or "ok": false '
            'with an "error" object. The --connection form adds "configured".',
        ),
    ] = False,
    show_query: Annotated[
        bool,
        typer.Option(
            "--show-query",
            help="Also print the identifier sent and every response received, including those the local "
            "filter removed, as DICOM dumps (tag, keyword, VR, value).",
        ),
    ] = False,
    bind_address: BindAddressOpt = None,
    tls: TlsOpt = None,
    scp_cert: ScpCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    server_name: ServerNameOpt = None,
    pinned_fingerprint: PinnedFingerprintOpt = None,
    check_hostname: CheckHostnameOpt = False,
    legacy_ciphers: LegacyCiphersOpt = False,
    data_dir: DataDirOption = None,
) -> None:
    """Query a Modality Worklist SCP (C-FIND) and print the matching scheduled procedures.

    Give either HOST PORT with --calling-aet and --called-aet, or --connection
    NAME for the stored worklist connection of the organization.
    """
    options = locals()
    if connection is not None:
        conflicting = [flag for flag, name in _DIRECT_ONLY_OPTIONS if options[name] not in (None, False)]
        if host is not None or port is not None or conflicting:
            address = ["HOST PORT"] if host is not None else []
            _fail_input(
                f"--connection uses the stored connection's settings, so {', '.join(address + conflicting)} cannot be "
                "given with it. Change stored settings with 'pacsbridge connections edit NAME'."
            )
        _query_stored(connection, patient_name, patient_id, max_items, as_json, show_query, bind_address, data_dir)
        return
    if host is None or port is None or calling_aet is None or called_aet is None:
        _fail_input(
            "give HOST PORT with --calling-aet and --called-aet, or --connection NAME for the stored worklist "
            "connection."
        )

    charset = DEFAULT_CHARACTER_SET if charset is None else charset
    fallback_charset = DEFAULT_CHARACTER_SET if fallback_charset is None else fallback_charset
    _report_problems(
        check_character_set("charset", charset) + check_character_set("fallback_charset", fallback_charset)
    )
    endpoint = build_endpoint(
        host,
        port,
        calling_aet,
        called_aet,
        acse_timeout=DEFAULT_TIMEOUT_SECONDS if acse_timeout is None else acse_timeout,
        dimse_timeout=DEFAULT_TIMEOUT_SECONDS if dimse_timeout is None else dimse_timeout,
        connection_timeout=DEFAULT_TIMEOUT_SECONDS if connection_timeout is None else connection_timeout,
        bind_address=bind_address,
        tls=tls_from_options(
            tls, scp_cert, client_cert, client_key, server_name, pinned_fingerprint, check_hostname, legacy_ciphers
        ),
    )

    modality = "US" if modality is None else modality
    query = WorklistQuery(
        modality=None if modality.strip() in ("", "*") else modality,
        scheduled_date=date,
        patient_name=patient_name,
        patient_id=patient_id,
        scheduled_station_ae_title=station_aet,
        character_set=charset,
    )
    identifier = _identifier_or_exit(query)
    if show_query and not as_json:
        _print_identifier(identifier, endpoint.address)

    announce_encryption_only_peer(endpoint)
    result = _run_query(
        lambda: query_worklist(
            endpoint, query, fallback_character_set=fallback_charset, max_items=max_items, keep_responses=show_query
        ),
        as_json,
        configured=None,
    )
    _print_result(result, max_items, as_json, show_query, extra={})


def _query_stored(
    name: str,
    patient_name: str | None,
    patient_id: str | None,
    max_items: int,
    as_json: bool,
    show_query: bool,
    bind_address: str | None,
    data_dir: Path | None,
) -> None:
    """Query the organization's stored worklist connection `name` and print the result."""
    config = load_config_or_exit(data_dir, bind_address=bind_address)
    # The transaction ends before the network I/O, so a slow SCP does not hold a database lock.
    with open_sessions(data_dir, config=config) as sessions, sessions.begin() as session:
        worklist = _load_or_exit(session, name, as_json)

    query = worklist.build_query(patient_name=patient_name, patient_id=patient_id)
    identifier = _identifier_or_exit(query)
    settings = worklist.settings
    if show_query and not as_json:
        _print_identifier(identifier, f"{settings.called_ae_title}@{settings.host}:{settings.port}")
    result = _run_query(
        lambda: query_stored_worklist(
            worklist, query, bind_address=config.bind_address, max_items=max_items, keep_responses=show_query
        ),
        as_json,
        configured=True,
    )
    # build_stored_query always sets a (start, end) pair of dates.
    start, end = query.scheduled_date  # type: ignore[misc]
    extra = {
        "configured": True,
        "connection": settings.name,
        "scheduled_dates": [start.isoformat(), end.isoformat()],
    }
    _print_result(result, max_items, as_json, show_query, extra=extra)


def _load_or_exit(session: Session, name: str, as_json: bool) -> StoredWorklist:
    try:
        return load_stored_worklist(session, name=name)
    except WorklistNotConfiguredError as exc:
        typer.echo(f"error: {exc}", err=True)
        if as_json:
            error = {"summary": str(exc), "action": _ADD_CONNECTION_ACTION}
            typer.echo(json.dumps({"ok": False, "configured": False, "error": error}, ensure_ascii=False))
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except NotTheWorklistError as exc:
        # A wrong name is an input error, not an outage of the worklist server.
        typer.echo(f"error: {exc}. Give that name with --connection.", err=True)
        if as_json:
            error = {"summary": f"{exc}.", "action": "Give that name with --connection."}
            typer.echo(json.dumps({"ok": False, "configured": True, "error": error}, ensure_ascii=False))
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    except InvalidSettingsError as exc:
        summary = "the stored worklist filters are invalid: " + " ".join(
            problem.message for problem in exc.problems
        )
        action = f'Correct them with "pacsbridge connections edit {name} --worklist-filters JSON".'
        _fail_unavailable(summary, action, as_json, configured=True, exit_code=EXIT_INVALID_INPUT)
    except (SecretKeyError, ClientCertificateError) as exc:
        _fail_unavailable(
            f"the client certificate cannot be loaded: {exc}.",
            "Check PACSBRIDGE_SECRET_KEY, or issue a new client certificate.",
            as_json,
            configured=True,
        )


def _identifier_or_exit(query: WorklistQuery) -> Dataset:
    try:
        return build_identifier(query)
    except ValueError as exc:
        _fail_input(str(exc))


def _fail_input(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_INVALID_INPUT)


def _report_problems(problems: list[Problem]) -> None:
    """Print warnings and errors to standard error, and exit with code 2 if any is an error."""
    for problem in problems:
        typer.echo(f"{problem.severity.value}: {problem.message}", err=True)
    if any(problem.severity == Severity.ERROR for problem in problems):
        raise typer.Exit(EXIT_INVALID_INPUT)


def _fail_unavailable(
    summary: str,
    action: str,
    as_json: bool,
    *,
    configured: bool | None = None,
    exit_code: int = EXIT_UNAVAILABLE,
) -> NoReturn:
    """Report a failed query on stderr (and as JSON on stdout with --json), then exit.

    The JSON carries "ok": false and no "items" key, so no script can read a
    failed query as an empty worklist. `configured` is added to the JSON in
    the --connection form.
    """
    typer.echo(f"worklist unavailable: {summary} {action}", err=True)
    if as_json:
        data: dict[str, object] = {"ok": False}
        if configured is not None:
            data["configured"] = configured
        data["error"] = {"summary": summary, "action": action}
        typer.echo(json.dumps(data, ensure_ascii=False))
    raise typer.Exit(exit_code)


def _run_query(run: Callable[[], WorklistResult], as_json: bool, *, configured: bool | None) -> WorklistResult:
    try:
        with warnings.catch_warnings():
            # pydicom also warns about misspelled character sets. The result
            # carries its own warning for each, so pydicom's copy is dropped.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
            return run()
    except DicomNetworkError as exc:
        _fail_unavailable(exc.failure.summary, exc.failure.action, as_json, configured=configured)
    except WorklistError as exc:
        _fail_unavailable(exc.summary, exc.action, as_json, configured=configured)


def _print_result(
    result: WorklistResult, max_items: int, as_json: bool, show_query: bool, *, extra: dict[str, object]
) -> None:
    if as_json:
        data = result.as_dict()
        data.update(extra)
        if show_query:
            data["query"] = {
                "identifier": dump_dataset(result.identifier),
                "responses": [
                    {"kept": response.kept, "identifier": dump_dataset(response.identifier)}
                    for response in result.responses
                ],
            }
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    if show_query:
        _print_responses(result)
    _print_table(result, max_items)


def _print_identifier(identifier: Dataset, address: str) -> None:
    typer.echo(f"C-FIND identifier sent to {address}:")
    for line in dump_dataset(identifier):
        typer.echo(f"  {line}")


def _print_responses(result: WorklistResult) -> None:
    typer.echo(f"{len(result.responses)} responses received.")
    for number, response in enumerate(result.responses, start=1):
        verdict = "kept" if response.kept else "removed by the local filter: no scheduled step matches"
        typer.echo(f"Response {number} ({verdict}):")
        for line in dump_dataset(response.identifier):
            typer.echo(f"  {line}")
    typer.echo("")


def dump_dataset(dataset: Dataset, depth: int = 0) -> list[str]:
    """Return one line per element: tag, keyword, VR and value, with sequence items indented.

    An empty value prints as [], which in a query identifier is a universal
    matching key: it matches any value and requests the value in the response.
    """
    indent = "  " * depth
    lines = []
    for element in dataset:
        tag = f"({element.tag.group:04X},{element.tag.element:04X})"
        keyword = element.keyword or "(unknown)"
        if element.VR == "SQ":
            items = element.value or []
            lines.append(f"{indent}{tag} {keyword} SQ ({len(items)} items)")
            for number, item in enumerate(items, start=1):
                lines.append(f"{indent}  item {number}:")
                lines += dump_dataset(item, depth + 2)
            continue
        lines.append(f"{indent}{tag} {keyword} {element.VR} [{_element_text(element)}]")
    return lines


def _element_text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, MultiValue):
        return "\\".join(str(part) for part in value)
    return str(value)


def _print_table(result: WorklistResult, max_items: int) -> None:
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if not result.items:
        keys = _matching_keys(result.identifier)
        typer.echo(f"No worklist items match the query ({keys})." if keys else "No worklist items match the query.")
        return
    rows = [_COLUMNS] + [_row(item) for item in result.items]
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    for index, row in enumerate(rows):
        typer.echo("  ".join(_pad(cell, width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            typer.echo("  ".join("-" * width for width in widths))
    if result.truncated:
        typer.echo(
            f"Showing the first {max_items} items; more matched. Narrow the query or raise --max-items.",
            err=True,
        )


# Matching keys of the scheduled step that narrow a query, named as admins name them.
_STEP_KEYS = (
    ("Modality", "modality"),
    ("ScheduledProcedureStepStartDate", "scheduled date"),
    ("ScheduledStationAETitle", "station AE title"),
    ("ScheduledStationName", "station name"),
    ("ScheduledProcedureStepLocation", "location"),
)


def _matching_keys(identifier: Dataset | None) -> str:
    """List the non-empty scheduled-step keys of the identifier sent, so that an empty result can be explained."""
    if identifier is None or not identifier.get("ScheduledProcedureStepSequence"):
        return ""
    step = identifier.ScheduledProcedureStepSequence[0]
    parts = [f"{label} {step.get(keyword)}" for keyword, label in _STEP_KEYS if step.get(keyword)]
    if identifier.get("PatientName") or identifier.get("PatientID"):
        parts.append("patient name or ID pattern")
    return ", ".join(parts)


def _row(item: WorklistItem) -> tuple[str, ...]:
    step = item.first_step
    scheduled = ""
    if step is not None:
        scheduled = " ".join(part for part in (_format_date(step.start_date), _format_time(step.start_time)) if part)
    modalities = dict.fromkeys(s.modality for s in item.scheduled_steps if s.modality)
    procedure = item.requested_procedure_description or (step.description if step else None)
    return (
        scheduled,
        item.patient_name,
        item.patient_id or "",
        _format_date(item.birth_date),
        item.sex or "",
        item.accession_number or "",
        "/".join(modalities),
        procedure or "",
    )


def _format_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def _format_time(value: str | None) -> str:
    if value and len(value) >= 4 and value[:4].isdigit():
        return f"{value[:2]}:{value[2:4]}"
    return value or ""


def _display_width(text: str) -> int:
    """Return the terminal columns `text` takes: wide East Asian characters take two."""
    return sum(2 if unicodedata.east_asian_width(character) in ("W", "F") else 1 for character in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _display_width(text))
