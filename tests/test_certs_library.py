"""pacsbridge.tls.certificates: key and certificate creation, PKCS#12, upload parsing and certificate details."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacsbridge.tls.certificates import (
    DEFAULT_VALIDITY_DAYS,
    KEY_WITHOUT_CERTIFICATE,
    MAX_UPLOAD_BYTES,
    CertificateError,
    build_csr,
    certificate_pem,
    colon_fingerprint,
    describe_certificate,
    generate_private_key,
    load_private_key_pem,
    parse_alt_name,
    parse_certificate_upload,
    private_key_pem,
    self_sign,
    sha256_fingerprint,
    write_output_file,
    write_pkcs12,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = generate_private_key()
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    key = generate_private_key(ec=True)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.fixture(scope="module")
def certificate(ec_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return self_sign(ec_key, "pacs.hospital.test", now=NOW)


def make_chain() -> tuple[x509.Certificate, x509.Certificate]:
    """Return a leaf certificate and the CA certificate that issued it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hospital Test CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs.hospital.test")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )
    return leaf_certificate, ca_certificate


def extension_value(certificate: x509.Certificate, extension_class: type) -> object:
    return certificate.extensions.get_extension_for_class(extension_class).value


# Keys, CSRs and self-signed certificates


def test_generate_private_key_types(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    assert rsa_key.key_size == 2048
    assert rsa_key.public_key().public_numbers().e == 65537
    assert isinstance(ec_key.curve, ec.SECP256R1)


@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_self_sign_extensions(key_fixture: str, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(key_fixture)
    certificate = self_sign(key, "pacsbridge.test", now=NOW)

    assert certificate.subject == certificate.issuer
    assert certificate.subject.rfc4514_string() == "CN=pacsbridge.test"
    assert certificate.signature_hash_algorithm is not None
    assert certificate.signature_hash_algorithm.name == "sha256"
    certificate.verify_directly_issued_by(certificate)

    basic_constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic_constraints.critical
    assert basic_constraints.value.ca is False

    key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical
    assert key_usage.value.digital_signature
    assert key_usage.value.key_encipherment is isinstance(key, rsa.RSAPrivateKey)
    assert not key_usage.value.key_cert_sign

    extended_key_usage = extension_value(certificate, x509.ExtendedKeyUsage)
    assert list(extended_key_usage) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    alt_names = extension_value(certificate, x509.SubjectAlternativeName)
    assert alt_names.get_values_for_type(x509.DNSName) == ["pacsbridge.test"]

    subject_key_id = extension_value(certificate, x509.SubjectKeyIdentifier)
    authority_key_id = extension_value(certificate, x509.AuthorityKeyIdentifier)
    assert authority_key_id.key_identifier == subject_key_id.digest


def test_self_sign_default_validity(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW)

    assert certificate.not_valid_after_utc == NOW + dt.timedelta(days=DEFAULT_VALIDITY_DAYS)
    assert DEFAULT_VALIDITY_DAYS == 3650
    # Backdated, so that a peer whose clock runs a little behind accepts it.
    assert certificate.not_valid_before_utc < NOW


def test_self_sign_custom_days(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", days=30, now=NOW)

    assert certificate.not_valid_after_utc == NOW + dt.timedelta(days=30)


def test_self_sign_serial_numbers_differ(ec_key: ec.EllipticCurvePrivateKey) -> None:
    first = self_sign(ec_key, "pacsbridge", now=NOW)
    second = self_sign(ec_key, "pacsbridge", now=NOW)

    assert first.serial_number != second.serial_number
    assert first.serial_number > 0


def test_self_sign_alt_names_dns_and_ip(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(
        ec_key, "us-cart-3", alt_names=["us-cart-3.radiology.test", "10.20.30.40", "::1", "10.20.30.40"], now=NOW
    )

    alt_names = extension_value(certificate, x509.SubjectAlternativeName)
    assert alt_names.get_values_for_type(x509.DNSName) == ["us-cart-3.radiology.test"]
    assert alt_names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.20.30.40"),
        ipaddress.ip_address("::1"),
    ]


def test_self_sign_ip_common_name(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "192.0.2.7", now=NOW)

    alt_names = extension_value(certificate, x509.SubjectAlternativeName)
    assert alt_names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_self_sign_wildcard_alt_name(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", alt_names=["*.radiology.test"], now=NOW)

    alt_names = extension_value(certificate, x509.SubjectAlternativeName)
    assert alt_names.get_values_for_type(x509.DNSName) == ["*.radiology.test"]


@pytest.mark.parametrize(
    ("common_name", "alt_names", "expected"),
    [
        ("", None, "common name is empty"),
        ("x" * 65, None, "more than the X.509 maximum of 64"),
        ("bad\nname", ["ok.test"], "control characters"),
        ("Ultrasound cart 3", None, "cannot be the default subjectAltName"),
        ("pacsbridge", ["under_score.test"], "neither an IP address nor a valid DNS name"),
        ("pacsbridge", ["-leading.test"], "neither an IP address nor a valid DNS name"),
        ("pacsbridge", ["trailing.dot."], "neither an IP address nor a valid DNS name"),
        ("pacsbridge", ["zürich.test"], "neither an IP address nor a valid DNS name"),
        ("pacsbridge", ["*.test"], "neither an IP address nor a valid DNS name"),
        ("pacsbridge", ["fe80::1%eth0"], "zone index"),
    ],
)
def test_self_sign_rejects_invalid_names(
    ec_key: ec.EllipticCurvePrivateKey, common_name: str, alt_names: list[str] | None, expected: str
) -> None:
    with pytest.raises(CertificateError, match=expected) as raised:
        self_sign(ec_key, common_name, alt_names=alt_names, now=NOW)

    assert raised.value.fix


@pytest.mark.parametrize("days", [0, -5])
def test_self_sign_rejects_nonpositive_days(ec_key: ec.EllipticCurvePrivateKey, days: int) -> None:
    with pytest.raises(CertificateError, match="not positive"):
        self_sign(ec_key, "pacsbridge", days=days, now=NOW)


def test_self_sign_rejects_days_past_9999(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(CertificateError, match="after the year 9999"):
        self_sign(ec_key, "pacsbridge", days=3_000_000, now=NOW)


def test_self_sign_rejects_ed25519_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()

    with pytest.raises(CertificateError, match="Ed25519PrivateKey keys are not supported"):
        self_sign(key, "pacsbridge")  # type: ignore[arg-type]


def test_parse_alt_name_kinds() -> None:
    assert parse_alt_name("PACS.Hospital.Test") == x509.DNSName("pacs.hospital.test")
    assert parse_alt_name(" 127.0.0.1 ") == x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    assert parse_alt_name("xn--zrich-kva.test") == x509.DNSName("xn--zrich-kva.test")


@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_build_csr_contents(key_fixture: str, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(key_fixture)
    csr = build_csr(key, "pacsbridge.test", alt_names=["pacsbridge.test", "127.0.0.1"])

    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=pacsbridge.test"
    alt_names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt_names.get_values_for_type(x509.DNSName) == ["pacsbridge.test"]
    assert alt_names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    extended_key_usage = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in list(extended_key_usage)
    public_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*public_format) == key.public_key().public_bytes(*public_format)


def test_build_csr_default_alt_name(ec_key: ec.EllipticCurvePrivateKey) -> None:
    csr = build_csr(ec_key, "pacsbridge")

    alt_names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt_names.get_values_for_type(x509.DNSName) == ["pacsbridge"]


# Loading keys and writing files


@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_private_key_pem_round_trip(key_fixture: str, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(key_fixture)
    pem = private_key_pem(key)

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_private_key_pem(pem).private_numbers() == key.private_numbers()


def test_load_private_key_rejects_encrypted_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )

    with pytest.raises(CertificateError, match="encrypted private key"):
        load_private_key_pem(pem)


def test_load_private_key_rejects_certificate(certificate: x509.Certificate) -> None:
    with pytest.raises(CertificateError, match="contains no PEM private key"):
        load_private_key_pem(certificate_pem(certificate))


def test_write_output_file_modes(tmp_path: Path) -> None:
    private_path = tmp_path / "key.pem"
    public_path = tmp_path / "cert.pem"

    write_output_file(private_path, b"private", mode=0o600)
    write_output_file(public_path, b"public")

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert private_path.read_bytes() == b"private"


def test_write_output_file_keeps_existing(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")

    with pytest.raises(FileExistsError):
        write_output_file(path, b"new", mode=0o600)

    assert path.read_bytes() == b"old"


def test_write_output_file_overwrite_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    os.chmod(path, 0o666)

    write_output_file(path, b"new", mode=0o600, overwrite=True)

    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["key.pem"]


def test_write_output_file_rejects_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "key.pem"
    link.symlink_to(target)

    with pytest.raises(FileExistsError):
        write_output_file(link, b"secret", mode=0o600)

    assert not target.exists()


# PKCS#12


@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_write_pkcs12_round_trip(key_fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    key = request.getfixturevalue(key_fixture)
    certificate = self_sign(key, "pacsbridge.test", now=NOW)
    path = tmp_path / "bundle.pfx"

    write_pkcs12(path, key, certificate, b"correct horse")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bundle = pkcs12.load_pkcs12(path.read_bytes(), b"correct horse")
    assert bundle.key is not None
    assert bundle.key.private_numbers() == key.private_numbers()
    assert bundle.cert is not None
    assert bundle.cert.certificate == certificate
    assert bundle.cert.friendly_name == b"pacsbridge.test"


def test_write_pkcs12_friendly_name(ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW)
    path = tmp_path / "bundle.pfx"

    write_pkcs12(path, ec_key, certificate, b"pw", friendly_name="Ultrasound cart 3")

    bundle = pkcs12.load_pkcs12(path.read_bytes(), b"pw")
    assert bundle.cert is not None
    assert bundle.cert.friendly_name == b"Ultrasound cart 3"


def test_write_pkcs12_wrong_password_fails(ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW)
    path = tmp_path / "bundle.pfx"
    write_pkcs12(path, ec_key, certificate, b"right")

    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(path.read_bytes(), b"wrong")


def test_write_pkcs12_rejects_empty_password(ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW)

    with pytest.raises(CertificateError, match="password is empty"):
        write_pkcs12(tmp_path / "bundle.pfx", ec_key, certificate, b"")

    assert not (tmp_path / "bundle.pfx").exists()


def test_write_pkcs12_rejects_foreign_key(
    ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW)

    with pytest.raises(CertificateError, match="does not belong to the certificate"):
        write_pkcs12(tmp_path / "bundle.pfx", rsa_key, certificate, b"pw")


# Upload parsing


def test_upload_pem(certificate: x509.Certificate) -> None:
    upload = parse_certificate_upload(certificate_pem(certificate))

    assert upload.certificates == (certificate,)
    assert upload.source_format == "pem"
    assert upload.converted_from_der is False
    assert upload.pem == certificate_pem(certificate).decode("ascii")


def test_upload_chain_pem() -> None:
    leaf, ca = make_chain()
    data = b"subject=CN = pacs.hospital.test\n" + certificate_pem(leaf) + b"\n" + certificate_pem(ca)

    upload = parse_certificate_upload(data)

    assert upload.certificates == (leaf, ca)
    assert upload.pem.count("-----BEGIN CERTIFICATE-----") == 2


def test_upload_der_is_converted(certificate: x509.Certificate) -> None:
    der = certificate.public_bytes(serialization.Encoding.DER)

    upload = parse_certificate_upload(der)

    assert upload.certificates == (certificate,)
    assert upload.source_format == "der"
    assert upload.converted_from_der is True
    assert upload.pem.startswith("-----BEGIN CERTIFICATE-----\n")


def test_upload_base64_without_header(certificate: x509.Certificate) -> None:
    encoded = base64.encodebytes(certificate.public_bytes(serialization.Encoding.DER))

    upload = parse_certificate_upload(encoded)

    assert upload.certificates == (certificate,)
    assert upload.source_format == "base64"
    assert upload.pem == certificate_pem(certificate).decode("ascii")


def test_upload_base64_single_line(certificate: x509.Certificate) -> None:
    encoded = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER))

    upload = parse_certificate_upload(encoded + b"\r\n")

    assert upload.certificates == (certificate,)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda pem: pem.replace(b"\n", b""), id="no-line-breaks"),
        pytest.param(lambda pem: pem.replace(b"\n", b" "), id="spaces"),
        pytest.param(lambda pem: pem.replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(lambda pem: pem.replace(b"\n", b"\\n"), id="escaped-json"),
        pytest.param(lambda pem: b"\xef\xbb\xbf" + pem, id="utf8-bom"),
        pytest.param(lambda pem: pem.decode("ascii").encode("utf-16"), id="utf16"),
    ],
)
def test_upload_pem_with_broken_layout(certificate: x509.Certificate, mangle: Callable[[bytes], bytes]) -> None:
    upload = parse_certificate_upload(mangle(certificate_pem(certificate)))

    assert upload.certificates == (certificate,)
    assert upload.source_format == "pem"


@pytest.mark.parametrize(
    "key_format",
    [
        pytest.param(serialization.PrivateFormat.PKCS8, id="pkcs8"),
        pytest.param(serialization.PrivateFormat.TraditionalOpenSSL, id="traditional"),
    ],
)
@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_upload_rejects_pem_private_key(
    key_fixture: str, key_format: serialization.PrivateFormat, request: pytest.FixtureRequest
) -> None:
    key = request.getfixturevalue(key_fixture)
    pem = key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption())
    key_body = pem.decode("ascii").splitlines()[1]

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(pem)

    message = str(raised.value)
    assert "private key" in message
    assert "must stay on the hospital side" in message
    assert key_body not in message
    assert key_body[:16] not in message
    assert raised.value.__cause__ is None


def test_upload_rejects_key_with_certificate(certificate: x509.Certificate, ec_key: ec.EllipticCurvePrivateKey) -> None:
    data = certificate_pem(certificate) + private_key_pem(ec_key)

    with pytest.raises(CertificateError, match="must stay on the hospital side"):
        parse_certificate_upload(data)


def test_upload_rejects_encrypted_pem_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )

    with pytest.raises(CertificateError, match="must stay on the hospital side"):
        parse_certificate_upload(pem)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("key_fixture", ["rsa_key", "ec_key"])
def test_upload_rejects_der_private_key(key_fixture: str, encrypted: bool, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(key_fixture)
    encryption = serialization.BestAvailableEncryption(b"pw") if encrypted else serialization.NoEncryption()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, encryption)

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(der)

    assert "must stay on the hospital side" in str(raised.value)
    assert base64.b64encode(der)[:16].decode("ascii") not in str(raised.value)


def test_upload_rejects_base64_private_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    der = ec_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encoded = base64.b64encode(der)

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(encoded)

    assert "must stay on the hospital side" in str(raised.value)
    assert encoded[:16].decode("ascii") not in str(raised.value)


@pytest.mark.parametrize("password", [b"pw", None], ids=["encrypted", "unencrypted"])
def test_upload_rejects_pkcs12(
    certificate: x509.Certificate, ec_key: ec.EllipticCurvePrivateKey, password: bytes | None
) -> None:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pfx = pkcs12.serialize_key_and_certificates(b"pacs", ec_key, certificate, None, encryption)

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(pfx)

    assert "PKCS#12" in str(raised.value)
    assert "must stay on the hospital side" in str(raised.value)


def test_upload_rejects_csr(ec_key: ec.EllipticCurvePrivateKey) -> None:
    csr = build_csr(ec_key, "pacsbridge")

    with pytest.raises(CertificateError, match="certificate signing request"):
        parse_certificate_upload(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateError, match="certificate signing request"):
        parse_certificate_upload(csr.public_bytes(serialization.Encoding.DER))


def test_upload_rejects_pkcs7(certificate: x509.Certificate) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs7

    der = pkcs7.serialize_certificates([certificate], serialization.Encoding.DER)
    pem = pkcs7.serialize_certificates([certificate], serialization.Encoding.PEM)

    with pytest.raises(CertificateError, match="PKCS#7"):
        parse_certificate_upload(der)
    with pytest.raises(CertificateError, match="PKCS#7"):
        parse_certificate_upload(pem)


def test_upload_rejects_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    with pytest.raises(CertificateError, match="PEM block of type 'PUBLIC KEY', which is not a certificate"):
        parse_certificate_upload(pem)


def test_upload_rejects_random_bytes() -> None:
    data = bytes(range(256)) * 4

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(data)

    assert raised.value.reason == "is not a certificate (neither PEM text nor DER)"
    assert "PEM, Base64 .cer or DER" in raised.value.fix


def test_upload_rejects_random_bytes_from_urandom() -> None:
    with pytest.raises(CertificateError, match="not a certificate"):
        parse_certificate_upload(b"\x80" + os.urandom(600))


def test_upload_rejects_other_asn1() -> None:
    # A DER SEQUENCE holding one INTEGER: well-formed ASN.1, but no certificate.
    with pytest.raises(CertificateError, match="is ASN.1 DER but not an X.509 certificate"):
        parse_certificate_upload(b"\x30\x03\x02\x01\x05")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "is empty"),
        (b"  \r\n\t", "is empty"),
        (b"hello, this is my certificate", "is not a certificate: no PEM block and not Base64"),
        (b"hello world", "is not a certificate: no PEM block and not Base64"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "without a matching '-----END CERTIFICATE-----' line"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB*!\n-----END CERTIFICATE-----\n", "not valid Base64"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is not a certificate"),
        (b"-----BEGIN something odd", "no complete '-----BEGIN CERTIFICATE-----' line"),
        (b"QUJD", "is not a certificate: the Base64 data is not DER"),
    ],
)
def test_upload_rejects_bad_text(data: bytes, expected: str) -> None:
    with pytest.raises(CertificateError, match=expected):
        parse_certificate_upload(data)


def test_upload_rejects_oversized_data() -> None:
    with pytest.raises(CertificateError, match="more than the 1048576 bytes"):
        parse_certificate_upload(b"A" * (MAX_UPLOAD_BYTES + 1))


def test_upload_names_bad_block_in_chain(certificate: x509.Certificate) -> None:
    data = certificate_pem(certificate) + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"

    with pytest.raises(CertificateError, match="PEM certificate 2"):
        parse_certificate_upload(data)


# Certificate details


def test_describe_self_signed(certificate: x509.Certificate) -> None:
    info = describe_certificate(certificate, now=NOW + dt.timedelta(days=1))

    assert info.subject == "CN=pacs.hospital.test"
    assert info.issuer == "CN=pacs.hospital.test"
    assert info.not_after == NOW + dt.timedelta(days=3650)
    assert info.not_before.tzinfo is not None
    assert info.key_type == "EC"
    assert info.key_size == 256
    assert info.key_curve == "secp256r1"
    assert info.subject_alt_names == ("DNS:pacs.hospital.test",)
    assert info.self_signed is True
    assert info.is_ca is False
    assert info.expired is False
    assert info.expires_soon is False
    assert info.days_left == 3649
    assert int(info.serial_number_hex, 16) == certificate.serial_number


def test_describe_fingerprint_forms(certificate: x509.Certificate) -> None:
    info = describe_certificate(certificate, now=NOW)
    expected = certificate.fingerprint(hashes.SHA256()).hex()

    assert info.sha256_fingerprint == expected
    assert len(info.sha256_fingerprint) == 64
    assert info.sha256_fingerprint == info.sha256_fingerprint.lower()
    assert info.sha256_fingerprint_colons == ":".join(expected[i : i + 2] for i in range(0, 64, 2)).upper()


def test_describe_rsa_key(rsa_key: rsa.RSAPrivateKey) -> None:
    info = describe_certificate(self_sign(rsa_key, "pacsbridge", now=NOW), now=NOW)

    assert info.key_type == "RSA"
    assert info.key_size == 2048
    assert info.key_curve is None


def test_describe_chain_members() -> None:
    leaf, ca = make_chain()

    leaf_info = describe_certificate(leaf, now=NOW)
    ca_info = describe_certificate(ca, now=NOW)

    assert leaf_info.self_signed is False
    assert leaf_info.is_ca is False
    assert leaf_info.issuer == "CN=Hospital Test CA"
    assert leaf_info.subject_alt_names == ()
    assert ca_info.self_signed is True
    assert ca_info.is_ca is True


def test_describe_expired_certificate(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "old.pacs.test", days=365, now=NOW - dt.timedelta(days=400))

    info = describe_certificate(certificate, now=NOW)

    assert info.expired is True
    assert info.expires_soon is False
    assert info.days_left < 0
    assert info.as_dict()["expired"] is True


def test_describe_expiring_in_ten_days(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "soon.pacs.test", days=365, now=NOW - dt.timedelta(days=355))

    info = describe_certificate(certificate, now=NOW)

    assert info.expired is False
    assert info.expires_soon is True
    assert info.days_left == 10


def test_describe_expiry_boundary(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", days=31, now=NOW)

    assert describe_certificate(certificate, now=NOW).expires_soon is False
    assert describe_certificate(certificate, now=NOW + dt.timedelta(days=1)).expires_soon is True


def test_describe_not_yet_valid(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", now=NOW + dt.timedelta(days=2))

    info = describe_certificate(certificate, now=NOW)

    assert info.not_yet_valid is True
    assert info.expired is False


def test_describe_rejects_naive_now(certificate: x509.Certificate) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        describe_certificate(certificate, now=dt.datetime(2026, 1, 1))


def test_describe_as_dict_is_json_ready(certificate: x509.Certificate) -> None:
    data = describe_certificate(certificate, now=NOW).as_dict()

    assert data["not_after"] == "2036-02-27T12:00:00+00:00"
    assert data["subject_alt_names"] == ["DNS:pacs.hospital.test"]
    assert set(data) >= {"subject", "issuer", "not_before", "sha256_fingerprint", "serial_number_hex", "is_ca"}


def test_sha256_fingerprint_of_der(certificate: x509.Certificate) -> None:
    der = certificate.public_bytes(serialization.Encoding.DER)

    assert sha256_fingerprint(der) == sha256_fingerprint(certificate)
    assert sha256_fingerprint(certificate) == certificate.fingerprint(hashes.SHA256()).hex()


def test_colon_fingerprint_format() -> None:
    assert colon_fingerprint("0a1b2c") == "0A:1B:2C"


def test_days_left_rounds_partial_day_up(ec_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = self_sign(ec_key, "pacsbridge", days=10, now=NOW)

    assert describe_certificate(certificate, now=NOW + dt.timedelta(minutes=1)).days_left == 10
    assert describe_certificate(certificate, now=NOW + dt.timedelta(days=9, hours=23)).days_left == 1
    assert describe_certificate(certificate, now=NOW + dt.timedelta(days=10)).days_left == 0
    assert describe_certificate(certificate, now=NOW + dt.timedelta(days=10, minutes=1)).days_left == -1


def test_upload_skips_key_when_asked(certificate: x509.Certificate, ec_key: ec.EllipticCurvePrivateKey) -> None:
    data = private_key_pem(ec_key) + certificate_pem(certificate)

    upload = parse_certificate_upload(data, skip_private_keys=True)

    assert upload.certificates == (certificate,)
    assert upload.skipped_private_key is True
    assert "PRIVATE KEY" not in upload.pem


def test_upload_skip_keys_plain_certificate(certificate: x509.Certificate) -> None:
    upload = parse_certificate_upload(certificate_pem(certificate), skip_private_keys=True)

    assert upload.skipped_private_key is False


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER], ids=["pem", "der"])
def test_upload_skip_keys_key_only(ec_key: ec.EllipticCurvePrivateKey, encoding: serialization.Encoding) -> None:
    data = ec_key.private_bytes(encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    with pytest.raises(CertificateError) as raised:
        parse_certificate_upload(data, skip_private_keys=True)

    assert raised.value.reason == KEY_WITHOUT_CERTIFICATE
    assert "hospital side" not in str(raised.value)


def test_upload_skip_keys_unterminated_key(certificate: x509.Certificate) -> None:
    data = certificate_pem(certificate) + b"-----BEGIN PRIVATE KEY-----\nMIGH\n"

    with pytest.raises(CertificateError, match="private key block without a matching END line"):
        parse_certificate_upload(data, skip_private_keys=True)
