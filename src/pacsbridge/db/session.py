"""Open the pacsbridge database: create the engine, migrate it, hand out sessions."""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import AppConfig, prepare_data_dir
from pacsbridge.db.engine import create_database_engine
from pacsbridge.db.schema import migrate

LOGGER = logging.getLogger(__name__)


def open_database(config: AppConfig) -> sessionmaker[Session]:
    """Prepare the data directory, migrate the database to the newest schema and return a session factory.

    Use `with sessions.begin() as session:` for one transaction, and
    `close_database(sessions)` when done. Raises ConfigError for an unusable
    data directory and DatabaseError when the database cannot be opened or
    migrated.
    """
    prepare_data_dir(config)
    engine = create_database_engine(config.database_url)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    LOGGER.debug("Opened database %s", config.database_url_for_display)
    return create_session_factory(engine)


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Create the session factory used across pacsbridge.

    Objects stay loaded after commit so that callers can still read them once
    the session's transaction has ended.
    """
    return sessionmaker(engine, expire_on_commit=False)


def close_database(sessions: sessionmaker[Session]) -> None:
    """Dispose of the engine behind `sessions`, closing its pooled connections."""
    engine = sessions.kw.get("bind")
    if isinstance(engine, Engine):
        engine.dispose()
