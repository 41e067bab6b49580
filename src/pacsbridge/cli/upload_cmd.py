"""`pacsbridge upload` stores DICOM files in an archive; `pacsbridge studies` lists and resends its studies.

`upload` prints one line per file with its result. It exits with status 0
when every file was accepted (a duplicate counts as accepted), 1 when any
file was rejected or needs attention, or when the worklist item of
--worklist-item cannot be found, and 2 for invalid input, such as a PATH
that does not exist.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session, sessionmaker

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
from pacsbridge.config import AppConfig
from pacsbridge.connections import InvalidSettingsError
from pacsbridge.db import ConnectionNotFoundError
from pacsbridge.dicomnet.failures import DicomNetworkError
from pacsbridge.dicomnet.worklist import WorklistError
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
from pacsbridge.ingest.stored_worklist import (
    WorklistNotConfiguredError,
    load_stored_worklist,
    query_stored_worklist,
)
from pacsbridge.ingest.upload import (
    FileOutcome,
    FileResult,
    UploadResult,
    prepare_file,
    store_files,
)
from pacsbridge.ingest.worklist_item import (
    WorklistItemError,
    WorklistPick,
    check_item_id,
    select_worklist_item,
    study_instance_uids,
)
from pacsbridge.tls.client_ca import ClientCertificateError
from pacsbridge.tls.secret_key import SecretKeyError

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
    worklist_item: Annotated[
        str | None,
        typer.Option(
            "--worklist-item",
            metavar="ID",
            help="Accession number or scheduled procedure step ID of a worklist item. Its patient and order "
            "identification replace those of every file, which must all belong to one study.",
        ),
    ] = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Store DICOM files in an archive and queue them for every PACS linked to it.

    Each file is accepted or rejected on its own. A file already stored with
    the same bytes is a duplicate and changes nothing. A file with the SOP
    Instance UID of a stored file but other bytes is kept as a second version
    that is not forwarded (needs-attention).

    With --worklist-item, the organization's worklist is queried with its
    stored filters, and exactly one item must carry the ID. Otherwise nothing
    is stored.
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

    if worklist_item is not None:
        worklist_item = _check_worklist_upload(worklist_item, files)

    config = load_config_or_exit(data_dir)
    actor = command_actor()
    pick: WorklistPick | None = None
    with open_sessions(None, config=config) as sessions:
        # Check the archive before copying any file, in a transaction of its own.
        with sessions.begin() as session:
            try:
                get_archive(session, archive_name)
            except ArchiveNotFoundError as exc:
                fail_error(str(exc), EXIT_FAILED)

        if worklist_item is not None:
            pick = _find_worklist_item(sessions, config, worklist_item)

        # Copying into the blob store happens outside any transaction, so a
        # long upload does not hold the database lock.
        blobs = BlobStore(config.blob_dir)
        prepared = [prepare_file(blobs, path, pick) for path in files]

        with write_transaction(sessions) as session:
            try:
                result = store_files(session, archive_name, prepared, actor=actor)
            except ArchiveNotFoundError as exc:
                fail_error(f"{exc} Nothing was stored.", EXIT_FAILED)
            linked = [link.connection.name for link in get_archive(session, archive_name).links]

    if json_output:
        data = _upload_to_dict(result, linked)
        if pick is not None:
            data["worklist_item"] = _pick_to_dict(pick)
        _echo_json(data)
    else:
        if pick is not None:
            typer.echo(_pick_line(pick))
        _print_upload(result, linked)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _check_worklist_upload(item_id: str, files: list[Path]) -> str:
    """Return the checked worklist item ID, or exit 2 when it is invalid or the files span several studies."""
    try:
        item_id = check_item_id(item_id)
    except WorklistItemError as exc:
        fail_error(f"{exc}.", EXIT_INVALID)
    studies = study_instance_uids(files)
    if len(studies) > 1:
        fail_error(
            f"the files belong to {len(studies)} studies ({', '.join(sorted(studies))}), but a worklist item "
            "describes one study: upload each study with its own --worklist-item. Nothing was stored.",
            EXIT_INVALID,
        )
    return item_id


def _find_worklist_item(sessions: sessionmaker[Session], config: AppConfig, item_id: str) -> WorklistPick:
    """Query the organization's worklist and return the item with `item_id`, or exit 1 with the reason."""
    with sessions.begin() as session:
        try:
            worklist = load_stored_worklist(session)
        except WorklistNotConfiguredError as exc:
            fail_error(f"{exc}. Nothing was stored.", EXIT_FAILED)
        except InvalidSettingsError as exc:
            problems = " ".join(problem.message for problem in exc.problems)
            fail_error(
                f"the stored worklist filters are invalid: {problems} Correct them with "
                "'pacsbridge connections edit NAME --worklist-filters JSON'. Nothing was stored.",
                EXIT_FAILED,
            )
        except (SecretKeyError, ClientCertificateError) as exc:
            fail_error(f"the worklist's client certificate cannot be loaded: {exc}. Nothing was stored.", EXIT_FAILED)

    query = worklist.build_query()
    try:
        result = query_stored_worklist(worklist, query, bind_address=config.bind_address)
    except DicomNetworkError as exc:
        fail_error(f"worklist unavailable: {exc.failure.summary} {exc.failure.action} Nothing was stored.", EXIT_FAILED)
    except WorklistError as exc:
        fail_error(f"worklist unavailable: {exc.summary} {exc.action} Nothing was stored.", EXIT_FAILED)
    try:
        return select_worklist_item(result, query, item_id)
    except WorklistItemError as exc:
        fail_error(str(exc), EXIT_FAILED)


def _pick_to_dict(pick: WorklistPick) -> dict[str, Any]:
    return {
        "item_id": pick.item_id,
        "accession_number": pick.item.accession_number,
        "study_instance_uid": pick.item.study_instance_uid,
        "performed_step_ids": [step.step_id for step in pick.steps],
    }


def _pick_line(pick: WorklistPick) -> str:
    steps = ", ".join(step.step_id for step in pick.steps if step.step_id) or "none"
    return (
        f"Worklist item {_quote(pick.item_id)}: accession number {_quote(pick.item.accession_number or '')}, "
        f"Study Instance UID {pick.item.study_instance_uid or '(kept from the files)'}, scheduled steps {steps}."
    )


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
        f"{counts[FileOutcome.DUPLICATE]} duplicate, {_needs_attention(counts[FileOutcome.NEEDS_ATTENTION])}, "
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

    The state per PACS is the first of these that applies. "in progress": a
    delivery is queued, being sent or retrying. "held (needs release)": a
    delivery is held after a connection change. "delivered": every delivery is
    stored. "partial": some are stored, the others failed, were cancelled or
    need attention. "needs attention": none is stored and some need an admin.
    "failed": none is stored and some gave up. "cancelled": all are cancelled.
    "not queued": no deliveries, as for a PACS linked after the upload (send
    the study with "pacsbridge studies resend UID").
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
        return f"{item['instances']} ({_needs_attention(item['conflicting_instances'])})"
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


def _needs_attention(count: int) -> str:
    return f"{count} {'needs' if count == 1 else 'need'} attention"


def _print_resend(result: ResendResult) -> None:
    names = list(dict.fromkeys([*result.created, *result.reset, *result.unchanged, *result.blocked]))
    typer.echo(f"Study {result.study.study_instance_uid}:")
    if not names:
        typer.echo("  the study has no instances that can be sent, so nothing was queued.")
    for name in names:
        typer.echo(f"  {_quote(name)}: {result.describe(name)}.")
