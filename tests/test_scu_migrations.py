"""Migration 0002 (TLS options, CAs, client certificates) up and down on SQLite and PostgreSQL.

The PostgreSQL tests use a throwaway database on 127.0.0.1:5432, made as in
test_db_postgres.py, and skip when no server accepts the users postgres or
root without a password there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError

from pacsbridge.db import Base, create_database_engine, current_revision, downgrade, head_revision, migrate

NEW_TABLES = {"certificate_authorities", "client_certificates"}
NEW_COLUMNS = {"server_name", "check_hostname", "legacy_ciphers"}
INSERT_CONNECTION = (
    "INSERT INTO connections (organization_id, name, kind, host, port, calling_ae_title, "
    "called_ae_title, timezone, character_set, tls_mode, scu_authentication, image_compression, "
    "loop_compression, monochrome, acse_timeout, dimse_timeout, connection_timeout, test_only, "
    "worklist_filters, created_at, updated_at) VALUES (1, 'old', 'pacs', '127.0.0.1', 104, 'A', "
    "'B', 'UTC', 'ISO_IR 100', 'inactive', 'anonymous', 'as-received', 'as-received', 'never', "
    "300, 300, 300, false, '{}', '2024-01-01 00:00:00+00', '2024-01-01 00:00:00+00')"
)
INSERT_CLIENT_CERTIFICATE = (
    "INSERT INTO client_certificates (connection_id, certificate_pem, encrypted_private_key, serial, "
    "not_before, not_after, fingerprint, status, created_at) VALUES (1, 'pem', 'v1:x:y', '01', "
    "'2024-01-01 00:00:00+00', '2026-01-01 00:00:00+00', :fingerprint, :status, '2024-01-01 00:00:00+00')"
)


def connection_columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("connections")}


def check_upgrade_and_downgrade(engine: Engine) -> None:
    migrate(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO organizations (name, created_at) VALUES ('default', '2024-01-01 00:00:00+00')"))
        connection.execute(text(INSERT_CONNECTION))

    migrate(engine, "0002")

    assert current_revision(engine) == "0002"
    assert NEW_TABLES <= set(inspect(engine).get_table_names())
    assert NEW_COLUMNS <= connection_columns(engine)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT check_hostname, legacy_ciphers, server_name FROM connections")).one()
        assert tuple(row) == (False, False, None)

    with engine.begin() as connection:
        connection.execute(text(INSERT_CLIENT_CERTIFICATE), {"fingerprint": "a" * 64, "status": "active"})
        connection.execute(text(INSERT_CLIENT_CERTIFICATE), {"fingerprint": "b" * 64, "status": "retiring"})
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(INSERT_CLIENT_CERTIFICATE), {"fingerprint": "c" * 64, "status": "active"})
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(INSERT_CLIENT_CERTIFICATE), {"fingerprint": "d" * 64, "status": "revoked"})

    downgrade(engine, "0001")

    assert current_revision(engine) == "0001"
    assert set(inspect(engine).get_table_names()) & NEW_TABLES == set()
    assert connection_columns(engine) & NEW_COLUMNS == set()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM connections")).scalar_one() == "old"

    migrate(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        assert list(compare_metadata(MigrationContext.configure(connection), Base.metadata)) == []


def test_sqlite_migration_0002_up_and_down(tmp_path: Path) -> None:
    engine = create_database_engine(URL.create("sqlite", database=str(tmp_path / "test.sqlite3")))
    try:
        check_upgrade_and_downgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture
def postgres_engine() -> Iterator[Engine]:
    admin = None
    failures = []
    for user in ("postgres", "root"):
        url = URL.create("postgresql+psycopg", username=user, host="127.0.0.1", port=5432, database="test")
        candidate = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        try:
            with candidate.connect():
                admin, admin_url = candidate, url
                break
        except OperationalError as exc:
            failures.append(f"{user}: {' '.join(str(exc.orig).split())}")
            candidate.dispose()
    if admin is None:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({'; '.join(failures)})")
    database = f"pb_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    engine = create_database_engine(admin_url.set(database=database))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


def test_postgres_migration_0002_up_and_down(postgres_engine: Engine) -> None:
    check_upgrade_and_downgrade(postgres_engine)
