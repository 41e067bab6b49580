"""`pacsbridge upload` stores DICOM files in an archive; `pacsbridge studies` lists and resends its studies.

`upload` prints one line per file with its result. It exits with status 0
when every file was accepted (a duplicate counts as accepted), 1 when any
file was rejected or needs attention, and 2 when a PATH does not exist.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from pacsbridge.cli.app import app
from pacsbridge.cli.archives_cmd import command_actor, fail_error, write_transaction
from pacsbridge.cli.connections_cmd import (
    EXIT_FAILED,
    EXIT_INVALID,
    DataDirOption,
    JsonOption,
    _echo_json,
    _quote,
    _table,
    load_config_or_exit,
    open_sessions,
)
from pacsbridge.db import ConnectionNotFoundError
from pacsbridge.ingest.archives import (
    ArchiveError,
    ArchiveNotFoundError,
    ResendResult,
    StudyNotFoundError,
    StudySummary,
    get_archive,
    resend_study,
    summarize_studies,
)
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.files import expand_paths
from pacsbridge.ingest.upload import (
    FileOutcome,
    FileResult,
    UploadResult,
    prepare_file,
    store_files,
)

studies_app = typer.Typer(
    name="studies",
    help="List the stored studies with their delivery state per PACS, and send a study again.",
    no_args_is_help=True,
)
app.add_typer(studies_app, name="studies")


@app.command("upload")
def upload_command(
    paths: Annotated[
        list[Path], typer.Argument(metavar="PATH...", help="DICOM files, or folders to search recursively.")
    ],
    archive_name: Annotated[
        str, typer.Option("--archive", metavar="NAME", help="Archive to store the studies in.")
    ],
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Store DICOM files in an archive and queue them for every PACS linked to it.

    Each file is accepted or rejected on its own. A file already stored with
    the same bytes is a duplicate and changes nothing. A file with the SOP
    Instance UID of a stored file but other bytes is kept as a second version
    that is not forwarded (needs-attention).
    """
    missing = [path for path in paths if not path.exists()]
    if missing:
        fail_error(
            "not found: " + ", ".join(_quote(str(path)) for path in missing) + ". Check the paths.",
            EXIT_INVALID,
        )
    files = expand_paths(paths)
    if not files:
        fail_error(
            "no files found in " + ", ".join(_quote(str(path)) for path in paths) + ". Give DICOM files or "
            "folders that contain them.",
            EXIT_INVALID,
        )

    config = load_config_or_exit(data_dir)
    actor = command_actor()
    with open_sessions(None, config=config) as sessions:
        # Check the archive before copying any file, in a transaction of its own.
        with sessions.begin() as session:
            try:
                get_archive(session, archive_name)
            except ArchiveNotFoundError as exc:
                fail_error(str(exc), EXIT_FAILED)

        # Copying into the blob store happens outside any transaction, so a
        # long upload does not hold the database lock.
        blobs = BlobStore(config.blob_dir)
        prepared = [prepare_file(blobs, path) for path in files]

        with write_transaction(sessions) as session:
            try:
                result = store_files(session, archive_name, prepared, actor=actor)
            except ArchiveNotFoundError as exc:
                fail_error(f"{exc} Nothing was stored.", EXIT_FAILED)
            linked = [link.connection.name for link in get_archive(session, archive_name).links]

    if json_output:
        _echo_json(_upload_to_dict(result, linked))
    else:
        _print_upload(result, linked)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _upload_to_dict(result: UploadResult, linked: list[str]) -> dict[str, Any]:
    return {
        "archive": result.archive,
        "linked_pacs": linked,
        "ok": result.ok,
        "counts": {outcome.value: result.counts[outcome] for outcome in FileOutcome},
        "files": [file.as_dict() for file in result.files],
    }


def _file_line(file: FileResult) -> str:
    line = f"{file.result.value}: {file.path}"
    if file.sop_instance_uid:
        line += f", SOP Instance UID {file.sop_instance_uid}"
    if file.reason:
        line += f": {file.reason}"
    return line


def _print_upload(result: UploadResult, linked: list[str]) -> None:
    for file in result.files:
        typer.echo(_file_line(file))
    counts = result.counts
    typer.echo(
        f"Archive {_quote(result.archive)}: {counts[FileOutcome.ACCEPTED]} accepted, "
        f"{counts[FileOutcome.DUPLICATE]} duplicate, {counts[FileOutcome.NEEDS_ATTENTION]} need attention, "
        f"{counts[FileOutcome.REJECTED]} rejected."
    )
    if not linked:
        typer.echo(
            f"note: archive {_quote(result.archive)} links no PACS, so nothing is forwarded. Link one with "
            f"'pacsbridge archives link {_quote(result.archive)} CONNECTION', then run "
            "'pacsbridge studies resend UID'.",
            err=True,
        )
        return

    states: dict[str, Counter[str]] = {name: Counter() for name in linked}
    reasons: dict[str, str] = {}
    for file in result.files:
        for name, state in file.deliveries.items():
            states.setdefault(name, Counter())[state] += 1
        reasons.update(file.delivery_reasons)
    for name, counter in states.items():
        if not counter:
            continue
        summary = ", ".join(f"{count} {state}" for state, count in sorted(counter.items()))
        typer.echo(f"Deliveries to {_quote(name)}: {summary}.")
        if name in reasons:
            typer.echo(f"note: deliveries to {_quote(name)} need attention: {reasons[name]}.", err=True)


# studies ------------------------------------------------------------------------


@studies_app.command("list")
def studies_list_command(
    archive_name: Annotated[
        str | None, typer.Option("--archive", metavar="NAME", help="Only the studies of this archive.")
    ] = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """List the studies, newest first, with the delivery state towards each PACS.

    The state per PACS is one of these, checked in this order. "in progress":
    any delivery queued, sending, retrying or held. "failed": any failed or
    needs-attention. "delivered": all stored. "partial": some stored, the rest
    cancelled. "cancelled": all cancelled. "not queued": no deliveries, as for
    a PACS linked after the upload (send the study with 'studies resend').
    """
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            summaries = summarize_studies(session, archive_name=archive_name)
        except ArchiveNotFoundError as exc:
            fail_error(str(exc), EXIT_FAILED)
        data = [_study_to_dict(summary) for summary in summaries]
    if json_output:
        _echo_json(data)
        return
    if not data:
        typer.echo("No studies yet. Store some with 'pacsbridge upload --archive NAME PATH...'.")
        return
    header = ("STUDY INSTANCE UID", "ARCHIVE", "STUDY DATE", "PATIENT ID", "TEST", "INSTANCES", "PACS", "STATE")
    rows = []
    for item in data:
        study_cells = (
            item["study_instance_uid"],
            item["archive"],
            item["study_date"] or "-",
            item["patient_id"] or "-",
            "yes" if item["is_test"] else "no",
            _instances_cell(item),
        )
        destinations = item["destinations"] or [None]
        for destination in destinations:
            rows.append((*study_cells, *_destination_cells(destination)))
    for line in _table(header, rows):
        typer.echo(line)


def _instances_cell(item: dict[str, Any]) -> str:
    if item["conflicting_instances"]:
        return f"{item['instances']} ({item['conflicting_instances']} need attention)"
    return str(item["instances"])


def _destination_cells(destination: dict[str, Any] | None) -> tuple[str, str]:
    if destination is None:
        return "-", "no PACS linked"
    name = destination["connection"] if destination["linked"] else f"{destination['connection']} (unlinked)"
    counts = ", ".join(f"{count} {state}" for state, count in destination["counts"].items())
    state = f"{destination['state']} ({counts})" if counts else destination["state"]
    return name, state


def _study_to_dict(summary: StudySummary) -> dict[str, Any]:
    study = summary.study
    return {
        "study_instance_uid": study.study_instance_uid,
        "archive": study.archive.name,
        "is_test": study.is_test,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "issuer_of_patient_id": study.issuer_of_patient_id,
        "patient_birth_date": study.patient_birth_date,
        "patient_sex": study.patient_sex,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "created_at": study.created_at.isoformat(),
        "instances": summary.instance_count,
        "conflicting_instances": summary.conflicting_instances,
        "destinations": [
            {
                "connection": destination.connection,
                "linked": destination.linked,
                "state": destination.state,
                "counts": destination.counts,
            }
            for destination in summary.destinations
        ],
    }


@studies_app.command("resend")
def studies_resend_command(
    study_instance_uid: Annotated[str, typer.Argument(metavar="UID", help="Study Instance UID of a stored study.")],
    connection_name: Annotated[
        str | None,
        typer.Option("--connection", metavar="NAME", help="Only this linked PACS (default: every linked PACS)."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Queue a stored study again for its linked PACS.

    Creates the deliveries that are missing, for example for a PACS linked
    after the upload, and queues stored, failed, cancelled and needs-attention
    deliveries again. Deliveries still queued, being sent, retrying or held
    stay as they are.
    """
    with open_sessions(data_dir) as sessions, write_transaction(sessions) as session:
        try:
            result = resend_study(session, study_instance_uid, connection_name=connection_name, actor=command_actor())
        except (StudyNotFoundError, ConnectionNotFoundError) as exc:
            fail_error(str(exc), EXIT_FAILED)
        except ArchiveError as exc:
            fail_error(f"{exc}.", EXIT_INVALID)
    _print_resend(result)


def _print_resend(result: ResendResult) -> None:
    names = list(dict.fromkeys([*result.created, *result.reset, *result.unchanged, *result.blocked]))
    typer.echo(f"Study {result.study.study_instance_uid}:")
    if not names:
        typer.echo("  the study has no instances that can be sent, so nothing was queued.")
    for name in names:
        typer.echo(
            f"  {_quote(name)}: {result.created[name]} deliveries created, {result.reset[name]} queued again, "
            f"{result.unchanged[name]} left as they are (still queued, sending, retrying or held)."
        )
        if name in result.blocked:
            typer.echo(f"note: deliveries to {_quote(name)} need attention: {result.blocked[name]}.", err=True)
