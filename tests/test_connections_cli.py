"""`pacsbridge connections add/list/show/edit` through Typer's CliRunner and one real subprocess."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner, Result

import pacsbridge.cli.connections_cmd  # noqa: F401  (registers the commands on the app)
from pacsbridge.cli.app import app

UNICODE_NAME = "Radiologie Zürich – 東京"
PROBLEM_LINE = re.compile(r"^(error|warning): [a-z_]+ .+: .+\. .+$")
BASE_ADD = ["--kind", "pacs", "--host", "127.0.0.1", "--port", "104", "--calling-aet", "POCUS01", "--called-aet", "PACS"]

# Keep a developer's own configuration out of the tests.
runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, ["connections", *args, "--data-dir", str(data_dir)])


def add(data_dir: Path, name: str, *options: str) -> Result:
    return run(data_dir, "add", name, *BASE_ADD, *options)


def show_json(data_dir: Path, name: str) -> dict[str, object]:
    result = run(data_dir, "show", name, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def list_names(data_dir: Path) -> list[str]:
    result = run(data_dir, "list", "--json")
    assert result.exit_code == 0, result.output
    return [entry["name"] for entry in json.loads(result.stdout)]


def write_certificate(directory: Path, *, with_key: bool = False, der: bool = False) -> Path:
    """Write a self-signed certificate (and optionally its private key) and return the file path."""
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
    directory.mkdir(parents=True, exist_ok=True)
    if der:
        path = directory / "scp.der"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
        return path
    data = certificate.public_bytes(serialization.Encoding.PEM)
    if with_key:
        data += key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    path = directory / ("scp-with-key.pem" if with_key else "scp.pem")
    path.write_bytes(data)
    return path


def test_add_list_show_edit_round_trip(data_dir: Path) -> None:
    added = add(data_dir, UNICODE_NAME, "--timezone", "Europe/Berlin", "--test-only")
    assert added.exit_code == 0, added.output
    assert "Added connection" in added.stdout
    assert "unsecured" in added.stdout

    listed = run(data_dir, "list")
    assert listed.exit_code == 0, listed.output
    assert UNICODE_NAME in listed.stdout
    assert "127.0.0.1:104" in listed.stdout
    assert "unsecured" in listed.stdout

    show_result = run(data_dir, "show", UNICODE_NAME)
    assert show_result.exit_code == 0, show_result.output
    assert "UNSECURED" in show_result.stdout
    assert "Europe/Berlin" in show_result.stdout
    assert re.search(r"^test_only:\s+yes$", show_result.stdout, re.MULTILINE)

    edited = run(data_dir, "edit", UNICODE_NAME, "--port", "11112", "--no-test-only")
    assert edited.exit_code == 0, edited.output

    data = show_json(data_dir, UNICODE_NAME)
    assert data["port"] == 11112
    assert data["test_only"] is False
    assert data["timezone"] == "Europe/Berlin"
    assert data["host"] == "127.0.0.1"


def test_show_json_has_every_field(data_dir: Path) -> None:
    assert add(data_dir, "PACS").exit_code == 0

    data = show_json(data_dir, "PACS")

    expected = {
        "name": "PACS",
        "kind": "pacs",
        "host": "127.0.0.1",
        "port": 104,
        "calling_ae_title": "POCUS01",
        "called_ae_title": "PACS",
        "timezone": "UTC",
        "character_set": "ISO_IR 100",
        "tls_mode": "inactive",
        "security": "unsecured",
        "scp_certificate_pem": None,
        "pinned_fingerprint": None,
        "scu_authentication": "anonymous",
        "image_compression": "as-received",
        "loop_compression": "as-received",
        "monochrome": "never",
        "acse_timeout": 300.0,
        "dimse_timeout": 300.0,
        "connection_timeout": 300.0,
        "test_only": False,
        "worklist_filters": {},
        "organization": "default",
    }
    for key, value in expected.items():
        assert data[key] == value, key
    assert "created_at" in data
    assert "updated_at" in data


def test_add_every_option(data_dir: Path, tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path / "certs")

    result = add(
        data_dir,
        "Full",
        "--timezone", "Asia/Tokyo",
        "--charset", "\\ISO 2022 IR 87",
        "--tls", "active",
        "--scp-cert", str(certificate),
        "--pinned-fingerprint", "ab" * 32,
        "--scu-auth", "client-certificate",
        "--image-compression", "jpeg-lossless",
        "--loop-compression", "jpeg-baseline",
        "--monochrome", "b-mode-only",
        "--acse-timeout", "10",
        "--dimse-timeout", "20.5",
        "--connection-timeout", "5",
        "--worklist-filters", '{"modality": "US"}',
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    data = show_json(data_dir, "Full")
    assert data["timezone"] == "Asia/Tokyo"
    assert data["character_set"] == "\\ISO 2022 IR 87"
    assert data["tls_mode"] == "active"
    assert data["security"] == "tls-verified"
    assert data["pinned_fingerprint"] == "ab" * 32
    assert data["scu_authentication"] == "client-certificate"
    assert data["image_compression"] == "jpeg-lossless"
    assert data["loop_compression"] == "jpeg-baseline"
    assert data["monochrome"] == "b-mode-only"
    assert data["acse_timeout"] == 10.0
    assert data["dimse_timeout"] == 20.5
    assert data["connection_timeout"] == 5.0
    assert data["worklist_filters"] == {"modality": "US"}
    assert data["scp_certificate_pem"] == certificate.read_text()


def test_add_errors_one_line_each(data_dir: Path) -> None:
    result = run(
        data_dir,
        "add", "Bad",
        "--kind", "vna",
        "--host", "bad host",
        "--port", "abc",
        "--calling-aet", "A" * 17,
        "--called-aet", "PACS\\01",
        "--timezone", "Mars/Olympus",
        "--charset", "ISO_IR 999",
        "--tls", "sometimes",
        "--acse-timeout", "0",
        "--dimse-timeout", "soon",
    )  # fmt: skip

    assert result.exit_code == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    fields = sorted(line.split()[1] for line in error_lines)
    assert fields == [
        "acse_timeout",
        "called_ae_title",
        "calling_ae_title",
        "character_set",
        "dimse_timeout",
        "host",
        "kind",
        "port",
        "timezone",
        "tls_mode",
    ]
    for line in error_lines:
        assert PROBLEM_LINE.match(line), line
    assert "error: port 'abc': is not a TCP port." in result.stderr
    assert "error: timezone 'Mars/Olympus': is not an IANA time zone." in result.stderr
    assert "error: called_ae_title 'PACS\\01': contains a backslash" in result.stderr
    assert list_names(data_dir) == []


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", "1.5"])
def test_add_invalid_port_rejected(data_dir: Path, port: str) -> None:
    result = run(
        data_dir, "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", port,
        "--calling-aet", "A", "--called-aet", "B",
    )  # fmt: skip

    assert result.exit_code == 2
    assert f"error: port {port if port.lstrip('-').isdigit() else repr(port)}: is not a TCP port." in result.stderr
    assert list_names(data_dir) == []


def test_add_missing_required_options(data_dir: Path) -> None:
    result = run(data_dir, "add", "PACS", "--host", "127.0.0.1")

    assert result.exit_code == 2
    for field, option in [
        ("kind", "--kind"),
        ("port", "--port"),
        ("calling_ae_title", "--calling-aet"),
        ("called_ae_title", "--called-aet"),
    ]:
        assert f"error: {field} (not given): is required. Give it with {option}." in result.stderr
    assert "error: host" not in result.stderr
    assert list_names(data_dir) == []


def test_add_warnings_saved_with_case(data_dir: Path) -> None:
    result = run(
        data_dir, "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "104",
        "--calling-aet", "PoCus 01", "--called-aet", "pacs",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    title_warnings = [line for line in warning_lines if line.startswith(("warning: calling_ae", "warning: called_ae"))]
    assert len(title_warnings) == 3
    for line in warning_lines:
        assert PROBLEM_LINE.match(line), line
    data = show_json(data_dir, "PACS")
    assert data["calling_ae_title"] == "PoCus 01"
    assert data["called_ae_title"] == "pacs"


def test_add_duplicate_name_rejected(data_dir: Path) -> None:
    assert add(data_dir, "PACS").exit_code == 0

    result = add(data_dir, "PACS", "--port", "105")

    assert result.exit_code == 2
    assert "error: name 'PACS': is already used" in result.stderr
    assert show_json(data_dir, "PACS")["port"] == 104


def test_add_second_worklist_rejected(data_dir: Path) -> None:
    first = run(
        data_dir, "add", "Hospital MWL", "--kind", "mwl", "--host", "::1", "--port", "11112",
        "--calling-aet", "POCUS", "--called-aet", "WORKLIST",
    )  # fmt: skip
    assert first.exit_code == 0, first.output

    second = run(
        data_dir, "add", "Other MWL", "--kind", "mwl", "--host", "::1", "--port", "11113",
        "--calling-aet", "POCUS", "--called-aet", "WORKLIST2",
    )  # fmt: skip

    assert second.exit_code == 2
    assert "error: kind 'mwl':" in second.stderr
    assert "'Hospital MWL'" in second.stderr
    assert list_names(data_dir) == ["Hospital MWL"]


def test_show_unknown_name_lists_known(data_dir: Path) -> None:
    assert add(data_dir, "PACS A").exit_code == 0
    assert add(data_dir, "PACS B").exit_code == 0

    result = run(data_dir, "show", "PACS C")

    assert result.exit_code == 1
    assert "error: connection 'PACS C' not found" in result.stderr
    assert "'PACS A', 'PACS B'" in result.stderr


def test_edit_unknown_name_fails(data_dir: Path) -> None:
    result = run(data_dir, "edit", "Missing", "--port", "105")

    assert result.exit_code == 1
    assert "error: connection 'Missing' not found" in result.stderr
    assert "No connections are stored yet" in result.stderr


def test_edit_invalid_changes_nothing(data_dir: Path) -> None:
    assert add(data_dir, "PACS").exit_code == 0

    result = run(data_dir, "edit", "PACS", "--port", "0", "--host", "10.0.0.9", "--timezone", "Mars/Olympus")

    assert result.exit_code == 2
    assert "error: port 0: is not a TCP port." in result.stderr
    assert "error: timezone 'Mars/Olympus'" in result.stderr
    data = show_json(data_dir, "PACS")
    assert data["port"] == 104
    assert data["host"] == "127.0.0.1"
    assert data["updated_at"] == data["created_at"]


def test_edit_renames(data_dir: Path) -> None:
    assert add(data_dir, "PACS").exit_code == 0

    result = run(data_dir, "edit", "PACS", "--name", UNICODE_NAME)

    assert result.exit_code == 0, result.output
    assert list_names(data_dir) == [UNICODE_NAME]


def test_edit_without_options_fails(data_dir: Path) -> None:
    assert add(data_dir, "PACS").exit_code == 0

    result = run(data_dir, "edit", "PACS")

    assert result.exit_code == 2
    assert "no changes given" in result.stderr


def test_edit_certificate_added_and_removed(data_dir: Path, tmp_path: Path) -> None:
    certificate = write_certificate(tmp_path / "certs")
    assert add(data_dir, "PACS").exit_code == 0

    secured = run(data_dir, "edit", "PACS", "--tls", "active", "--scp-cert", str(certificate), "--port", "2762")
    assert secured.exit_code == 0, secured.output
    show_result = run(data_dir, "show", "PACS")
    assert "CN=pacs.hospital.test" in show_result.stdout
    assert "UNSECURED" not in show_result.stdout

    still_active = run(data_dir, "edit", "PACS", "--scp-cert", "")
    assert still_active.exit_code == 2
    assert "error: scp_certificate (not given): is missing" in still_active.stderr

    removed = run(data_dir, "edit", "PACS", "--tls", "encryption-only", "--scp-cert", "")
    assert removed.exit_code == 0, removed.output
    data = show_json(data_dir, "PACS")
    assert data["scp_certificate_pem"] is None
    assert data["security"] == "tls-encryption-only"


def test_add_certificate_with_private_key_rejected(data_dir: Path, tmp_path: Path) -> None:
    bundle = write_certificate(tmp_path / "certs", with_key=True)

    result = add(data_dir, "PACS", "--tls", "active", "--scp-cert", str(bundle))

    assert result.exit_code == 2
    assert f"error: scp_certificate '{bundle}': contains a private key" in result.stderr
    key_lines = bundle.read_text().split("-----BEGIN PRIVATE KEY-----")[1].splitlines()
    assert "PRIVATE KEY-----" not in result.output
    assert not any(line and line in result.output for line in key_lines[1:-1])
    assert list_names(data_dir) == []


def test_add_der_certificate_converted(data_dir: Path, tmp_path: Path) -> None:
    der = write_certificate(tmp_path / "certs", der=True)

    result = add(data_dir, "PACS", "--tls", "active", "--scp-cert", str(der))

    assert result.exit_code == 0, result.output
    pem = show_json(data_dir, "PACS")["scp_certificate_pem"]
    assert isinstance(pem, str)
    assert pem.startswith("-----BEGIN CERTIFICATE-----")


def test_add_unreadable_certificate_rejected(data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    result = add(data_dir, "PACS", "--tls", "active", "--scp-cert", str(missing))

    assert result.exit_code == 2
    assert f"error: scp_certificate '{missing}': cannot be read" in result.stderr
    assert result.stderr.count("error: scp_certificate") == 1


def test_add_invalid_worklist_filters_rejected(data_dir: Path) -> None:
    result = add(data_dir, "PACS", "--worklist-filters", "{modality: US}")

    assert result.exit_code == 2
    assert "error: worklist_filters '{modality: US}': is not valid JSON" in result.stderr


def test_list_empty(data_dir: Path) -> None:
    result = run(data_dir, "list")

    assert result.exit_code == 0
    assert "No connections yet" in result.stdout


def test_list_json_sorted(data_dir: Path) -> None:
    for name in ["b PACS", "A PACS", "C PACS"]:
        assert add(data_dir, name).exit_code == 0

    assert list_names(data_dir) == ["A PACS", "b PACS", "C PACS"]


def test_data_dir_from_environment(tmp_path: Path) -> None:
    data_dir = tmp_path / "env-data"
    environment = {"PACSBRIDGE_DATA_DIR": str(data_dir)}

    added = runner.invoke(app, ["connections", "add", "PACS", *BASE_ADD], env=environment)
    listed = runner.invoke(app, ["connections", "list", "--json"], env=environment)

    assert added.exit_code == 0, added.output
    assert [entry["name"] for entry in json.loads(listed.stdout)] == ["PACS"]
    assert (data_dir / "pacsbridge.sqlite3").is_file()


def test_data_dir_that_is_a_file_fails(tmp_path: Path) -> None:
    data_file = tmp_path / "data"
    data_file.write_text("not a directory")

    result = run(data_file, "list")

    assert result.exit_code == 1
    assert f"error: '{data_file}' exists but is not a directory" in result.stderr


def test_entry_point_subprocess(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    command = [sys.executable, "-m", "pacsbridge.cli.main", "connections"]
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    added = subprocess.run(
        [*command, "add", UNICODE_NAME, *BASE_ADD, "--data-dir", data_dir],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    show_result = subprocess.run(
        [*command, "show", UNICODE_NAME, "--data-dir", data_dir],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    rejected = subprocess.run(
        [*command, "add", "Bad", *BASE_ADD[:4], "--port", "0", *BASE_ADD[6:], "--data-dir", data_dir],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert added.returncode == 0, added.stderr
    assert show_result.returncode == 0, show_result.stderr
    assert UNICODE_NAME in show_result.stdout
    assert "UNSECURED" in show_result.stdout
    assert rejected.returncode == 2
    assert "error: port 0: is not a TCP port." in rejected.stderr


def test_add_without_timezone_warns_about_utc(tmp_path):
    from typer.testing import CliRunner

    from pacsbridge.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "connections", "add", "PACS", "--kind", "pacs", "--host", "127.0.0.1", "--port", "104",
            "--calling-aet", "POCUS", "--called-aet", "PACS", "--test-only", "--data-dir", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: timezone 'UTC': was not given" in result.output
    assert "--timezone ZONE" in result.output


def test_unsecured_worklist_warning_names_patient_data(data_dir: Path) -> None:
    result = run(
        data_dir, "add", "Ward MWL", "--kind", "mwl", "--host", "127.0.0.1", "--port", "11112",
        "--calling-aet", "POCUS", "--called-aet", "MWL",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "queries and their answers, with patient names and IDs, cross the network unencrypted" in result.output
    assert "forwarded" not in result.output


def test_edit_quality_notes_new_derived_uids(data_dir: Path) -> None:
    assert add(data_dir, "PACS", "--image-compression", "jpeg-baseline").exit_code == 0

    result = run(data_dir, "edit", "PACS", "--jpeg-quality", "95")

    assert result.exit_code == 0, result.output
    assert "note: --jpeg-quality changed." in result.stderr
    assert "the PACS holds both" in result.stderr
