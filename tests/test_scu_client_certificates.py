"""Organization CAs and client certificates: issuance, keys encrypted at rest, secret key errors, rotation."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

import pacsbridge.cli.connections_cmd  # noqa: F401  (registers the commands on the app)
import pacsbridge.cli.secret_cmd  # noqa: F401
from pacsbridge.cli.app import app
from pacsbridge.cli.common import tls_from_options
from pacsbridge.config import load_config
from pacsbridge.connections import ConnectionSettings, ScuAuthentication, TlsMode
from pacsbridge.db import close_database, get_connection, open_database, save_connection, update_connection
from pacsbridge.db.models import ClientCertificateStatus
from pacsbridge.tls.certificates import certificate_pem, generate_private_key, private_key_pem, self_sign
from pacsbridge.tls.client_ca import (
    ClientCertificateError,
    effective_status,
    ensure_client_certificate,
    find_authority,
    list_client_certificates,
    load_client_identity,
    reissue_all,
    rotate_client_certificate,
)
from pacsbridge.tls.context import TlsMode as CliTlsMode
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


# Recovery after a lost PACSBRIDGE_SECRET_KEY


ADD_MTLS = [
    "connections", "add", "mtls", "--kind", "pacs", "--host", "127.0.0.1", "--port", "2762",
    "--calling-aet", "POCUS", "--called-aet", "PACS", "--tls", "encryption-only",
    "--scu-auth", "client-certificate",
]  # fmt: skip


def cli_runner(secret_key: str | None) -> CliRunner:
    return CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None, SECRET_KEY_ENV: secret_key})


def test_wrong_secret_key_names_reissue_command() -> None:
    token = SECRET_KEY.encrypt(b"key material", b"row")
    other = parse_secret_key(generate_secret_key())

    with pytest.raises(SecretKeyError) as caught:
        other.decrypt(token, b"row")

    message = str(caught.value)
    assert "If that key is lost, run 'pacsbridge connections reissue-client-certs --yes'" in message
    assert message.endswith(".")


def test_cli_wrong_key_messages_end_once(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    assert cli_runner(generate_secret_key()).invoke(app, [*ADD_MTLS, "--data-dir", data_dir]).exit_code == 0
    wrong = cli_runner(generate_secret_key())

    rotated = wrong.invoke(app, ["connections", "rotate-client-cert", "mtls", "--data-dir", data_dir])
    added = wrong.invoke(app, [*ADD_MTLS[:2], "second", *ADD_MTLS[3:], "--data-dir", data_dir])

    assert rotated.exit_code == 1
    assert rotated.stderr.rstrip().endswith("each hospital.")
    assert added.exit_code == 1
    assert "reissue-client-certs --yes" in added.stderr
    assert added.stderr.rstrip().endswith("each hospital. Nothing was stored.")
    assert ".." not in added.stderr


def test_reissue_all_replaces_authority(sessions) -> None:
    name = add_connection(sessions)
    add_connection(sessions, name="Anonymous", scu_authentication=ScuAuthentication.ANONYMOUS)
    with sessions.begin() as session:
        record = get_connection(session, name)
        old_certificate, _ = ensure_client_certificate(session, record, SECRET_KEY)
        old_fingerprint = old_certificate.fingerprint
        old_ca = find_authority(session, record.organization).certificate_pem
    new_key = parse_secret_key(generate_secret_key())

    with sessions.begin() as session:
        record = get_connection(session, name)
        result = reissue_all(session, record.organization, new_key)
        issued_names = [connection.name for connection, _ in result.issued]

    with sessions.begin() as session:
        record = get_connection(session, name)
        certificates = list_client_certificates(session, record)
        authority = find_authority(session, record.organization)
        identity = prepare_client_identity(session, record, new_key)
        statuses = {certificate.fingerprint: certificate.status for certificate in certificates}

    assert issued_names == [name]
    assert statuses[old_fingerprint] == ClientCertificateStatus.RETIRED
    assert len(certificates) == 2
    assert authority.certificate_pem != old_ca
    assert result.previous_authority_fingerprint is not None
    assert identity is not None
    assert identity.fingerprint != old_fingerprint
    new_certificate = x509.load_pem_x509_certificate(identity.certificate_pem)
    ca_certificate = x509.load_pem_x509_certificate(authority.certificate_pem.encode("ascii"))
    new_certificate.verify_directly_issued_by(ca_certificate)


def test_cli_reissue_after_lost_key(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    assert cli_runner(generate_secret_key()).invoke(app, [*ADD_MTLS, "--data-dir", data_dir]).exit_code == 0
    new = cli_runner(generate_secret_key())

    planned = new.invoke(app, ["connections", "reissue-client-certs", "--data-dir", data_dir])
    reissued = new.invoke(app, ["connections", "reissue-client-certs", "--yes", "--data-dir", data_dir])
    rotated = new.invoke(app, ["connections", "rotate-client-cert", "mtls", "--data-dir", data_dir])
    shown = new.invoke(app, ["connections", "show", "mtls", "--data-dir", data_dir])

    assert planned.exit_code == 2
    assert "would be replaced by a new one" in planned.stdout
    assert "'mtls'" in planned.stdout
    assert "nothing was changed" in planned.stderr
    assert reissued.exit_code == 0, reissued.output
    assert "Created a new organization CA" in reissued.stdout
    assert "Retired 1 client certificate(s)." in reissued.stdout
    assert "Give the new CA certificate to the PACS admin of each hospital" in reissued.stdout
    assert "pacsbridge connections client-cert mtls --ca" in reissued.stdout
    assert rotated.exit_code == 0, rotated.output
    assert shown.stdout.count("[retired]") == 1


def test_cli_reissue_empty_database(tmp_path: Path) -> None:
    result = cli_runner(generate_secret_key()).invoke(
        app, ["connections", "reissue-client-certs", "--yes", "--data-dir", str(tmp_path / "data")]
    )

    assert result.exit_code == 0, result.output
    assert "Nothing to reissue" in result.stdout


def test_cli_reissue_needs_secret_key(tmp_path: Path) -> None:
    result = cli_runner(None).invoke(
        app, ["connections", "reissue-client-certs", "--yes", "--data-dir", str(tmp_path / "data")]
    )

    assert result.exit_code == 1
    assert f"{SECRET_KEY_ENV} is not set" in result.stderr


def test_secret_key_help_names_recovery() -> None:
    result = CliRunner().invoke(app, ["secret-key", "--help"], terminal_width=200)

    assert result.exit_code == 0
    assert "pacsbridge connections reissue-client-certs --yes" in " ".join(result.stdout.split())


# Rotation and download messages


def test_cli_rotate_message_is_accurate(tmp_path: Path) -> None:
    runner = cli_runner(generate_secret_key())
    data_dir = str(tmp_path / "data")
    runner.invoke(app, [*ADD_MTLS, "--data-dir", data_dir])

    rotated = runner.invoke(app, ["connections", "rotate-client-cert", "mtls", "--data-dir", data_dir])

    assert rotated.exit_code == 0, rotated.output
    text = " ".join(rotated.stdout.split())
    assert "pacsbridge sends with it from now on" in text
    assert "SCPs that trust the organization's CA certificate accept it at once" in text
    assert "An SCP that trusts only the previous client certificate rejects pacsbridge" in text
    assert "is no longer sent" in text
    assert '"pacsbridge connections client-cert mtls --ca"' in text
    assert "'mtls''" not in text


def test_cli_client_cert_recommends_ca(tmp_path: Path) -> None:
    runner = cli_runner(generate_secret_key())
    data_dir = str(tmp_path / "data")
    runner.invoke(app, [*ADD_MTLS, "--data-dir", data_dir])

    leaf_only = runner.invoke(app, ["connections", "client-cert", "mtls", "--data-dir", data_dir])
    with_ca = runner.invoke(app, ["connections", "client-cert", "mtls", "--ca", "--data-dir", data_dir])

    assert leaf_only.exit_code == 0, leaf_only.output
    assert "have the PACS admin trust the organization's CA certificate (recommended)" in leaf_only.stderr
    assert with_ca.exit_code == 0, with_ca.output
    assert with_ca.stdout.count("BEGIN CERTIFICATE") == 2
    assert "recommended" not in with_ca.stderr


def test_cli_commands_quoted_without_nesting(tmp_path: Path) -> None:
    runner = cli_runner(None)
    data_dir = str(tmp_path / "data")

    added = runner.invoke(app, [*ADD_MTLS[:2], "PACS Zürich", *ADD_MTLS[3:], "--data-dir", data_dir])

    assert added.exit_code == 0, added.output
    assert "\"pacsbridge connections client-cert 'PACS Zürich'\"" in added.stderr


# --client-cert and --client-key of the ad-hoc commands


@pytest.fixture
def client_files(tmp_path: Path) -> dict[str, Path]:
    key = generate_private_key(ec=True)
    other_key = generate_private_key(ec=True)
    certificate = self_sign(key, "pocus.test", days=30)
    files = {
        "cert": tmp_path / "client.pem",
        "key": tmp_path / "client.key",
        "other_key": tmp_path / "other.key",
        "der": tmp_path / "client.der",
        "combined": tmp_path / "combined.pem",
    }
    files["cert"].write_bytes(certificate_pem(certificate))
    files["key"].write_bytes(private_key_pem(key))
    files["other_key"].write_bytes(private_key_pem(other_key))
    files["der"].write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    files["combined"].write_bytes(certificate_pem(certificate) + private_key_pem(key))
    return files


def test_client_pair_accepted(client_files: dict[str, Path]) -> None:
    settings = tls_from_options(
        CliTlsMode.ENCRYPTION_ONLY, None, client_files["cert"], client_files["key"], None
    )

    assert settings is not None
    assert settings.client_certificate == client_files["cert"]


def test_client_combined_file_accepted(client_files: dict[str, Path]) -> None:
    settings = tls_from_options(
        CliTlsMode.ENCRYPTION_ONLY, None, client_files["combined"], client_files["combined"], None
    )

    assert settings is not None


@pytest.mark.parametrize(
    ("cert", "key", "expected"),
    [
        ("cert", "other_key", "error: --client-key {other_key}: the key does not belong to the certificate"),
        ("cert", "cert", "error: --client-key {cert}: not a PEM private key."),
        ("der", "key", "error: --client-cert {der}: is not a PEM certificate"),
        ("key", "key", "error: --client-cert {key}: contains a private key but no certificate."),
    ],
)
def test_client_pair_problems_named(
    client_files: dict[str, Path], capsys: pytest.CaptureFixture[str], cert: str, key: str, expected: str
) -> None:
    with pytest.raises(typer.Exit) as raised:
        tls_from_options(CliTlsMode.ENCRYPTION_ONLY, None, client_files[cert], client_files[key], None)

    assert raised.value.exit_code == 2
    stderr = capsys.readouterr().err
    assert expected.format(**{name: str(path) for name, path in client_files.items()}) in stderr
    assert "_ssl.c" not in stderr
    assert "PRIVATE KEY-----\n" not in stderr


def test_echo_mismatched_pair_exits_before_connecting(client_files: dict[str, Path]) -> None:
    import pacsbridge.cli.echo_cmd  # noqa: F401  (registers the command on the app)

    result = CliRunner().invoke(
        app,
        ["echo", "127.0.0.1", "9", "--calling-aet", "POCUS", "--called-aet", "PACS", "--tls", "encryption-only",
         "--client-cert", str(client_files["cert"]), "--client-key", str(client_files["other_key"])],
    )  # fmt: skip

    assert result.exit_code == 2
    assert "the key does not belong to the certificate" in result.stderr
    assert "KEY_VALUES_MISMATCH" not in result.output
