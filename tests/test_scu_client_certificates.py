"""Organization CAs and client certificates: issuance, keys encrypted at rest, secret key errors, rotation."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

import pacsbridge.cli.connections_cmd  # noqa: F401  (registers the commands on the app)
import pacsbridge.cli.secret_cmd  # noqa: F401
from pacsbridge.cli.app import app
from pacsbridge.config import load_config
from pacsbridge.connections import ConnectionSettings, ScuAuthentication, TlsMode
from pacsbridge.db import close_database, get_connection, open_database, save_connection, update_connection
from pacsbridge.db.models import ClientCertificateStatus
from pacsbridge.tls.client_ca import (
    ClientCertificateError,
    effective_status,
    ensure_client_certificate,
    find_authority,
    list_client_certificates,
    load_client_identity,
    rotate_client_certificate,
)
from pacsbridge.tls.endpoints import ClientKeyFiles, client_key_files, endpoint_for, prepare_client_identity
from pacsbridge.tls.secret_key import (
    SECRET_KEY_ENV,
    SecretKeyError,
    generate_secret_key,
    load_secret_key,
    parse_secret_key,
)

SECRET_KEY = parse_secret_key(generate_secret_key())


@pytest.fixture
def sessions(tmp_path: Path):
    factory = open_database(load_config(tmp_path / "data", environ={}))
    yield factory
    close_database(factory)


def make_settings(**changes: object) -> ConnectionSettings:
    settings = ConnectionSettings(
        name="PACS Radiologie Zürich",
        kind="pacs",
        host="127.0.0.1",
        port=2762,
        calling_ae_title="POCUS",
        called_ae_title="PACS",
        tls_mode=TlsMode.ENCRYPTION_ONLY,
        scu_authentication=ScuAuthentication.CLIENT_CERTIFICATE,
    )
    return settings.replace(**changes)


def add_connection(sessions: sessionmaker[Session], **changes: object) -> str:
    settings = make_settings(**changes)
    with sessions.begin() as session:
        save_connection(session, settings)
    return settings.name


def test_secret_key_round_trip() -> None:
    token = SECRET_KEY.encrypt(b"key material", b"row 1")

    assert token.startswith(f"v1:{SECRET_KEY.id}:")
    assert b"key material" not in token.encode()
    assert SECRET_KEY.decrypt(token, b"row 1") == b"key material"


def test_secret_key_bound_to_row() -> None:
    token = SECRET_KEY.encrypt(b"key material", b"row 1")

    with pytest.raises(SecretKeyError, match="cannot be decrypted"):
        SECRET_KEY.decrypt(token, b"row 2")


def test_missing_secret_key_names_variable() -> None:
    with pytest.raises(SecretKeyError) as caught:
        load_secret_key({})

    assert SECRET_KEY_ENV in str(caught.value)
    assert "pacsbridge secret-key" in str(caught.value)


@pytest.mark.parametrize("value", ["not base64!", "c2hvcnQ=", "  "])
def test_invalid_secret_key_rejected(value: str) -> None:
    with pytest.raises(SecretKeyError) as caught:
        load_secret_key({SECRET_KEY_ENV: value})

    assert SECRET_KEY_ENV in str(caught.value)
    assert value.strip() == "" or value not in str(caught.value)


def test_wrong_secret_key_reported() -> None:
    token = SECRET_KEY.encrypt(b"key material", b"row")
    other = parse_secret_key(generate_secret_key())

    with pytest.raises(SecretKeyError) as caught:
        other.decrypt(token, b"row")

    assert SECRET_KEY_ENV in str(caught.value)
    assert SECRET_KEY.id in str(caught.value)


def test_secret_key_command_prints_key() -> None:
    result = CliRunner().invoke(app, ["secret-key"])

    assert result.exit_code == 0, result.output
    assert len(parse_secret_key(result.stdout.strip()).key) == 32


def test_issue_client_certificate(sessions) -> None:
    name = add_connection(sessions)
    with sessions.begin() as session:
        record = get_connection(session, name)
        issued, created = ensure_client_certificate(session, record, SECRET_KEY)
        again, created_again = ensure_client_certificate(session, record, SECRET_KEY)
        authority = find_authority(session, record.organization)
        assert authority is not None
        ca_certificate = x509.load_pem_x509_certificate(authority.certificate_pem.encode())
        identity = load_client_identity(issued, SECRET_KEY)

    certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    assert created
    assert not created_again
    assert again.id == issued.id
    certificate.verify_directly_issued_by(ca_certificate)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "default"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    validity = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert dt.timedelta(days=729) < validity < dt.timedelta(days=731)
    ca_validity = ca_certificate.not_valid_after_utc - ca_certificate.not_valid_before_utc
    assert dt.timedelta(days=3649) < ca_validity < dt.timedelta(days=3651)
    assert issued.serial == format(certificate.serial_number, "x")
    assert issued.status == ClientCertificateStatus.ACTIVE
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert identity.private_key.public_key().public_bytes(*spki) == certificate.public_key().public_bytes(*spki)


def test_private_keys_encrypted_at_rest(sessions) -> None:
    name = add_connection(sessions)
    with sessions.begin() as session:
        record = get_connection(session, name)
        issued, _ = ensure_client_certificate(session, record, SECRET_KEY)
        identity = load_client_identity(issued, SECRET_KEY)
    key_der = identity.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    with sessions() as session:
        columns = session.execute(
            text(
                "SELECT encrypted_private_key FROM client_certificates "
                "UNION ALL SELECT encrypted_private_key FROM certificate_authorities"
            )
        ).scalars().all()

    assert len(columns) == 2
    for value in columns:
        assert "PRIVATE KEY" not in value
        assert key_der.hex() not in value
        assert value.startswith("v1:")
        assert key_der not in value.encode()


def test_prepare_identity_without_secret_key(sessions, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    name = add_connection(sessions)

    with sessions.begin() as session, pytest.raises(SecretKeyError, match=SECRET_KEY_ENV):
        prepare_client_identity(session, get_connection(session, name))


def test_prepare_identity_with_wrong_secret_key(sessions) -> None:
    name = add_connection(sessions)
    with sessions.begin() as session:
        ensure_client_certificate(session, get_connection(session, name), SECRET_KEY)

    wrong = parse_secret_key(generate_secret_key())
    with sessions.begin() as session, pytest.raises(SecretKeyError, match="another key"):
        prepare_client_identity(session, get_connection(session, name), wrong)


def test_prepare_identity_anonymous_is_none(sessions) -> None:
    name = add_connection(sessions, scu_authentication=ScuAuthentication.ANONYMOUS)

    with sessions.begin() as session:
        assert prepare_client_identity(session, get_connection(session, name), SECRET_KEY) is None


def test_rotation_keeps_old_certificate_retiring(sessions) -> None:
    name = add_connection(sessions)
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        record = get_connection(session, name)
        first, _ = ensure_client_certificate(session, record, SECRET_KEY)
        new, previous = rotate_client_certificate(session, record, SECRET_KEY, grace_days=14, now=now)
        first_id, new_id = first.id, new.id

    with sessions.begin() as session:
        certificates = list_client_certificates(session, get_connection(session, name))
        by_id = {certificate.id: certificate for certificate in certificates}
        old = by_id[first_id]
        assert previous is not None and previous.id == first_id
        assert by_id[new_id].status == ClientCertificateStatus.ACTIVE
        assert old.status == ClientCertificateStatus.RETIRING
        assert old.retire_after == now + dt.timedelta(days=14)
        assert effective_status(old, now + dt.timedelta(days=13)) == ClientCertificateStatus.RETIRING
        assert effective_status(old, now + dt.timedelta(days=15)) == ClientCertificateStatus.RETIRED
        assert by_id[new_id].fingerprint != old.fingerprint


def test_rotation_after_grace_retires(sessions) -> None:
    name = add_connection(sessions)
    start = dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        record = get_connection(session, name)
        ensure_client_certificate(session, record, SECRET_KEY)
        rotate_client_certificate(session, record, SECRET_KEY, grace_days=1, now=start)
        rotate_client_certificate(session, record, SECRET_KEY, grace_days=3, now=start + dt.timedelta(days=2))

    with sessions.begin() as session:
        statuses = [certificate.status for certificate in list_client_certificates(session, get_connection(session, name))]
    assert sorted(statuses) == sorted(
        [ClientCertificateStatus.ACTIVE, ClientCertificateStatus.RETIRING, ClientCertificateStatus.RETIRED]
    )


@pytest.mark.parametrize("grace_days", [-1, 366])
def test_rotation_rejects_grace_days(sessions, grace_days: int) -> None:
    name = add_connection(sessions)

    with sessions.begin() as session, pytest.raises(ClientCertificateError, match="out of range"):
        rotate_client_certificate(session, get_connection(session, name), SECRET_KEY, grace_days=grace_days)


@pytest.mark.parametrize("in_memory", [True, False])
def test_client_key_files_removed_after_use(sessions, in_memory: bool) -> None:
    name = add_connection(sessions)
    with sessions.begin() as session:
        identity = prepare_client_identity(session, get_connection(session, name), SECRET_KEY)
    assert identity is not None

    with client_key_files(identity, in_memory=in_memory) as files:
        assert b"PRIVATE KEY" in files.key.read_bytes()
        assert files.certificate.read_bytes() == identity.certificate_pem
        if not in_memory:
            assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(files.key.parent).st_mode) == 0o700

    assert not files.key.exists()
    assert not files.certificate.exists()


def test_endpoint_for_requires_client_identity() -> None:
    with pytest.raises(ClientCertificateError, match="none was given"):
        endpoint_for(make_settings())


def test_endpoint_for_maps_tls_settings() -> None:
    files = ClientKeyFiles(Path("/nonexistent/cert.pem"), Path("/nonexistent/key.pem"))
    settings = make_settings(server_name="pacs.hospital.test", legacy_ciphers=True, pinned_fingerprint="ab" * 32)

    endpoint = endpoint_for(settings, client_identity=files, bind_address="127.0.0.1", require_pin=True)

    assert endpoint.tls is not None
    assert endpoint.tls.mode.value == "encryption-only"
    assert endpoint.tls.client_certificate == files.certificate
    assert endpoint.tls.client_key == files.key
    assert endpoint.tls.server_name == "pacs.hospital.test"
    assert endpoint.tls.legacy_ciphers is True
    assert endpoint.tls.pinned_fingerprint == "ab" * 32
    assert endpoint.bind_address == "127.0.0.1"
    assert endpoint.require_pin is True


def test_endpoint_for_inactive_tls_is_plain() -> None:
    settings = make_settings(tls_mode=TlsMode.INACTIVE, scu_authentication=ScuAuthentication.ANONYMOUS)

    assert endpoint_for(settings).tls is None


def test_cli_add_without_secret_key_warns(tmp_path: Path) -> None:
    runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None, SECRET_KEY_ENV: None})
    data_dir = str(tmp_path / "data")
    added = runner.invoke(
        app,
        ["connections", "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "2762",
         "--calling-aet", "POCUS", "--called-aet", "PACS", "--tls", "encryption-only",
         "--scu-auth", "client-certificate", "--data-dir", data_dir],
    )  # fmt: skip
    download = runner.invoke(app, ["connections", "client-cert", "PACS", "--data-dir", data_dir])

    assert added.exit_code == 0, added.output
    assert "no client certificate was issued yet" in added.output
    assert SECRET_KEY_ENV in added.output
    assert download.exit_code == 1
    assert f"{SECRET_KEY_ENV} is not set" in download.output


def test_cli_wrong_secret_key_reported(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    base = {"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None}
    right = CliRunner(env={**base, SECRET_KEY_ENV: generate_secret_key()})
    wrong = CliRunner(env={**base, SECRET_KEY_ENV: generate_secret_key()})
    added = right.invoke(
        app,
        ["connections", "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "2762",
         "--calling-aet", "POCUS", "--called-aet", "PACS", "--tls", "encryption-only",
         "--scu-auth", "client-certificate", "--data-dir", data_dir],
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "Issued client certificate" in added.stdout

    rotated = wrong.invoke(app, ["connections", "rotate-client-cert", "PACS", "--data-dir", data_dir])
    echoed = wrong.invoke(app, ["connections", "echo", "PACS", "--data-dir", data_dir])

    for result in (rotated, echoed):
        assert result.exit_code == 1
        assert SECRET_KEY_ENV in result.output
        assert "another key" in result.output
        assert "PRIVATE KEY" not in result.output


def test_cli_show_lists_client_certificates(tmp_path: Path) -> None:
    runner = CliRunner(
        env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None, SECRET_KEY_ENV: generate_secret_key()}
    )
    data_dir = str(tmp_path / "data")
    runner.invoke(
        app,
        ["connections", "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "2762",
         "--calling-aet", "POCUS", "--called-aet", "PACS", "--tls", "encryption-only",
         "--scu-auth", "client-certificate", "--data-dir", data_dir],
    )  # fmt: skip
    rotated = runner.invoke(app, ["connections", "rotate-client-cert", "PACS", "--grace-days", "0", "--data-dir", data_dir])
    show_result = runner.invoke(app, ["connections", "show", "PACS", "--data-dir", data_dir])

    assert rotated.exit_code == 0, rotated.output
    assert "is retired" in rotated.stdout
    assert show_result.exit_code == 0, show_result.output
    assert "[active]" in show_result.stdout
    assert "[retired]" in show_result.stdout
    assert "CN=PACS" in show_result.stdout
    assert "PRIVATE KEY" not in show_result.stdout


def test_cli_rotate_requires_scu_authentication(tmp_path: Path) -> None:
    runner = CliRunner(
        env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None, SECRET_KEY_ENV: generate_secret_key()}
    )
    data_dir = str(tmp_path / "data")
    runner.invoke(
        app,
        ["connections", "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "104",
         "--calling-aet", "POCUS", "--called-aet", "PACS", "--data-dir", data_dir],
    )  # fmt: skip

    rotated = runner.invoke(app, ["connections", "rotate-client-cert", "PACS", "--data-dir", data_dir])
    downloaded = runner.invoke(app, ["connections", "client-cert", "PACS", "--data-dir", data_dir])

    assert rotated.exit_code == 2
    assert "--scu-auth client-certificate" in rotated.output
    assert downloaded.exit_code == 1
    assert "has no client certificate" in downloaded.output


def test_turning_scu_authentication_on_issues_certificate(sessions) -> None:
    name = add_connection(sessions, scu_authentication=ScuAuthentication.ANONYMOUS)
    with sessions.begin() as session:
        update_connection(session, name, scu_authentication=ScuAuthentication.CLIENT_CERTIFICATE)
        identity = prepare_client_identity(session, get_connection(session, name), SECRET_KEY)

    assert identity is not None
    assert "ClientIdentity(fingerprint=" in repr(identity)
    assert "PRIVATE" not in repr(identity)
