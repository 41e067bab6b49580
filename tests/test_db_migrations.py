"""Alembic migrations and engine settings on SQLite files."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from pacsbridge.config import load_config
from pacsbridge.connections import ConnectionSettings
from pacsbridge.db import (
    Base,
    DatabaseError,
    alembic_config,
    close_database,
    create_database_engine,
    current_revision,
    downgrade,
    head_revision,
    list_connections,
    migrate,
    open_database,
    save_connection,
)
from pacsbridge.db.engine import SQLITE_BUSY_TIMEOUT_MS
from pacsbridge.db.schema import MIGRATIONS_DIR, migration_transaction

APPLICATION_TABLES = {"organizations", "connections"}


def sqlite_url(path: Path) -> URL:
    return URL.create("sqlite", database=str(path))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_database_engine(sqlite_url(tmp_path / "test.sqlite3"))
    yield engine
    engine.dispose()


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def schema_differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_migrations_are_packaged() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    newest = max(path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))
    assert head_revision() == newest


def test_migrate_fresh_sqlite_file(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fresh.sqlite3")

    assert current_revision(url) is None
    migrate(url)

    assert current_revision(url) == head_revision()
    engine = create_database_engine(url)
    try:
        assert APPLICATION_TABLES <= table_names(engine)
    finally:
        engine.dispose()


def test_migrate_twice_is_harmless(engine: Engine) -> None:
    migrate(engine)
    migrate(engine)

    assert current_revision(engine) == head_revision()


def test_models_match_migrations(engine: Engine) -> None:
    migrate(engine)

    assert schema_differences(engine) == []


def test_downgrade_base_then_upgrade_head(engine: Engine) -> None:
    migrate(engine)

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert table_names(engine) & APPLICATION_TABLES == set()

    migrate(engine, "head")
    assert current_revision(engine) == head_revision()
    assert APPLICATION_TABLES <= table_names(engine)
    assert schema_differences(engine) == []


def test_worklist_index_is_partial(engine: Engine) -> None:
    migrate(engine)

    indexes = {index["name"]: index for index in inspect(engine).get_indexes("connections")}
    index = indexes["uq_connections_one_mwl_per_organization"]
    assert index["unique"]
    assert index["column_names"] == ["organization_id"]
    with engine.connect() as connection:
        sql = connection.scalar(
            text("SELECT sql FROM sqlite_master WHERE name = 'uq_connections_one_mwl_per_organization'")
        )
    assert "WHERE kind = 'mwl'" in sql


def test_sqlite_connection_settings(engine: Engine) -> None:
    migrate(engine)

    with engine.connect() as connection:
        foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        journal_mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        busy_timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()

    assert foreign_keys == 1
    assert journal_mode == "wal"
    assert busy_timeout == SQLITE_BUSY_TIMEOUT_MS


def test_foreign_keys_enforced_after_migration(engine: Engine) -> None:
    migrate(engine)

    with engine.connect() as connection, pytest.raises(IntegrityError):
        connection.execute(
            text(
                "INSERT INTO connections (organization_id, name, kind, host, port, calling_ae_title, "
                "called_ae_title, timezone, character_set, tls_mode, scu_authentication, image_compression, "
                "loop_compression, monochrome, acse_timeout, dimse_timeout, connection_timeout, test_only, "
                "worklist_filters, created_at, updated_at) VALUES (999, 'x', 'pacs', '127.0.0.1', 104, 'A', "
                "'B', 'UTC', 'ISO_IR 100', 'inactive', 'anonymous', 'as-received', 'as-received', 'never', "
                "300, 300, 300, 0, '{}', '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )
        )


def test_check_constraint_rejects_unknown_kind(engine: Engine) -> None:
    migrate(engine)

    with engine.begin() as connection:
        connection.execute(text("INSERT INTO organizations (name, created_at) VALUES ('default', '2024-01-01')"))
    with engine.connect() as connection, pytest.raises(IntegrityError, match="ck_connections_kind"):
        connection.execute(
            text(
                "INSERT INTO connections (organization_id, name, kind, host, port, calling_ae_title, "
                "called_ae_title, timezone, character_set, tls_mode, scu_authentication, image_compression, "
                "loop_compression, monochrome, acse_timeout, dimse_timeout, connection_timeout, test_only, "
                "worklist_filters, created_at, updated_at) VALUES (1, 'x', 'vna', '127.0.0.1', 104, 'A', "
                "'B', 'UTC', 'ISO_IR 100', 'inactive', 'anonymous', 'as-received', 'as-received', 'never', "
                "300, 300, 300, 0, '{}', '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )
        )


def test_migration_transaction_rolls_back_ddl(engine: Engine) -> None:
    with engine.connect() as connection, pytest.raises(RuntimeError, match="stop"):
        with migration_transaction(connection):
            connection.exec_driver_sql("CREATE TABLE half_done (id INTEGER PRIMARY KEY)")
            raise RuntimeError("stop")

    assert "half_done" not in table_names(engine)


def test_migration_transaction_checks_foreign_keys(engine: Engine) -> None:
    migrate(engine)

    with engine.connect() as connection, pytest.raises(DatabaseError, match="broken foreign keys"):
        with migration_transaction(connection):
            connection.exec_driver_sql(
                "INSERT INTO connections (organization_id, name, kind, host, port, calling_ae_title, "
                "called_ae_title, timezone, character_set, tls_mode, scu_authentication, image_compression, "
                "loop_compression, monochrome, acse_timeout, dimse_timeout, connection_timeout, test_only, "
                "worklist_filters, created_at, updated_at) VALUES (999, 'x', 'pacs', '127.0.0.1', 104, 'A', "
                "'B', 'UTC', 'ISO_IR 100', 'inactive', 'anonymous', 'as-received', 'as-received', 'never', "
                "300, 300, 300, 0, '{}', '2024-01-01 00:00:00', '2024-01-01 00:00:00')"
            )

    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM connections").scalar() == 0
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unknown_revision_rejected(engine: Engine) -> None:
    migrate(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))

    with pytest.raises(DatabaseError, match="'f00dcafe'.*not among the migrations"):
        migrate(engine)


def test_concurrent_migrations_on_one_file(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "shared.sqlite3")
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            migrate(url)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A bound on the wait, so that a deadlock fails the test instead of hanging the suite.
        thread.join(timeout=120)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert current_revision(url) == head_revision()


def test_open_database_in_memory(tmp_path: Path) -> None:
    config = load_config(tmp_path / "data", database_url="sqlite://", environ={})
    sessions = open_database(config)
    try:
        with sessions.begin() as session:
            save_connection(
                session,
                ConnectionSettings(
                    name="PACS", kind="pacs", host="::1", port=104, calling_ae_title="A", called_ae_title="B"
                ),
            )
        with sessions.begin() as session:
            assert [record.name for record in list_connections(session)] == ["PACS"]
    finally:
        close_database(sessions)


def test_open_database_creates_files(tmp_path: Path) -> None:
    config = load_config(tmp_path / "new dir" / "données", environ={})

    sessions = open_database(config)
    close_database(sessions)

    assert (config.data_dir / "pacsbridge.sqlite3").is_file()
    assert config.blob_dir.is_dir()
    assert current_revision(config.database_url) == head_revision()


def test_alembic_commands_with_url(tmp_path: Path) -> None:
    # The path without a caller's connection, used for `alembic check` and new revisions.
    url = sqlite_url(tmp_path / "via-url.sqlite3")

    command.upgrade(alembic_config(url), "head")
    command.check(alembic_config(url))

    assert current_revision(url) == head_revision()


def test_offline_sql_for_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(alembic_config("postgresql+psycopg://pacsbridge@127.0.0.1:5432/offline"), "head", sql=True)

    sql = capsys.readouterr().out
    assert "CREATE TABLE connections" in sql
    assert "WHERE kind = 'mwl'" in sql
    assert sql.rstrip().endswith("COMMIT;")
