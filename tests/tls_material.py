"""Keys and certificates made on the fly for TLS tests, written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Identity:
    key: Path
    cert: Path

    @property
    def pem(self) -> str:
        return self.cert.read_text()

    @property
    def fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


def make_identity(
    folder: Path,
    name: str,
    *,
    common_name: str = "localhost",
    valid_days: int = 365,
    starts_days_ago: int = 1,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    is_ca: bool = False,
) -> Identity:
    """Write `<name>.key` and `<name>.pem`: self-signed unless `issuer` (key, certificate) is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=starts_days_ago))
        .not_valid_after(now - datetime.timedelta(days=starts_days_ago) + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    key_path = folder / f"{name}.key"
    cert_path = folder / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key_path, cert_path)


def load_signer(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    return key, cert  # type: ignore[return-value]
