"""Migrations and the connection repository on the PostgreSQL server at 127.0.0.1:5432.

Each test module run creates a throwaway database pb_test_<random> and drops
it at the end. The tests skip when no server accepts the users postgres or
root without a password there.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import load_config
from pacsbridge.connections import (
    ConnectionKind,
    ConnectionSettings,
    InvalidSettingsError,
    ValidationReport,
    validate_settings,
)
from pacsbridge.db import (
    Base,
    ConnectionRecord,
    close_database,
    create_database_engine,
    current_revision,
    downgrade,
    get_connection,
    head_revision,
    list_connections,
    migrate,
    open_database,
    save_connection,
    to_settings,
    update_connection,
)
from pacsbridge.db import connections as repository

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_USERS = ("postgres", "root")
UNICODE_NAME = "Radiologie Zürich – 東京"


def _admin_engine() -> tuple[Engine, URL]:
    """Return an AUTOCOMMIT engine on the `test` database, or skip when the server is not reachable."""
    failures = []
    for user in POSTGRES_USERS:
        url = URL.create(
            "postgresql+psycopg", username=user, host=POSTGRES_HOST, port=POSTGRES_PORT, database="test"
        )
        engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        try:
            with engine.connect():
                return engine, url
        except OperationalError as exc:
            failures.append(f"{user}: {' '.join(str(exc.orig).split())}")
            engine.dispose()
    pytest.skip(f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} is not reachable ({'; '.join(failures)})")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[URL]:
    admin, admin_url = _admin_engine()
    database = f"pb_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    try:
        yield admin_url.set(database=database)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def engine(postgres_url: URL) -> Iterator[Engine]:
    engine = create_database_engine(postgres_url)
    yield engine
    downgrade(engine, "base")
    engine.dispose()


@pytest.fixture
def sessions(tmp_path: Path, postgres_url: URL) -> Iterator[sessionmaker[Session]]:
    config = load_config(tmp_path / "data", database_url=postgres_url.render_as_string(hide_password=False))
    factory = open_database(config)
    yield factory
    downgrade(factory.kw["bind"], "base")
    close_database(factory)


def make_settings(**changes: object) -> ConnectionSettings:
    settings = ConnectionSettings(
        name="PACS Radiology",
        kind=ConnectionKind.PACS,
        host="127.0.0.1",
        port=104,
        calling_ae_title="PoCus01",
        called_ae_title="PACS",
    )
    return settings.replace(**changes)


def test_postgres_migrate_fresh_database(engine: Engine) -> None:
    assert current_revision(engine) is None

    migrate(engine)

    assert current_revision(engine) == head_revision()
    assert {"organizations", "connections"} <= set(inspect(engine).get_table_names())


def test_postgres_models_match_migrations(engine: Engine) -> None:
    migrate(engine)

    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_postgres_downgrade_base_then_upgrade_head(engine: Engine) -> None:
    migrate(engine)

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert {"organizations", "connections"} & set(inspect(engine).get_table_names()) == set()

    migrate(engine, "head")
    assert current_revision(engine) == head_revision()


def test_postgres_unicode_round_trip(sessions: sessionmaker[Session]) -> None:
    settings = make_settings(
        name=UNICODE_NAME,
        host="::1",
        character_set="\\ISO 2022 IR 87",
        timezone="Asia/Tokyo",
        worklist_filters={"station": "Zürich 東京"},
        dimse_timeout=12.5,
    )
    with sessions.begin() as session:
        save_connection(session, settings)

    with sessions.begin() as session:
        stored = to_settings(get_connection(session, UNICODE_NAME))
        created_at = get_connection(session, UNICODE_NAME).created_at

    assert stored == settings
    assert stored.calling_ae_title == "PoCus01"
    assert created_at.utcoffset() is not None


def test_postgres_one_worklist_per_organization(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="MWL", kind="mwl"))

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(name="MWL 2", kind="mwl"))

    assert "'MWL'" in caught.value.problems[0].reason
    with sessions.begin() as session:
        assert [record.name for record in list_connections(session)] == ["MWL"]


def test_postgres_index_rejects_second_worklist(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the repository check, the partial unique index still rejects the row, and the
    # savepoint keeps the PostgreSQL transaction usable afterwards.
    def check_without_conflicts(session: Session, settings: ConnectionSettings, **_: object) -> ValidationReport:
        return validate_settings(settings)

    with sessions.begin() as session:
        save_connection(session, make_settings(name="MWL", kind="mwl"))

    monkeypatch.setattr(repository, "check_connection", check_without_conflicts)
    with sessions.begin() as session:
        with pytest.raises(InvalidSettingsError) as caught:
            save_connection(session, make_settings(name="MWL 2", kind="mwl"))
        save_connection(session, make_settings(name="PACS"))

    assert caught.value.problems[0].field == "kind"
    with sessions.begin() as session:
        assert [record.name for record in list_connections(session)] == ["MWL", "PACS"]


def test_postgres_update_with_errors_changes_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session, pytest.raises(InvalidSettingsError):
        update_connection(session, "PACS Radiology", port=0, host="10.0.0.9")
    with sessions.begin() as session:
        update_connection(session, "PACS Radiology", acse_timeout=15)

    with sessions.begin() as session:
        stored = get_connection(session, "PACS Radiology")
        assert stored.port == 104
        assert stored.host == "127.0.0.1"
        assert stored.acse_timeout == 15.0


def test_postgres_check_constraint_rejects_bad_port(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record, _ = save_connection(session, make_settings())
        record_id = record.id

    with sessions() as session, pytest.raises(IntegrityError, match="ck_connections_port"):
        stored = session.get(ConnectionRecord, record_id)
        assert stored is not None
        stored.port = 0
        session.commit()


def test_postgres_cli_round_trip(tmp_path: Path, engine: Engine) -> None:
    environment = {
        **os.environ,
        "PACSBRIDGE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
    }
    command = [sys.executable, "-m", "pacsbridge.cli.main", "connections"]
    data_dir = ["--data-dir", str(tmp_path / "data")]

    added = subprocess.run(
        [*command, "add", UNICODE_NAME, "--kind", "mwl", "--host", "::1", "--port", "11112",
         "--calling-aet", "POCUS", "--called-aet", "WORKLIST", *data_dir],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    listed = subprocess.run(
        [*command, "list", *data_dir], env=environment, capture_output=True, text=True, timeout=120, check=False
    )

    assert added.returncode == 0, added.stderr
    assert listed.returncode == 0, listed.stderr
    assert UNICODE_NAME in listed.stdout
    assert not (tmp_path / "data" / "pacsbridge.sqlite3").exists()



def test_postgres_nul_character_rejected_before_insert(sessions: sessionmaker[Session]) -> None:
    # PostgreSQL would reject the NUL with a DataError that aborts the transaction.
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs.hospital.test")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    with sessions.begin() as session:
        with pytest.raises(InvalidSettingsError) as caught:
            save_connection(session, make_settings(tls_mode="active", scp_certificate_pem=pem + "\x00"))
        save_connection(session, make_settings(tls_mode="active", scp_certificate_pem=pem))

    assert caught.value.problems[0].field == "scp_certificate"
    assert caught.value.problems[0].reason == "contains a NUL character"
