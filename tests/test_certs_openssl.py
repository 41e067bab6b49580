"""Files from `pacsbridge certs create`, read back by the OpenSSL command-line tool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

import pacsbridge.cli.certs_cmd  # noqa: F401  (registers the commands on the app)
from pacsbridge.cli.app import app
from pacsbridge.tls.certificates import colon_fingerprint, describe_certificate, parse_certificate_upload

PASSWORD = "Ultraschall 2026!"


def require_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    return path


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_openssl(), *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module", params=["rsa", "ec"])
def material(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a directory with key.pem, csr.pem, cert.pem, bundle.pfx and password.txt for one key type."""
    require_openssl()
    directory = tmp_path_factory.mktemp(f"certs-{request.param}")
    password_path = directory / "password.txt"
    password_path.write_text(PASSWORD + "\n")
    options = ["--ec"] if request.param == "ec" else []
    result = CliRunner().invoke(
        app,
        ["certs", "create", str(directory / "out"), "--cn", "pacsbridge.test", "--san", "pacsbridge.test",
         "--san", "localhost", "--san", "127.0.0.1", "--pkcs12-password-file", str(password_path), *options],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (directory / "out" / "password.txt").write_bytes(password_path.read_bytes())
    return directory / "out"


def test_x509_text(material: Path) -> None:
    result = openssl("x509", "-in", str(material / "cert.pem"), "-noout", "-text")

    assert result.returncode == 0, result.stderr
    assert "Subject: CN = pacsbridge.test" in result.stdout
    assert "Issuer: CN = pacsbridge.test" in result.stdout
    assert "CA:FALSE" in result.stdout
    assert "Digital Signature" in result.stdout
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in result.stdout
    assert "DNS:pacsbridge.test, DNS:localhost, IP Address:127.0.0.1" in result.stdout
    assert "sha256With" in result.stdout or "ecdsa-with-SHA256" in result.stdout
    if "rsaEncryption" in result.stdout:
        assert "Public-Key: (2048 bit)" in result.stdout
        assert "Key Encipherment" in result.stdout
    else:
        assert "ASN1 OID: prime256v1" in result.stdout
        assert "Key Encipherment" not in result.stdout


def test_x509_fingerprint_matches(material: Path) -> None:
    result = openssl("x509", "-in", str(material / "cert.pem"), "-noout", "-fingerprint", "-sha256")
    certificate = x509.load_pem_x509_certificate((material / "cert.pem").read_bytes())

    assert result.returncode == 0, result.stderr
    openssl_fingerprint = result.stdout.strip().split("=", 1)[1]
    assert openssl_fingerprint == describe_certificate(certificate).sha256_fingerprint_colons


@pytest.mark.parametrize("purpose", ["sslserver", "sslclient"])
def test_verify_as_own_trust_anchor(material: Path, purpose: str) -> None:
    cert_path = str(material / "cert.pem")

    result = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", cert_path, cert_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{cert_path}: OK"


def test_req_verify(material: Path) -> None:
    result = openssl("req", "-in", str(material / "csr.pem"), "-verify", "-noout", "-text")

    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout + result.stderr
    assert "Subject: CN = pacsbridge.test" in result.stdout
    assert "DNS:pacsbridge.test, DNS:localhost, IP Address:127.0.0.1" in result.stdout


def test_pkey_reads_key(material: Path) -> None:
    key_public = openssl("pkey", "-in", str(material / "key.pem"), "-pubout")
    cert_public = openssl("x509", "-in", str(material / "cert.pem"), "-noout", "-pubkey")

    assert key_public.returncode == 0, key_public.stderr
    assert cert_public.returncode == 0, cert_public.stderr
    assert key_public.stdout == cert_public.stdout
    check = openssl("pkey", "-in", str(material / "key.pem"), "-noout", "-check")
    assert check.returncode == 0, check.stderr


def test_pkcs12_opens_with_password_file(material: Path) -> None:
    result = openssl(
        "pkcs12", "-in", str(material / "bundle.pfx"), "-passin", f"file:{material / 'password.txt'}", "-nodes"
    )

    assert result.returncode == 0, result.stderr
    assert "friendlyName: pacsbridge.test" in result.stdout
    assert "-----BEGIN PRIVATE KEY-----" in result.stdout
    upload_text = result.stdout.split("-----BEGIN PRIVATE KEY-----")[0].encode("ascii")
    [certificate] = parse_certificate_upload(upload_text).certificates
    assert certificate == x509.load_pem_x509_certificate((material / "cert.pem").read_bytes())


def test_pkcs12_uses_aes_and_pbkdf2(material: Path) -> None:
    result = openssl(
        "pkcs12", "-in", str(material / "bundle.pfx"), "-passin", f"file:{material / 'password.txt'}",
        "-info", "-noout",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    details = result.stdout + result.stderr
    assert "MAC: sha256" in details
    assert "Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC" in details
    assert "PRF hmacWithSHA256" in details
    assert "RC2" not in details
    assert "3DES" not in details


def test_pkcs12_wrong_password_fails(material: Path) -> None:
    result = openssl("pkcs12", "-in", str(material / "bundle.pfx"), "-passin", "pass:wrong", "-nodes")

    assert result.returncode != 0
    assert "BEGIN PRIVATE KEY" not in result.stdout


def test_openssl_certificate_parses_as_upload(tmp_path: Path) -> None:
    """A certificate that OpenSSL made, as PEM and as DER, gives the fingerprint OpenSSL prints."""
    pem_path = tmp_path / "pacs.pem"
    der_path = tmp_path / "pacs.cer"
    created = openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(tmp_path / "pacs-key.pem"), "-out", str(pem_path), "-days", "30", "-subj", "/CN=pacs.test",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    converted = openssl("x509", "-in", str(pem_path), "-outform", "DER", "-out", str(der_path))
    assert converted.returncode == 0, converted.stderr
    printed = openssl("x509", "-in", str(pem_path), "-noout", "-fingerprint", "-sha256")
    expected = printed.stdout.strip().split("=", 1)[1]

    from_pem = parse_certificate_upload(pem_path.read_bytes())
    from_der = parse_certificate_upload(der_path.read_bytes())

    assert colon_fingerprint(describe_certificate(from_pem.certificates[0]).sha256_fingerprint) == expected
    assert from_der.converted_from_der is True
    assert from_der.pem == from_pem.pem
    assert from_der.certificates[0].public_bytes(serialization.Encoding.DER) == der_path.read_bytes()
