"""`pacsbridge deliveries`: the state of each instance towards each PACS, and the admin's actions on it.

`pacsbridge deliveries` lists them, and `retry`, `cancel` and `release` change
deliveries by id (the ID column of the list) or, where offered, all at once
with --all. Unknown ids and deliveries in a state the action does not apply
to exit with status 1 and change nothing.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pacsbridge.cli.app import app
from pacsbridge.cli.common import EXIT_FAILED, EXIT_INVALID_INPUT, fail, print_json
from pacsbridge.cli.connections_cmd import DataDirOption, JsonOption, open_sessions
from pacsbridge.db.forwarding import DeliveryState
from pacsbridge.db.models import utc_now
from pacsbridge.forward.status import (
    ActionResult,
    DeliveryActionError,
    StudyView,
    cancel,
    held_hint,
    list_studies,
    release,
    retry_now,
    summarize,
)
from pacsbridge.ingest.archives import ArchiveNotFoundError, StudyNotFoundError

deliveries_app = typer.Typer(
    name="deliveries",
    help="Show the state of every instance towards every linked PACS, and retry, cancel or release deliveries.",
)
app.add_typer(deliveries_app, name="deliveries")

IdsArgument = Annotated[
    list[int] | None,
    typer.Argument(metavar="ID...", help="Delivery ids, as in the ID column of 'pacsbridge deliveries'."),
]
AllOption = Annotated[bool, typer.Option("--all", help="Apply to every delivery the action applies to.")]
ArchiveOption = Annotated[str | None, typer.Option("--archive", metavar="NAME", help="Only studies of this archive.")]
StudyOption = Annotated[
    str | None, typer.Option("--study", metavar="UID", help="Only the study with this Study Instance UID.")
]


@deliveries_app.callback(invoke_without_command=True)
def list_command(
    ctx: typer.Context,
    archive: ArchiveOption = None,
    study: StudyOption = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """List deliveries per study and destination, with their state, tries and reasons.

    The state of a study towards a destination is one of: delivered (every
    delivery stored), in progress (any queued, sending or retrying), held
    (needs release), partial (some stored, the others failed, cancelled or
    needing attention), needs attention, failed, or cancelled.
    """
    if ctx.invoked_subcommand is not None:
        return
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            studies = list_studies(session, archive=archive, study_uid=study, with_attempts=json_output)
        except (ArchiveNotFoundError, StudyNotFoundError) as exc:
            fail(f"error: {exc}", EXIT_FAILED)
    if json_output:
        print_json({"studies": [view.as_dict() for view in studies]})
        return
    if not studies:
        typer.echo(
            "No deliveries match. Studies get deliveries when they are uploaded to an archive linked to a PACS."
        )
        return
    for view in studies:
        _print_study(view)
    held = [row.id for view in studies for row in view.deliveries if row.state == DeliveryState.HELD]
    if held:
        typer.echo(held_hint(len(held), held))


def _print_study(view: StudyView) -> None:
    now = utc_now()
    state = view.progress.value if view.deliveries else "no deliveries"
    typer.echo(f"Study {view.study_instance_uid} (archive {view.archive}): {state}")
    for name, rows in view.destinations().items():
        stored = sum(row.state == DeliveryState.STORED for row in rows)
        progress = summarize(row.state for row in rows).value
        line = f"  {name}: {progress}, {stored} of {len(rows)} stored"
        if name in view.down:
            line += f"; {view.down[name].describe(now)}"
        typer.echo(line)
    if view.deliveries:
        header = ("ID", "DESTINATION", "SOP INSTANCE UID", "STATE", "TRIES", "DETAIL")
        rows = [
            (str(row.id), row.connection, row.sop_instance_uid, row.state.value, str(row.attempts), row.detail_at(now))
            for row in view.deliveries
        ]
        widths = [max(len(line[index]) for line in (header, *rows)) for index in range(len(header) - 1)]
        for line in (header, *rows):
            cells = [cell.ljust(width) for cell, width in zip(line, widths)]
            typer.echo("  " + "  ".join([*cells, line[-1]]).rstrip())
    if view.conflicts:
        count = len(view.conflicts)
        subject = "1 conflicting instance needs" if count == 1 else f"{count} conflicting instances need"
        typer.echo(f"  {subject} attention (not forwarded):")
        for conflict in view.conflicts:
            typer.echo(f"    {conflict.sop_instance_uid}: {conflict.reason or 'no reason recorded'}")
    typer.echo("")


def _ids_or_all(ids: list[int] | None, all_deliveries: bool, action: str) -> list[int] | None:
    if ids and all_deliveries:
        fail(f"error: give delivery ids or --all to {action}, not both.", EXIT_INVALID_INPUT)
    if not ids and not all_deliveries:
        fail(
            f'error: no deliveries given to {action}: give their ids (see "pacsbridge deliveries") or --all.',
            EXIT_INVALID_INPUT,
        )
    return None if all_deliveries else list(ids or [])


def _report(result: ActionResult, done: str, already: str) -> None:
    count = len(result.changed)
    listed = f": {_joined(result.changed)}." if result.changed else "."
    typer.echo(f"{done} {count} {'delivery' if count == 1 else 'deliveries'}{listed}")
    if result.unchanged:
        typer.echo(f"Already {already}: {_joined(result.unchanged)}.")


def _joined(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


@deliveries_app.command("retry")
def retry_command(
    ids: IdsArgument = None, all_deliveries: AllOption = False, data_dir: DataDirOption = None
) -> None:
    """Try needs-attention, failed and retrying deliveries again now."""
    selected = _ids_or_all(ids, all_deliveries, "retry")
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            result = retry_now(session, selected)
        except DeliveryActionError as exc:
            fail(f"error: {exc}.", EXIT_FAILED)
    _report(result, "Queued", "queued")


@deliveries_app.command("cancel")
def cancel_command(
    ids: Annotated[list[int], typer.Argument(metavar="ID...", help="Delivery ids to cancel.")],
    data_dir: DataDirOption = None,
) -> None:
    """Cancel deliveries, so they are not sent. Stored deliveries and deliveries being sent cannot be cancelled."""
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            result = cancel(session, ids)
        except DeliveryActionError as exc:
            fail(f"error: {exc}.", EXIT_FAILED)
    _report(result, "Cancelled", "cancelled")


@deliveries_app.command("release")
def release_command(
    ids: IdsArgument = None, all_deliveries: AllOption = False, data_dir: DataDirOption = None
) -> None:
    """Release deliveries held after a connection change, so they go to the connection's new endpoint."""
    selected = _ids_or_all(ids, all_deliveries, "release")
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            result = release(session, selected)
        except DeliveryActionError as exc:
            fail(f"error: {exc}.", EXIT_FAILED)
    _report(result, "Released", "queued")
