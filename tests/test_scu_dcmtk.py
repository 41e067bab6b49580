"""Stored TLS connections against DCMTK storescp: SCU authentication and encryption-only pinning via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner, Result

import pacsbridge.cli.connections_cmd  # noqa: F401  (registers the commands on the app)
import pacsbridge.cli.secret_cmd  # noqa: F401
from conftest import SAMPLES
from pacsbridge.cli.app import app
from pacsbridge.config import load_config
from pacsbridge.db import close_database, get_connection, open_database, to_settings
from pacsbridge.dicomnet.store import store_instances
from pacsbridge.ingest.files import collect_instances
from pacsbridge.tls.endpoints import prepare_client_identity, stored_endpoint
from pacsbridge.tls.secret_key import generate_secret_key, parse_secret_key
from tls_material import make_identity

SECRET_KEY = generate_secret_key()
ENVIRONMENT = {
    "PACSBRIDGE_DATABASE_URL": None,
    "PACSBRIDGE_DATA_DIR": None,
    "PACSBRIDGE_BIND_ADDRESS": None,
    "PACSBRIDGE_SECRET_KEY": SECRET_KEY,
}
runner = CliRunner(env=ENVIRONMENT)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(tmp_path: Path):
    folder = tmp_path / "pki"
    folder.mkdir()
    return make_identity(folder, "server", common_name="pacs.hospital.test")


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, ["connections", *args, "--data-dir", str(data_dir)])


def add_tls_connection(data_dir: Path, name: str, port: int, *options: str) -> None:
    result = run(
        data_dir, "add", name, "--kind", "pacs", "--host", "127.0.0.1", "--port", str(port),
        "--calling-aet", "PACSBRIDGE", "--called-aet", "STORESCP", "--connection-timeout", "10",
        "--acse-timeout", "10", "--dimse-timeout", "10", *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def download_ca(data_dir: Path, name: str, folder: Path) -> tuple[x509.Certificate, Path]:
    """Download the bundle with `client-cert --ca`; return the CA certificate and a file with it alone."""
    bundle = folder / "bundle.pem"
    result = run(data_dir, "client-cert", name, "--ca", "--out", str(bundle))
    assert result.exit_code == 0, result.output
    certificates = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert len(certificates) == 2
    ca_file = folder / "our-ca.pem"
    ca_file.write_bytes(certificates[1].public_bytes(serialization.Encoding.PEM))
    return certificates[1], ca_file


def test_scu_authentication_end_to_end(data_dir, tmp_path, server, start_storescp):
    # The CA exists once the first client certificate is issued; storescp then trusts it.
    add_tls_connection(data_dir, "Hospital", 1, "--tls", "active", "--scp-cert", str(server.cert),
                       "--scu-auth", "client-certificate")  # fmt: skip
    ca_certificate, ca_file = download_ca(data_dir, "Hospital", tmp_path)
    scp = start_storescp("+tls", str(server.key), str(server.cert), "-rc", "+cf", str(ca_file))
    assert run(data_dir, "edit", "Hospital", "--port", str(scp.port)).exit_code == 0

    echo_result = run(data_dir, "echo", "Hospital", "--json")

    assert echo_result.exit_code == 0, echo_result.output
    report = json.loads(echo_result.stdout)
    assert report["ok"] is True
    assert report["secured"] is True

    client_pem = run(data_dir, "client-cert", "Hospital")
    assert client_pem.exit_code == 0, client_pem.output
    assert "PRIVATE KEY" not in client_pem.output
    client_certificate = x509.load_pem_x509_certificate(client_pem.stdout.encode("ascii"))
    client_certificate.verify_directly_issued_by(ca_certificate)
    usage = client_certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage

    sessions = open_database(load_config(data_dir, environ={}))
    try:
        with sessions.begin() as session:
            record = get_connection(session, "Hospital")
            settings = to_settings(record)
            identity = prepare_client_identity(session, record, parse_secret_key(SECRET_KEY))
    finally:
        close_database(sessions)
    instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
    with stored_endpoint(settings, identity) as endpoint:
        result = store_instances(endpoint, instances)
    assert result.all_stored
    assert len(scp.received()) == 1

    assert run(data_dir, "edit", "Hospital", "--scu-auth", "anonymous").exit_code == 0
    anonymous = run(data_dir, "echo", "Hospital")
    assert anonymous.exit_code == 1
    assert "requires a client certificate" in anonymous.stdout


def test_rotated_certificate_is_sent(data_dir, tmp_path, server, start_storescp):
    add_tls_connection(data_dir, "Hospital", 1, "--tls", "encryption-only", "--scu-auth", "client-certificate")
    _, ca_file = download_ca(data_dir, "Hospital", tmp_path)
    scp = start_storescp("+tls", str(server.key), str(server.cert), "-rc", "+cf", str(ca_file))
    edited = run(data_dir, "edit", "Hospital", "--port", str(scp.port), "--pinned-fingerprint", server.fingerprint)
    assert edited.exit_code == 0, edited.output

    rotated = run(data_dir, "rotate-client-cert", "Hospital", "--grace-days", "7")
    assert rotated.exit_code == 0, rotated.output
    assert "retiring until" in rotated.stdout

    assert run(data_dir, "echo", "Hospital").exit_code == 0
    show_result = json.loads(run(data_dir, "show", "Hospital", "--json").stdout)
    assert [entry["status"] for entry in show_result["client_certificates"]] == ["active", "retiring"]


def test_encryption_only_pinning_flow(data_dir, server, start_storescp):
    scp = start_storescp("+tls", str(server.key), str(server.cert), "-ic")
    add_tls_connection(data_dir, "Clinic", scp.port, "--tls", "encryption-only")

    first = run(data_dir, "echo", "Clinic")
    assert first.exit_code == 0, first.output
    assert "confirm-fingerprint" in first.stdout
    assert server.fingerprint in first.stdout

    colon_form = ":".join(server.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    confirmed = run(data_dir, "confirm-fingerprint", "Clinic", colon_form)
    assert confirmed.exit_code == 0, confirmed.output
    assert json.loads(run(data_dir, "show", "Clinic", "--json").stdout)["pinned_fingerprint"] == server.fingerprint

    pinned = run(data_dir, "echo", "Clinic", "--json")
    assert pinned.exit_code == 0, pinned.output
    handshake = next(step for step in json.loads(pinned.stdout)["steps"] if step["name"] == "tls-handshake")
    assert handshake["outcome"] == "passed"
    assert handshake["data"]["trust"] == "matches the pinned fingerprint"


def test_wrong_pin_fails(data_dir, server, start_storescp):
    scp = start_storescp("+tls", str(server.key), str(server.cert), "-ic")
    add_tls_connection(data_dir, "Clinic", scp.port, "--tls", "encryption-only")
    wrong = "ab" * 32

    rejected = run(data_dir, "confirm-fingerprint", "Clinic", wrong)
    assert rejected.exit_code == 1
    assert "Nothing was pinned" in rejected.output
    assert json.loads(run(data_dir, "show", "Clinic", "--json").stdout)["pinned_fingerprint"] is None

    offline = run(data_dir, "confirm-fingerprint", "Clinic", wrong, "--offline")
    assert offline.exit_code == 0, offline.output
    echo_result = run(data_dir, "echo", "Clinic")
    assert echo_result.exit_code == 1
    assert "different from the pinned one" in echo_result.stdout


def test_echo_uses_bind_address(data_dir, server, start_storescp):
    scp = start_storescp("+tls", str(server.key), str(server.cert), "-ic")
    add_tls_connection(data_dir, "Clinic", scp.port, "--tls", "encryption-only")

    from_option = run(data_dir, "echo", "Clinic", "--json", "--bind-address", "127.0.0.1")
    assert from_option.exit_code == 0, from_option.output
    assert json.loads(from_option.stdout)["bind_address"] == "127.0.0.1"

    from_environment = runner.invoke(
        app,
        ["connections", "echo", "Clinic", "--json", "--data-dir", str(data_dir)],
        env={"PACSBRIDGE_BIND_ADDRESS": "127.0.0.1"},
    )
    assert from_environment.exit_code == 0, from_environment.output
    assert json.loads(from_environment.stdout)["bind_address"] == "127.0.0.1"

    invalid = run(data_dir, "echo", "Clinic", "--bind-address", "not-an-ip")
    assert invalid.exit_code == 1
    assert "PACSBRIDGE_BIND_ADDRESS" in invalid.output
