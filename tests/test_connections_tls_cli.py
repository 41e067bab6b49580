"""TLS options of stored connections: add, edit and show through the CLI, and their validation."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tls_material import make_identity
from typer.testing import CliRunner, Result

import pacsbridge.cli.connections_cmd  # noqa: F401  (registers the commands on the app)
from pacsbridge.cli.app import app
from pacsbridge.connections import ConnectionSettings, TlsMode, validate_settings

runner = CliRunner(
    env={
        "PACSBRIDGE_DATABASE_URL": None,
        "PACSBRIDGE_DATA_DIR": None,
        "PACSBRIDGE_SECRET_KEY": None,
        "PACSBRIDGE_BIND_ADDRESS": None,
    }
)
# The time zone is given, so `add` does not warn that times will be converted to UTC.
BASE_ADD = [
    "--kind", "pacs", "--host", "127.0.0.1", "--port", "2762", "--calling-aet", "POCUS", "--called-aet", "PACS",
    "--timezone", "UTC",
]  # fmt: skip


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, ["connections", *args, "--data-dir", str(data_dir)])


def show_json(data_dir: Path, name: str) -> dict[str, object]:
    result = run(data_dir, "show", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_add_tls_options_stored(data_dir: Path, tmp_path: Path) -> None:
    server = make_identity(tmp_path, "server", common_name="pacs.hospital.test")

    result = run(
        data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(server.cert),
        "--server-name", "pacs.hospital.test", "--check-hostname", "--legacy-ciphers",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    data = show_json(data_dir, "PACS")
    assert data["server_name"] == "pacs.hospital.test"
    assert data["check_hostname"] is True
    assert data["legacy_ciphers"] is True
    assert data["scp_certificates"][0]["sha256_fingerprint"] == server.fingerprint


def test_edit_tls_options(data_dir: Path) -> None:
    assert run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--legacy-ciphers").exit_code == 0

    result = run(data_dir, "edit", "PACS", "--no-legacy-ciphers", "--server-name", "pacs.example")
    cleared = run(data_dir, "edit", "PACS", "--server-name", "")

    assert result.exit_code == 0, result.output
    assert cleared.exit_code == 0, cleared.output
    data = show_json(data_dir, "PACS")
    assert data["legacy_ciphers"] is False
    assert data["server_name"] is None


def test_invalid_server_name_rejected(data_dir: Path) -> None:
    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--server-name", "bad name")

    assert result.exit_code == 2
    assert "error: server_name 'bad name': is neither an IP address nor a valid host name" in result.output
    assert "Nothing was stored." in result.output


def test_show_tls_section(data_dir: Path, tmp_path: Path) -> None:
    soon = make_identity(tmp_path, "soon", common_name="pacs.hospital.test", valid_days=11)
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(soon.cert), "--legacy-ciphers")

    result = run(data_dir, "show", "PACS")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("tls_mode:") and line.endswith(" active") for line in lines)
    assert any(line.startswith("scp_certificate:") and "CN=pacs.hospital.test" in line for line in lines)
    assert any(line.strip().startswith("issuer:") and "CN=pacs.hospital.test" in line for line in lines)
    assert any(line.strip().startswith("valid:") and "[EXPIRES IN" in line for line in lines)
    colon_form = ":".join(soon.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert any(line.strip().startswith("sha256:") and colon_form in line for line in lines)
    assert any(line.startswith("cipher_profile:") and "WEAKER" in line for line in lines)


def test_show_expired_certificate_flagged(data_dir: Path, tmp_path: Path) -> None:
    expired = make_identity(tmp_path, "expired", valid_days=10, starts_days_ago=40)
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(expired.cert))

    result = run(data_dir, "show", "PACS")

    assert "[EXPIRED]" in result.stdout


def test_show_unsecured(data_dir: Path) -> None:
    run(data_dir, "add", "Plain", *BASE_ADD)

    result = run(data_dir, "show", "Plain")

    assert any(line.startswith("tls_mode:") and "unsecured" in line for line in result.stdout.splitlines())
    assert "client_certificates: (none)" in " ".join(result.stdout.split())


def test_edit_host_reports_kept_pin(data_dir: Path) -> None:
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--pinned-fingerprint", "ab" * 32)

    result = run(data_dir, "edit", "PACS", "--host", "::1", "--port", "2763")

    assert result.exit_code == 0, result.output
    assert "note: the pinned fingerprint AB:AB" in result.output
    assert "--host, --port changed" in result.output
    assert show_json(data_dir, "PACS")["pinned_fingerprint"] == "ab" * 32


def test_edit_tls_inactive_reports_kept_settings(data_dir: Path) -> None:
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--pinned-fingerprint", "ab" * 32)

    result = run(data_dir, "edit", "PACS", "--tls", "inactive")

    assert result.exit_code == 0, result.output
    assert "TLS is now inactive" in result.output
    assert show_json(data_dir, "PACS")["pinned_fingerprint"] == "ab" * 32


def test_confirm_fingerprint_rejects_bad_input(data_dir: Path) -> None:
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only")
    run(data_dir, "add", "Plain", *BASE_ADD)

    malformed = run(data_dir, "confirm-fingerprint", "PACS", "12:34")
    not_encryption_only = run(data_dir, "confirm-fingerprint", "Plain", "ab" * 32, "--offline")
    unknown = run(data_dir, "confirm-fingerprint", "Nope", "ab" * 32, "--offline")

    assert malformed.exit_code == 2
    assert "is not a SHA-256 fingerprint" in malformed.output
    assert not_encryption_only.exit_code == 2
    assert "encryption-only" in not_encryption_only.output
    assert unknown.exit_code == 1
    assert "not found" in unknown.output


def test_confirm_fingerprint_offline_accepts_colon_form(data_dir: Path) -> None:
    run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only")
    colon_form = ":".join(["AB"] * 32)

    result = run(data_dir, "confirm-fingerprint", "PACS", colon_form, "--offline")

    assert result.exit_code == 0, result.output
    assert show_json(data_dir, "PACS")["pinned_fingerprint"] == "ab" * 32


def test_tls_options_without_tls_warn() -> None:
    settings = ConnectionSettings(
        name="PACS",
        kind="pacs",
        host="127.0.0.1",
        port=104,
        calling_ae_title="A",
        called_ae_title="B",
        server_name="pacs.example",
        legacy_ciphers=True,
        scu_authentication="client-certificate",
    )

    report = validate_settings(settings)

    assert report.ok
    assert {problem.field for problem in report.warnings} == {"server_name", "legacy_ciphers", "scu_authentication"}


def test_check_hostname_encryption_only_warns() -> None:
    settings = ConnectionSettings(
        name="PACS",
        kind="pacs",
        host="127.0.0.1",
        port=2762,
        calling_ae_title="A",
        called_ae_title="B",
        tls_mode=TlsMode.ENCRYPTION_ONLY,
        check_hostname=True,
    )

    report = validate_settings(settings)

    assert [problem.field for problem in report.warnings] == ["check_hostname"]


def test_pinned_fingerprint_colon_form_stored(data_dir: Path) -> None:
    colon_form = ":".join(["8E"] * 32)

    added = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--pinned-fingerprint", colon_form)
    edited = run(data_dir, "edit", "PACS", "--pinned-fingerprint", " ".join(["ab"] * 32))

    assert added.exit_code == 0, added.output
    assert edited.exit_code == 0, edited.output
    assert show_json(data_dir, "PACS")["pinned_fingerprint"] == "ab" * 32


def test_pinned_fingerprint_colon_form_added(data_dir: Path) -> None:
    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--pinned-fingerprint", "8E:BF" * 16)

    assert result.exit_code == 0, result.output
    assert show_json(data_dir, "PACS")["pinned_fingerprint"] == "8ebf" * 16


def test_invalid_pinned_fingerprint_names_both_forms(data_dir: Path) -> None:
    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "encryption-only", "--pinned-fingerprint", "8E:BF")

    assert result.exit_code == 2
    assert "error: pinned_fingerprint '8E:BF': is not a SHA-256 fingerprint" in result.stderr
    assert "with or without colons" in result.stderr
    assert "warning: pinned_fingerprint" not in result.stderr


def test_pin_with_active_tls_warns(data_dir: Path, tmp_path: Path) -> None:
    server = make_identity(tmp_path, "server")

    result = run(
        data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(server.cert),
        "--pinned-fingerprint", "ab" * 32,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "warning: pinned_fingerprint" in result.stderr
    assert "applies only in TLS mode 'encryption-only'" in result.stderr


def test_der_certificate_note_on_add_and_edit(data_dir: Path, tmp_path: Path) -> None:
    server = make_identity(tmp_path, "server")
    der_path = tmp_path / "server.der"
    der_path.write_bytes(x509.load_pem_x509_certificate(server.cert.read_bytes()).public_bytes(Encoding.DER))

    added = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(der_path))
    edited = run(data_dir, "edit", "PACS", "--scp-cert", str(der_path))

    for result in (added, edited):
        assert result.exit_code == 0, result.output
        assert f"note: --scp-cert {der_path} was DER and has been converted to PEM." in result.stderr
    assert show_json(data_dir, "PACS")["scp_certificates"][0]["sha256_fingerprint"] == server.fingerprint


def test_base64_certificate_without_pem_lines(data_dir: Path, tmp_path: Path) -> None:
    server = make_identity(tmp_path, "server")
    der = x509.load_pem_x509_certificate(server.cert.read_bytes()).public_bytes(Encoding.DER)
    path = tmp_path / "server.cer"
    path.write_bytes(base64.encodebytes(der))

    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(path))

    assert result.exit_code == 0, result.output
    assert "converted" not in result.stderr


def test_list_flags_weaker_and_expired(data_dir: Path, tmp_path: Path) -> None:
    expired = make_identity(tmp_path, "expired", valid_days=10, starts_days_ago=40)
    valid = make_identity(tmp_path, "valid")
    run(data_dir, "add", "Expired", *BASE_ADD, "--tls", "active", "--scp-cert", str(expired.cert))
    run(data_dir, "add", "Legacy", *BASE_ADD, "--tls", "active", "--scp-cert", str(valid.cert), "--legacy-ciphers")
    run(data_dir, "add", "Good", *BASE_ADD, "--tls", "active", "--scp-cert", str(valid.cert))

    result = run(data_dir, "list")

    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "tls-verified (certificate expired)" in rows["Expired"]
    assert "tls-verified (weaker ciphers)" in rows["Legacy"]
    assert rows["Good"].split()[-2] == "tls-verified"
    assert show_json(data_dir, "Legacy")["security"] == "tls-verified"
    assert show_json(data_dir, "Legacy")["security_flags"] == ["weaker ciphers"]


def test_show_unsecured_tls_fields(data_dir: Path) -> None:
    run(data_dir, "add", "Plain", *BASE_ADD)

    result = run(data_dir, "show", "Plain")

    lines = result.stdout.splitlines()
    assert any(line.startswith("cipher_profile:") and line.endswith("n/a (TLS inactive)") for line in lines)
    assert not any("BCP 195" in line for line in lines)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "(none: no name is sent, because the host is an IP address)"),
        ("::1", "(none: no name is sent, because the host is an IP address)"),
        ("pacs.hospital.test", "(none: the host name pacs.hospital.test is sent)"),
    ],
)
def test_show_server_name_default(data_dir: Path, host: str, expected: str) -> None:
    options = ["--kind", "pacs", "--host", host, "--port", "2762", "--calling-aet", "POCUS", "--called-aet", "PACS"]
    assert run(data_dir, "add", "PACS", *options, "--tls", "encryption-only").exit_code == 0

    result = run(data_dir, "show", "PACS")

    server_name_line = next(line for line in result.stdout.splitlines() if line.startswith("server_name:"))
    assert server_name_line.endswith(expected)


def test_add_warns_expired_certificate(data_dir: Path, tmp_path: Path) -> None:
    expired = make_identity(tmp_path, "expired", valid_days=10, starts_days_ago=40)

    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(expired.cert))

    assert result.exit_code == 0, result.output
    assert f"warning: scp_certificate '{expired.cert}': expired on " in result.stderr


def test_add_warns_certificate_expiring_soon(data_dir: Path, tmp_path: Path) -> None:
    soon = make_identity(tmp_path, "soon", valid_days=21)

    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(soon.cert))

    assert result.exit_code == 0, result.output
    assert f"warning: scp_certificate '{soon.cert}': expires in 20 days, on " in result.stderr


def test_add_valid_certificate_no_warning(data_dir: Path, tmp_path: Path) -> None:
    valid = make_identity(tmp_path, "valid")

    result = run(data_dir, "add", "PACS", *BASE_ADD, "--tls", "active", "--scp-cert", str(valid.cert))

    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr


def test_add_unsecured_warns_unless_test_only(data_dir: Path) -> None:
    real = run(data_dir, "add", "Plain", *BASE_ADD)
    test_only = run(data_dir, "add", "Test", *BASE_ADD, "--test-only")

    assert real.exit_code == 0, real.output
    assert "warning: tls_mode 'inactive': makes the connection unsecured, so only test data will be forwarded" in (
        real.stderr
    )
    assert test_only.exit_code == 0, test_only.output
    assert "warning: tls_mode" not in test_only.stderr
