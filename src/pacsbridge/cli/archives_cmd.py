"""`pacsbridge archives`: create archives and link each to up to three PACS connections.

A broken rule (a name already used, a fourth link, an MWL connection, the
same PACS twice) exits with status 2; an unknown archive or connection name
exits with status 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.cli.app import app
from pacsbridge.cli.common import command_actor, fail
from pacsbridge.cli.connections_cmd import (
    EXIT_FAILED,
    EXIT_INVALID,
    DataDirOption,
    JsonOption,
    _address,
    _command,
    _echo_json,
    _quote,
    _security_label,
    _table,
    open_sessions,
)
from pacsbridge.connections import TlsMode
from pacsbridge.db import ConnectionNotFoundError
from pacsbridge.db.engine import SQLITE_BEGIN_OPTION
from pacsbridge.db.forwarding import MAX_LINKS, Archive, ArchiveLink, Study
from pacsbridge.db.models import utc_now
from pacsbridge.forward.health import DestinationDown, find_down
from pacsbridge.ingest.archives import (
    ArchiveError,
    ArchiveNotFoundError,
    create_archive,
    get_archive,
    link_pacs,
    list_archives,
    unlink,
)

archives_app = typer.Typer(
    name="archives",
    help="Create archives and link each to up to three PACS, which receive every study stored in it.",
    no_args_is_help=True,
)
app.add_typer(archives_app, name="archives")


@contextlib.contextmanager
def write_transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """Begin a transaction that will write, taking the SQLite write lock at BEGIN.

    In WAL mode, a SQLite transaction that reads first and writes later fails
    at once with "database is locked" when another connection, such as a
    worker, committed in between, because its snapshot is stale. BEGIN
    IMMEDIATE waits for the lock (up to the busy timeout) instead. The option
    has no effect on PostgreSQL.
    """
    with sessions.begin() as session:
        session.connection(execution_options={SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        yield session


def fail_error(message: str, code: int) -> NoReturn:
    fail(f"error: {message}", code)


@archives_app.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="Name of the archive, unique in the organization.")],
    test: Annotated[
        bool,
        typer.Option(
            "--test",
            help="Make it a test archive: its studies count as test data, which unsecured (non-TLS) PACS may receive.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Create an archive. Link PACS to it with 'pacsbridge archives link'."""
    with open_sessions(data_dir) as sessions, write_transaction(sessions) as session:
        try:
            archive = create_archive(session, name, is_test=test, actor=command_actor())
        except ArchiveError as exc:
            fail_error(f"{exc}.", EXIT_INVALID)
        kind = "test archive" if archive.is_test else "archive"
        typer.echo(
            f"Created {kind} {_quote(archive.name)}. Link a PACS with "
            f"{_command('archives', 'link', archive.name, 'CONNECTION')}."
        )


@archives_app.command("link")
def link_command(
    archive_name: Annotated[str, typer.Argument(metavar="ARCHIVE", help="Name of the archive.")],
    connection_name: Annotated[
        str, typer.Argument(metavar="CONNECTION", help="Name of a PACS connection (kind pacs).")
    ],
    slot: Annotated[
        int | None,
        typer.Option("--slot", min=1, max=MAX_LINKS, help="Slot 1, 2 or 3 (default: the first free slot)."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Link a PACS to an archive: studies uploaded from now on are forwarded to it.

    Studies stored before the link are not sent to it; send them with 'pacsbridge studies resend'.
    """
    with open_sessions(data_dir) as sessions, write_transaction(sessions) as session:
        try:
            link = link_pacs(session, archive_name, connection_name, slot=slot, actor=command_actor())
        except (ArchiveNotFoundError, ConnectionNotFoundError) as exc:
            fail_error(str(exc), EXIT_FAILED)
        except ArchiveError as exc:
            fail_error(f"{exc}.", EXIT_INVALID)
        archive, connection = link.archive, link.connection
        typer.echo(
            f"Linked PACS {_quote(connection.name)} to archive {_quote(archive.name)} in slot {link.slot} "
            f"({_security_label(connection)})."
        )
        if connection.tls_mode == TlsMode.INACTIVE and not archive.is_test:
            tls_command = _command("connections", "edit", connection.name, "--tls", "active", "--scp-cert", "FILE")
            typer.echo(
                f"note: {_quote(connection.name)} is unsecured, so only test studies are sent to it. Deliveries "
                f"of real studies wait in needs-attention until TLS is turned on with {tls_command} "
                "(or --tls encryption-only).",
                err=True,
            )
        stored = session.scalar(select(func.count()).select_from(Study).where(Study.archive_id == archive.id))
        if stored:
            if stored == 1:
                studies = "the study already in the archive is"
            else:
                studies = f"the {stored} studies already in the archive are"
            resend = _command("studies", "resend", "UID", "--connection", connection.name)
            typer.echo(
                f"note: {studies} not sent to {_quote(connection.name)}. Send one with {resend}.",
                err=True,
            )


@archives_app.command("unlink")
def unlink_command(
    archive_name: Annotated[str, typer.Argument(metavar="ARCHIVE", help="Name of the archive.")],
    slot: Annotated[int, typer.Option("--slot", min=1, max=MAX_LINKS, help="Slot of the link to remove (1-3).")],
    data_dir: DataDirOption = None,
) -> None:
    """Remove the PACS link in a slot and cancel the deliveries to it that are still waiting."""
    with open_sessions(data_dir) as sessions, write_transaction(sessions) as session:
        try:
            link, cancelled = unlink(session, archive_name, slot, actor=command_actor())
        except ArchiveNotFoundError as exc:
            fail_error(str(exc), EXIT_FAILED)
        except ArchiveError as exc:
            fail_error(f"{exc}.", EXIT_INVALID)
        typer.echo(
            f"Unlinked PACS {_quote(link.connection.name)} from slot {slot} of archive "
            f"{_quote(link.archive.name)}; cancelled {cancelled} waiting "
            f"{'delivery' if cancelled == 1 else 'deliveries'} to it."
        )


@archives_app.command("list")
def list_command(json_output: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """List the archives with their linked PACS and number of studies."""
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        archives = list_archives(session)
        data = [archive_to_dict(session, archive) for archive in archives]
    if json_output:
        _echo_json(data)
        return
    if not data:
        typer.echo("No archives yet. Create one with 'pacsbridge archives create NAME'.")
        return
    header = ("NAME", "TEST", "STUDIES", "LINKED PACS")
    rows = [
        (
            item["name"],
            "yes" if item["is_test"] else "no",
            str(item["studies"]),
            ", ".join(f"{link['slot']}: {link['connection']} ({link['security']})" for link in item["links"])
            or "-",
        )
        for item in data
    ]
    for line in _table(header, rows):
        typer.echo(line)


@archives_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Name of the archive.")],
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show one archive and its links: slot, connection, and whether the connection is secured by TLS."""
    with open_sessions(data_dir) as sessions, sessions.begin() as session:
        try:
            archive = get_archive(session, name)
        except ArchiveNotFoundError as exc:
            fail_error(str(exc), EXIT_FAILED)
        data = archive_to_dict(session, archive)
    if json_output:
        _echo_json(data)
        return
    typer.echo(f"Archive {_quote(data['name'])}")
    typer.echo(f"  test archive: {'yes' if data['is_test'] else 'no'}")
    typer.echo(f"  studies: {data['studies']}")
    typer.echo(f"  created: {data['created_at']}")
    if not data["links"]:
        typer.echo(f"  links: none. Link a PACS with {_command('archives', 'link', data['name'], 'CONNECTION')}.")
        return
    rows = [
        (
            str(link["slot"]),
            link["connection"],
            link["address"],
            link["security"],
            "yes" if link["test_only"] else "no",
            link["destination_text"],
        )
        for link in data["links"]
    ]
    for line in _table(("SLOT", "CONNECTION", "ADDRESS", "SECURITY", "TEST ONLY", "DESTINATION"), rows):
        typer.echo(f"  {line}")


def archive_to_dict(session: Session, archive: Archive) -> dict[str, Any]:
    studies = session.scalar(select(func.count()).select_from(Study).where(Study.archive_id == archive.id))
    down = find_down(session, [link.connection_id for link in archive.links])
    now = utc_now()
    return {
        "name": archive.name,
        "is_test": archive.is_test,
        "created_at": archive.created_at.isoformat(),
        "studies": studies or 0,
        "links": [_link_to_dict(link, down.get(link.connection_id), now) for link in archive.links],
    }


def _link_to_dict(link: ArchiveLink, down: DestinationDown | None, now: dt.datetime) -> dict[str, Any]:
    connection = link.connection
    return {
        "slot": link.slot,
        "connection": connection.name,
        "address": _address(connection),
        "security": "unsecured" if connection.tls_mode == TlsMode.INACTIVE else "secured",
        "tls_mode": connection.tls_mode.value,
        "test_only": connection.test_only,
        # "up" also covers a destination that no worker has tried yet.
        "destination": {"state": "up"} if down is None else down.as_dict(),
        "destination_text": "up" if down is None else down.describe(now),
    }
