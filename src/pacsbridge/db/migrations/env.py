"""Alembic environment of the pacsbridge database.

`pacsbridge.db.migrate` passes an open connection, already inside the
migration transaction, in `config.attributes["connection"]`. Commands run
with `pacsbridge.db.alembic_config(url)` instead get a connection from a new
engine for the `sqlalchemy.url` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from pacsbridge.db.engine import create_database_engine
from pacsbridge.db.models import Base
from pacsbridge.db.schema import migration_transaction

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Write the migration SQL to the output instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on one from `sqlalchemy.url`."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database given: build the config with pacsbridge.db.alembic_config(url)")
    engine = create_database_engine(url)
    try:
        with engine.connect() as new_connection, migration_transaction(new_connection):
            _run_on(new_connection)
    finally:
        engine.dispose()


def _run_on(connection: Connection) -> None:
    # Batch operations let the same migration scripts ALTER tables on SQLite,
    # which supports few ALTER TABLE forms, and on PostgreSQL. The DDL is
    # transactional on SQLite too, because the caller's transaction was begun
    # with an explicit BEGIN (see pacsbridge.db.engine).
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
