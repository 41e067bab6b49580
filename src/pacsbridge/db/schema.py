"""Run the Alembic migrations in `migrations/` without an alembic.ini file.

Every upgrade or downgrade runs in one transaction that also serializes
concurrent migrators: PostgreSQL takes a transaction-level advisory lock and
SQLite begins with BEGIN IMMEDIATE. On SQLite, foreign keys are switched off
while the migration runs, because batch migrations copy and drop tables, and
checked with PRAGMA foreign_key_check before the commit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import OperationalError

from pacsbridge.db.engine import SQLITE_BEGIN_OPTION, DatabaseError, create_database_engine

LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Key of the PostgreSQL advisory lock held while migrating. Any constant works
# as long as no other application on the same database uses it.
POSTGRES_MIGRATION_LOCK_KEY = 0x7061637362726467


def alembic_config(url: str | URL | None = None, *, connection: Connection | None = None) -> Config:
    """Build an Alembic Config for the packaged migrations.

    Pass `connection` to run commands on an open connection, as `migrate`
    does, or `url` for commands that open their own, such as
    `alembic.command.revision(alembic_config(url), autogenerate=True, message=...)`.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser treats % as interpolation, and URL-encoded passwords contain it.
        rendered = make_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision of the packaged migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}: the pacsbridge installation is incomplete")
    return head


def current_revision(target: str | URL | Engine) -> str | None:
    """Return the revision the database at `target` is at, or None before the first migration."""
    with _engine_for(target) as engine, engine.connect() as connection:
        head = _current_head(connection)
        connection.rollback()
    return head


def migrate(target: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the database at `target` (a URL or an engine) to `revision`.

    Raises DatabaseError when the database cannot be reached or is at a
    revision that the packaged migrations do not include.
    """
    _run_command(target, lambda config: command.upgrade(config, revision), f"upgrade to {revision}")


def downgrade(target: str | URL | Engine, revision: str) -> None:
    """Downgrade the database at `target` to `revision` ("base" drops every table except alembic_version)."""
    _run_command(target, lambda config: command.downgrade(config, revision), f"downgrade to {revision}")


def _run_command(target: str | URL | Engine, run: Callable[[Config], None], description: str) -> None:
    with _engine_for(target) as engine:
        display_url = engine.url.render_as_string(hide_password=True)
        try:
            with engine.connect() as connection, migration_transaction(connection):
                before = _check_known_revisions(connection)
                run(alembic_config(connection=connection))
                after = _current_head(connection)
        except OperationalError as exc:
            # Driver messages can span several lines and end with their own punctuation.
            detail = " ".join(str(exc.orig).split())
            if not detail.endswith((".", "?", "!")):
                detail += "."
            raise DatabaseError(
                f"database {display_url}: {description} failed: {detail} "
                "Check that the database server is running and that the URL, user and permissions are right."
            ) from exc
        if after != before:
            LOGGER.info("Database %s migrated from revision %s to %s", display_url, before, after)
        else:
            LOGGER.debug("Database %s already at revision %s", display_url, after)


@contextlib.contextmanager
def _engine_for(target: str | URL | Engine) -> Iterator[Engine]:
    if isinstance(target, Engine):
        yield target
        return
    engine = create_database_engine(target)
    try:
        yield engine
    finally:
        engine.dispose()


def _current_head(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    return heads[0] if heads else None


def _check_known_revisions(connection: Connection) -> str | None:
    """Return the database's current revision, raising DatabaseError if the packaged migrations lack it."""
    script = ScriptDirectory.from_config(alembic_config())
    known = {entry.revision for entry in script.walk_revisions()}
    heads = MigrationContext.configure(connection).get_current_heads()
    for head in heads:
        if head not in known:
            raise DatabaseError(
                f"database is at schema revision {head!r}, which is not among the migrations of this "
                f"pacsbridge version (newest {script.get_current_head()!r}). A newer pacsbridge probably "
                "migrated it, so run that version, or restore a backup made with this one."
            )
    return heads[0] if heads else None


@contextlib.contextmanager
def migration_transaction(connection: Connection) -> Iterator[None]:
    """Run the block in one transaction that no other migrator runs concurrently with.

    `connection` must not be in a transaction yet.
    """
    if connection.dialect.name == "sqlite":
        with _sqlite_foreign_keys_off(connection):
            connection.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            with connection.begin():
                yield
                _raise_for_foreign_key_violations(connection)
        return

    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({POSTGRES_MIGRATION_LOCK_KEY})")
        yield


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    # SQLite ignores this PRAGMA inside a transaction, so it goes straight to
    # the driver connection, which SQLAlchemy has not begun a transaction on.
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    driver_connection.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        driver_connection.execute("PRAGMA foreign_keys = ON")


def _raise_for_foreign_key_violations(connection: Connection) -> None:
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if rows:
        tables = sorted({str(row[0]) for row in rows})
        raise DatabaseError(
            f"the migration would leave {len(rows)} rows with broken foreign keys in tables {tables}, "
            "so it was rolled back. Fix the migration script before running it again."
        )
