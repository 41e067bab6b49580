"""Engines for SQLite and PostgreSQL.

SQLite connections get foreign keys enforced, write-ahead logging (readers do
not block the writer) and a busy timeout (a writer waits for another writer
instead of failing at once). SQLAlchemy emits BEGIN itself so that SELECT and
DDL statements run inside transactions too: in its default (legacy) mode the
`sqlite3` module begins a transaction only before INSERT, UPDATE, DELETE and
REPLACE.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.pool import StaticPool

LOGGER = logging.getLogger(__name__)

# How long a SQLite writer waits for another writer (the CLI for the service,
# or the reverse) before it fails with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Execution option that selects the statement starting a SQLite transaction.
# Migrations use BEGIN IMMEDIATE so that two processes migrating at once queue
# up instead of one failing when it upgrades its read lock.
SQLITE_BEGIN_OPTION = "pacsbridge_sqlite_begin"


class DatabaseError(RuntimeError):
    """Raised when the database cannot be opened or migrated."""


def create_database_engine(url: str | URL) -> Engine:
    """Create an engine for `url`, with the SQLite settings above when it is a SQLite URL.

    Raises DatabaseError when the URL names a database driver that is not installed.
    """
    url = make_url(url)
    options: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Every connection to an in-memory database would see its own empty
        # database, so all sessions share one connection.
        options["poolclass"] = StaticPool
        options["connect_args"] = {"check_same_thread": False}

    try:
        engine = create_engine(url, **options)
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise DatabaseError(
            f"database driver for {url.drivername!r} is not installed ({exc}). "
            "For PostgreSQL install pacsbridge with the 'postgres' extra (psycopg) "
            "and use a URL starting with postgresql+psycopg://."
        ) from exc

    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


_WAL_SWITCH_ATTEMPTS = 20


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: object) -> None:
    # Stop the sqlite3 module from issuing BEGIN on its own, because the "begin" event issues it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # An in-memory database reports "memory" and stays in that mode.
        _set_wal_mode(cursor)
    finally:
        cursor.close()


def _set_wal_mode(cursor: Any) -> None:
    # Switching a new file to WAL needs a moment of exclusive access, and
    # SQLite may report "database is locked" at once instead of waiting for
    # the busy timeout when other connections open the same file meanwhile.
    for attempt in range(_WAL_SWITCH_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _begin_sqlite_transaction(connection: Connection) -> None:
    statement = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "BEGIN")
    connection.exec_driver_sql(statement)
