"""`pacsbridge worklist`: query a Modality Worklist SCP and print the scheduled patients.

Exit codes: 0 on success (also when nothing matches), 1 when the worklist is
unavailable (connection, association or failure status), 2 for invalid input.
Patient names are printed to standard output because choosing the patient is
the purpose of the command, but they never go to the log.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from typing import Annotated, NoReturn

import typer

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
from pacsbridge.connections import Problem, Severity
from pacsbridge.connections.charset import check_character_set
from pacsbridge.connections.settings import DEFAULT_TIMEOUT_SECONDS
from pacsbridge.dicomnet.association import Endpoint
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

EXIT_UNAVAILABLE = 1
EXIT_INVALID_INPUT = 2

_COLUMNS = ("Scheduled", "Patient name", "Patient ID", "Birth date", "Sex", "Accession", "Modality", "Procedure")


@app.command("worklist")
def worklist_command(
    host: Annotated[str, typer.Argument(help="Host name or IP address of the worklist SCP.")],
    port: Annotated[int, typer.Argument(help="TCP port of the worklist SCP.")],
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="Our AE title, as registered on the SCP.")],
    called_aet: Annotated[str, typer.Option("--called-aet", help="The worklist SCP's AE title.")],
    modality: Annotated[
        str, typer.Option("--modality", help="Modality of the scheduled step. An empty value or * matches any.")
    ] = "US",
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
        str,
        typer.Option(
            "--charset", help="Specific Character Set sent when a pattern is not plain ASCII, e.g. ISO_IR 192."
        ),
    ] = DEFAULT_CHARACTER_SET,
    fallback_charset: Annotated[
        str,
        typer.Option(
            "--fallback-charset", help="Character set for decoding responses that carry no Specific Character Set."
        ),
    ] = DEFAULT_CHARACTER_SET,
    max_items: Annotated[
        int, typer.Option("--max-items", min=1, help="Maximum number of items. Past it, the query is cancelled.")
    ] = DEFAULT_MAX_ITEMS,
    acse_timeout: Annotated[
        float, typer.Option("--acse-timeout", help="Seconds to wait for association set-up and release.")
    ] = DEFAULT_TIMEOUT_SECONDS,
    dimse_timeout: Annotated[
        float, typer.Option("--dimse-timeout", help="Seconds to wait for each C-FIND response.")
    ] = DEFAULT_TIMEOUT_SECONDS,
    connection_timeout: Annotated[
        float, typer.Option("--connection-timeout", help="Seconds to wait for the TCP connection.")
    ] = DEFAULT_TIMEOUT_SECONDS,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"items": [...], "warnings": [...], "truncated": bool}.')
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
) -> None:
    """Query a Modality Worklist SCP (C-FIND) and print the matching scheduled procedures."""
    _report_problems(
        check_character_set("charset", charset) + check_character_set("fallback_charset", fallback_charset)
    )
    endpoint = build_endpoint(
        host,
        port,
        calling_aet,
        called_aet,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        connection_timeout=connection_timeout,
        bind_address=bind_address,
        tls=tls_from_options(
            tls, scp_cert, client_cert, client_key, server_name, pinned_fingerprint, check_hostname, legacy_ciphers
        ),
    )

    query = WorklistQuery(
        modality=None if modality.strip() in ("", "*") else modality,
        scheduled_date=date,
        patient_name=patient_name,
        patient_id=patient_id,
        scheduled_station_ae_title=station_aet,
        character_set=charset,
    )
    try:
        build_identifier(query)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_INVALID_INPUT) from None

    announce_encryption_only_peer(endpoint)
    result = _run_query(endpoint, query, fallback_charset, max_items, as_json)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), ensure_ascii=False, indent=2))
        return
    _print_table(result, max_items)


def _report_problems(problems: list[Problem]) -> None:
    """Print warnings and errors to standard error, and exit with code 2 if any is an error."""
    for problem in problems:
        typer.echo(f"{problem.severity.value}: {problem.message}", err=True)
    if any(problem.severity == Severity.ERROR for problem in problems):
        raise typer.Exit(EXIT_INVALID_INPUT)


def _fail_unavailable(summary: str, action: str, as_json: bool) -> NoReturn:
    """Report a failed query on stderr (and as JSON on stdout with --json), then exit 1.

    The JSON carries "ok": false and no "items" key, so no script can read a
    failed query as an empty worklist.
    """
    typer.echo(f"worklist unavailable: {summary} {action}", err=True)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": {"summary": summary, "action": action}}, ensure_ascii=False))
    raise typer.Exit(EXIT_UNAVAILABLE)


def _run_query(
    endpoint: Endpoint, query: WorklistQuery, fallback_charset: str, max_items: int, as_json: bool
) -> WorklistResult:
    try:
        with warnings.catch_warnings():
            # pydicom also warns about misspelled character sets. The result
            # carries its own warning for each, so pydicom's copy is dropped.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
            return query_worklist(
                endpoint, query, fallback_character_set=fallback_charset, max_items=max_items
            )
    except DicomNetworkError as exc:
        _fail_unavailable(exc.failure.summary, exc.failure.action, as_json)
    except WorklistError as exc:
        _fail_unavailable(exc.summary, exc.action, as_json)


def _print_table(result: WorklistResult, max_items: int) -> None:
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if not result.items:
        typer.echo("No worklist items match the query.")
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
