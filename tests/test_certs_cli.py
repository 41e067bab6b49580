"""`pacsbridge certs create/key/csr/self-signed/pkcs12/show` through Typer's CliRunner and one real subprocess."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from typer.testing import CliRunner, Result

import pacsbridge.cli.certs_cmd  # noqa: F401  (registers the commands on the app)
from pacsbridge.cli.app import app
from pacsbridge.tls.certificates import certificate_pem, generate_private_key, private_key_pem, self_sign

runner = CliRunner()


def run(*args: str) -> Result:
    return runner.invoke(app, ["certs", *args])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "pkcs12-password.txt"
    path.write_text("Ultraschall 2026!\n", encoding="utf-8")
    return path


# certs create


def test_create_writes_all_files(tmp_path: Path, password_file: Path) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), "--pkcs12-password-file", str(password_file))

    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in outdir.iterdir()) == ["bundle.pfx", "cert.pem", "csr.pem", "key.pem"]
    assert mode_of(outdir / "key.pem") == 0o600
    assert mode_of(outdir / "bundle.pfx") == 0o600
    assert mode_of(outdir / "cert.pem") == 0o644
    for name in ("key.pem", "csr.pem", "cert.pem", "bundle.pfx"):
        assert f"wrote {outdir / name}" in result.stdout


def test_create_defaults(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir))

    assert result.exit_code == 0, result.output
    assert not (outdir / "bundle.pfx").exists()
    certificate = load_certificate(outdir / "cert.pem")
    assert certificate.subject.rfc4514_string() == "CN=pacsbridge"
    assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
    validity = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=3649) < validity <= dt.timedelta(days=3650)
    key = serialization.load_pem_private_key((outdir / "key.pem").read_bytes(), password=None)
    assert key.public_key() == certificate.public_key()
    csr = x509.load_pem_x509_csr((outdir / "csr.pem").read_bytes())
    assert csr.is_signature_valid
    assert csr.public_key() == certificate.public_key()


def test_create_prints_certificate_summary(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), "--cn", "us-cart-3", "--san", "us-cart-3.radiology.test", "--san", "10.0.0.7")

    assert result.exit_code == 0, result.output
    fingerprint = load_certificate(outdir / "cert.pem").fingerprint(hashes.SHA256()).hex().upper()
    colon_fingerprint = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2))
    assert f"SHA-256 fingerprint: {colon_fingerprint}" in result.stdout
    assert "subject: CN=us-cart-3" in result.stdout
    assert "subject alt names: DNS:us-cart-3.radiology.test, IP:10.0.0.7" in result.stdout
    assert "valid from: " in result.stdout
    assert "valid until: " in result.stdout


def test_create_ec_with_days(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), "--ec", "--days", "90", "--cn", "pacsbridge.test")

    assert result.exit_code == 0, result.output
    certificate = load_certificate(outdir / "cert.pem")
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    validity = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < validity <= dt.timedelta(days=90)
    assert "private key, EC secp256r1" in result.stdout


def test_create_pkcs12_uses_first_line(tmp_path: Path) -> None:
    password_path = tmp_path / "password.txt"
    password_path.write_bytes(b"first line\r\nsecond line\n")
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), "--pkcs12-password-file", str(password_path))

    assert result.exit_code == 0, result.output
    bundle = pkcs12.load_pkcs12((outdir / "bundle.pfx").read_bytes(), b"first line")
    assert bundle.cert is not None
    assert bundle.cert.certificate == load_certificate(outdir / "cert.pem")
    assert "first line" not in result.output


def test_create_rejects_overwrite(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"
    assert run("create", str(outdir)).exit_code == 0
    original_key = (outdir / "key.pem").read_bytes()

    result = run("create", str(outdir))

    assert result.exit_code == 2
    assert "already exist. Give --force to replace them" in result.stderr
    assert str(outdir / "key.pem") in result.stderr
    assert (outdir / "key.pem").read_bytes() == original_key


def test_create_force_replaces(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"
    assert run("create", str(outdir)).exit_code == 0
    original_key = (outdir / "key.pem").read_bytes()

    result = run("create", str(outdir), "--force")

    assert result.exit_code == 0, result.output
    assert (outdir / "key.pem").read_bytes() != original_key
    assert mode_of(outdir / "key.pem") == 0o600


def test_create_rejects_existing_bundle(tmp_path: Path, password_file: Path) -> None:
    outdir = tmp_path / "tls"
    outdir.mkdir()
    (outdir / "bundle.pfx").write_bytes(b"keep me")

    result = run("create", str(outdir), "--pkcs12-password-file", str(password_file))

    assert result.exit_code == 2
    assert f"error: {outdir / 'bundle.pfx'}: already exists" in result.stderr
    assert not (outdir / "key.pem").exists()


def test_create_rejects_empty_password(tmp_path: Path) -> None:
    password_path = tmp_path / "password.txt"
    password_path.write_text("\nsecond line\n")

    result = run("create", str(tmp_path / "tls"), "--pkcs12-password-file", str(password_path))

    assert result.exit_code == 2
    assert f"error: {password_path}: has an empty first line" in result.stderr
    assert not (tmp_path / "tls").exists()


def test_create_rejects_missing_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"

    result = run("create", str(tmp_path / "tls"), "--pkcs12-password-file", str(missing))

    assert result.exit_code == 2
    assert f"error: {missing}: cannot be read (No such file or directory)" in result.stderr


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--san", "bad name"], "neither an IP address nor a valid DNS name"),
        (["--cn", "Ultrasound cart 3"], "cannot be the default subjectAltName"),
        (["--cn", ""], "common name is empty"),
    ],
)
def test_create_rejects_invalid_values(tmp_path: Path, options: list[str], expected: str) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), *options)

    assert result.exit_code == 2
    assert expected in result.stderr
    assert result.stderr.startswith("error: certificate: ")
    assert not outdir.exists()


def test_create_rejects_file_as_outdir(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")

    result = run("create", str(not_a_directory))

    assert result.exit_code == 2
    assert "is not a directory" in result.stderr


def test_create_unwritable_directory_fails(tmp_path: Path) -> None:
    outdir = tmp_path / "blocked" / "tls"
    (tmp_path / "blocked").write_text("a file where a directory should be")

    result = run("create", str(outdir))

    assert result.exit_code == 1
    assert f"error: {outdir}: cannot be created" in result.stderr


# Single-step commands


def test_key_command_rsa_and_ec(tmp_path: Path) -> None:
    rsa_result = run("key", str(tmp_path / "rsa.pem"))
    ec_result = run("key", str(tmp_path / "ec.pem"), "--ec")

    assert rsa_result.exit_code == 0, rsa_result.output
    assert ec_result.exit_code == 0, ec_result.output
    rsa_key = serialization.load_pem_private_key((tmp_path / "rsa.pem").read_bytes(), password=None)
    ec_key = serialization.load_pem_private_key((tmp_path / "ec.pem").read_bytes(), password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert mode_of(tmp_path / "rsa.pem") == 0o600
    assert "BEGIN" not in rsa_result.output


def test_key_command_rejects_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("existing")

    result = run("key", str(path))

    assert result.exit_code == 2
    assert f"error: {path}: already exists. Give --force to replace it" in result.stderr
    assert path.read_text() == "existing"


def test_step_by_step_matches_create(tmp_path: Path, password_file: Path) -> None:
    key_path = tmp_path / "key.pem"
    csr_path = tmp_path / "csr.pem"
    cert_path = tmp_path / "cert.pem"
    bundle_path = tmp_path / "bundle.pfx"

    assert run("key", str(key_path), "--ec").exit_code == 0
    csr_result = run("csr", "--key", str(key_path), str(csr_path), "--cn", "pacsbridge.test", "--san", "127.0.0.1")
    cert_result = run("self-signed", "--key", str(key_path), str(cert_path), "--cn", "pacsbridge.test", "--days", "7")
    bundle_result = run(
        "pkcs12", "--key", str(key_path), "--cert", str(cert_path), "--password-file", str(password_file),
        str(bundle_path), "--name", "cart 3",
    )  # fmt: skip

    assert csr_result.exit_code == 0, csr_result.output
    assert cert_result.exit_code == 0, cert_result.output
    assert bundle_result.exit_code == 0, bundle_result.output
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    certificate = load_certificate(cert_path)
    assert csr.public_key() == key.public_key()
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress
    ) == [ipaddress.ip_address("127.0.0.1")]
    assert certificate.public_key() == key.public_key()
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc < dt.timedelta(days=8)
    bundle = pkcs12.load_pkcs12(bundle_path.read_bytes(), b"Ultraschall 2026!")
    assert bundle.cert is not None
    assert bundle.cert.certificate == certificate
    assert bundle.cert.friendly_name == b"cart 3"
    assert mode_of(bundle_path) == 0o600


def test_csr_rejects_certificate_as_key(tmp_path: Path) -> None:
    key = generate_private_key(ec=True)
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(certificate_pem(self_sign(key, "pacsbridge")))

    result = run("csr", "--key", str(cert_path), str(tmp_path / "csr.pem"))

    assert result.exit_code == 2
    assert f"error: {cert_path}: contains no PEM private key" in result.stderr


def test_self_signed_rejects_missing_key(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    result = run("self-signed", "--key", str(missing), str(tmp_path / "cert.pem"))

    assert result.exit_code == 2
    assert f"error: {missing}: cannot be read" in result.stderr


def test_pkcs12_rejects_mismatched_key(tmp_path: Path, password_file: Path) -> None:
    key_path = tmp_path / "key.pem"
    cert_path = tmp_path / "cert.pem"
    key_path.write_bytes(private_key_pem(generate_private_key(ec=True)))
    cert_path.write_bytes(certificate_pem(self_sign(generate_private_key(ec=True), "pacsbridge")))

    result = run(
        "pkcs12", "--key", str(key_path), "--cert", str(cert_path), "--password-file", str(password_file),
        str(tmp_path / "bundle.pfx"),
    )  # fmt: skip

    assert result.exit_code == 2
    assert "private key does not belong to the certificate" in result.stderr
    assert not (tmp_path / "bundle.pfx").exists()


def test_pkcs12_rejects_empty_password_file(tmp_path: Path) -> None:
    key = generate_private_key(ec=True)
    key_path = tmp_path / "key.pem"
    cert_path = tmp_path / "cert.pem"
    password_path = tmp_path / "empty.txt"
    key_path.write_bytes(private_key_pem(key))
    cert_path.write_bytes(certificate_pem(self_sign(key, "pacsbridge")))
    password_path.write_bytes(b"")

    result = run(
        "pkcs12", "--key", str(key_path), "--cert", str(cert_path), "--password-file", str(password_path),
        str(tmp_path / "bundle.pfx"),
    )  # fmt: skip

    assert result.exit_code == 2
    assert "an empty PKCS#12 password is not allowed" in result.stderr


# certs show


def write_certificate(
    path: Path, *, days: int = 365, age: dt.timedelta = dt.timedelta(0), der: bool = False
) -> x509.Certificate:
    """Write a certificate that was created `age` ago, valid for `days` days from then."""
    now = dt.datetime.now(dt.UTC) - age
    certificate = self_sign(generate_private_key(ec=True), "pacs.hospital.test", days=days, now=now)
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    path.write_bytes(certificate.public_bytes(encoding))
    return certificate


def test_show_pem(tmp_path: Path) -> None:
    path = tmp_path / "pacs.pem"
    certificate = write_certificate(path)

    result = run("show", str(path))

    assert result.exit_code == 0, result.output
    assert f"{path}: 1 certificate(s), PEM" in result.stdout
    assert "subject: CN=pacs.hospital.test" in result.stdout
    assert certificate.fingerprint(hashes.SHA256()).hex().upper()[:2] + ":" in result.stdout
    # Created just now with 365 days of validity: 364 days and a fraction, rounded up.
    assert "status: valid, 365 days left" in result.stdout


def test_show_der_reports_conversion(tmp_path: Path) -> None:
    path = tmp_path / "pacs.cer"
    write_certificate(path, der=True)

    result = run("show", str(path))

    assert result.exit_code == 0, result.output
    assert "DER, converted to PEM" in result.stdout


def test_show_chain(tmp_path: Path) -> None:
    first = tmp_path / "a.pem"
    second = tmp_path / "b.pem"
    write_certificate(first)
    write_certificate(second)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(first.read_bytes() + second.read_bytes())

    result = run("show", str(chain))

    assert result.exit_code == 0, result.output
    assert "certificate 1 of 2" in result.stdout
    assert "certificate 2 of 2" in result.stdout


def test_show_expired(tmp_path: Path) -> None:
    path = tmp_path / "old.pem"
    write_certificate(path, days=365, age=dt.timedelta(days=400))

    result = run("show", str(path))

    assert result.exit_code == 0, result.output
    assert "status: EXPIRED on " in result.stdout


def test_show_expiring_in_ten_days(tmp_path: Path) -> None:
    path = tmp_path / "soon.pem"
    # 9.5 days left, rounded up to 10, with half a day of margin while the test runs.
    write_certificate(path, days=365, age=dt.timedelta(days=355, hours=12))

    result = run("show", str(path))

    assert result.exit_code == 0, result.output
    assert "status: EXPIRES SOON, in 10 days on " in result.stdout


def test_show_json(tmp_path: Path) -> None:
    path = tmp_path / "soon.cer"
    certificate = write_certificate(path, days=365, age=dt.timedelta(days=355), der=True)

    result = run("show", str(path), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "der"
    assert data["converted_from_der"] is True
    [entry] = data["certificates"]
    assert entry["sha256_fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex()
    assert entry["expires_soon"] is True
    assert entry["expired"] is False
    assert entry["subject"] == "CN=pacs.hospital.test"


def test_show_base64_without_header(tmp_path: Path) -> None:
    der_path = tmp_path / "pacs.der"
    certificate = write_certificate(der_path, der=True)
    path = tmp_path / "pacs.cer"
    path.write_bytes(base64.encodebytes(der_path.read_bytes()))

    result = run("show", str(path), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "base64"
    assert data["certificates"][0]["sha256_fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex()


def test_show_rejects_private_key(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    pem = private_key_pem(generate_private_key())
    path.write_bytes(pem)
    key_line = pem.decode("ascii").splitlines()[1]

    result = run("show", str(path))

    assert result.exit_code == 2
    assert f"error: {path}: contains a private key, which 'certs show' does not display, and no certificate" in (
        result.stderr
    )
    assert "hospital side" not in result.stderr
    assert key_line not in result.output
    assert key_line[:12] not in result.output


def test_show_rejects_pkcs12(tmp_path: Path, password_file: Path) -> None:
    outdir = tmp_path / "tls"
    assert run("create", str(outdir), "--ec", "--pkcs12-password-file", str(password_file)).exit_code == 0

    result = run("show", str(outdir / "bundle.pfx"))

    assert result.exit_code == 2
    assert "is a PKCS#12 file" in result.stderr


def test_show_rejects_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)))

    result = run("show", str(path))

    assert result.exit_code == 2
    assert f"error: {path}: is not a certificate" in result.stderr


def test_show_missing_file(tmp_path: Path) -> None:
    result = run("show", str(tmp_path / "missing.pem"))

    assert result.exit_code == 2
    assert "cannot be read (No such file or directory)" in result.stderr


def test_certs_in_subprocess(tmp_path: Path) -> None:
    """Run the commands in a new interpreter that imports certs_cmd itself, independent of cli/main.py."""
    outdir = tmp_path / "tls"
    script = (
        "import sys; import pacsbridge.cli.certs_cmd; from pacsbridge.cli.app import app; "
        "app(args=sys.argv[1:], prog_name='pacsbridge')"
    )

    create_result = subprocess.run(
        [sys.executable, "-c", script, "certs", "create", str(outdir), "--ec"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    show_result = subprocess.run(
        [sys.executable, "-c", script, "certs", "show", str(outdir / "cert.pem"), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert create_result.returncode == 0, create_result.stderr
    assert show_result.returncode == 0, show_result.stderr
    fingerprint = load_certificate(outdir / "cert.pem").fingerprint(hashes.SHA256()).hex()
    assert json.loads(show_result.stdout)["certificates"][0]["sha256_fingerprint"] == fingerprint


def test_create_rejects_zero_days_naming_option(tmp_path: Path) -> None:
    outdir = tmp_path / "tls"

    result = run("create", str(outdir), "--days", "0")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --days 0: is not a positive number of days")
    assert not outdir.exists()


def test_self_signed_rejects_too_many_days(tmp_path: Path) -> None:
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(private_key_pem(generate_private_key(ec=True)))

    result = run("self-signed", str(tmp_path / "cert.pem"), "--key", str(key_path), "--days", "3000000")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --days 3000000: ends the validity after the year 9999")
    assert not (tmp_path / "cert.pem").exists()


def test_create_ten_days_shows_ten(tmp_path: Path) -> None:
    result = run("create", str(tmp_path / "tls"), "--ec", "--days", "10")

    assert result.exit_code == 0, result.output
    assert "status: EXPIRES SOON, in 10 days on " in result.stdout


def test_show_combined_certificate_and_key(tmp_path: Path) -> None:
    key = generate_private_key(ec=True)
    certificate = self_sign(key, "pacs.hospital.test", days=365)
    path = tmp_path / "haproxy.pem"
    pem = certificate_pem(certificate) + private_key_pem(key)
    path.write_bytes(pem)
    key_line = private_key_pem(key).decode("ascii").splitlines()[1]

    result = run("show", str(path))
    as_json = run("show", str(path), "--json")

    assert result.exit_code == 0, result.output
    assert f"{path}: 1 certificate(s), PEM" in result.stdout
    assert "subject: CN=pacs.hospital.test" in result.stdout
    assert f"note: {path} contains a private key, which 'certs show' does not display." in result.stderr
    assert "hospital side" not in result.output
    assert key_line not in result.output
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["contains_private_key"] is True


def test_show_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Certificate of the PACS: ask Dr. Weber, room 12!\n")

    result = run("show", str(path))

    assert result.exit_code == 2
    assert f"error: {path}: is not a certificate: no PEM block and not Base64." in result.stderr


def test_show_random_bytes_message(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)))

    result = run("show", str(path))

    assert f"error: {path}: is not a certificate (neither PEM text nor DER)." in result.stderr
    assert "ASN.1" not in result.stderr
