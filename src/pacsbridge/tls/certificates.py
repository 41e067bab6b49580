"""Create keys and self-signed certificates for DICOM-TLS, and check certificates that admins upload.

pacsbridge presents one self-signed certificate as its TLS server and client
certificate. The hospital imports that same certificate into its PACS as the
only trust anchor for pacsbridge, so no certificate authority is involved.

Certificates that admins upload (the PACS certificate, or its chain) arrive in
many forms: PEM, PEM with broken line breaks, Base64 .cer without the BEGIN and
END lines, or binary DER. `parse_certificate_upload` accepts all of them and
rejects anything else, in particular a private key sent by mistake, with a
`CertificateError` that names the problem and the fix.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import ec as elliptic_curve
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.hazmat.primitives.serialization.pkcs12 import PBES
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | elliptic_curve.EllipticCurvePrivateKey

RSA_KEY_SIZE = 2048
RSA_PUBLIC_EXPONENT = 65537
DEFAULT_VALIDITY_DAYS = 3650
EXPIRY_WARNING_DAYS = 30
# The validity starts this much before now, so that a peer whose clock runs
# behind ours does not reject a new certificate as not yet valid.
BACKDATE = dt.timedelta(hours=1)
# ub-common-name in RFC 5280, appendix A.
MAX_COMMON_NAME_LENGTH = 64
# The latest time that X.509 GeneralizedTime can express.
LATEST_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
# An estimate: a PEM chain of ten RSA 4096 certificates is about 20 KiB, so a larger file is not a certificate upload.
MAX_UPLOAD_BYTES = 1024 * 1024
# PBKDF2-HMAC-SHA256 iterations for PKCS#12 files, as the OWASP Password
# Storage Cheat Sheet (2023) recommends for that function.
PKCS12_KDF_ROUNDS = 600_000

_CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")
_PEM_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_PRIVATE_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY")
# A whole private key block, such as the key in a combined HAProxy PEM file.
_PEM_PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?-----END \1-----", re.DOTALL)
# Whitespace and the escaped line breaks of text copied out of JSON or YAML,
# none of which can occur in Base64 data.
_BASE64_NOISE = re.compile(r"\s+|\\r|\\n")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# C0 controls and DEL, except tab, line feed, vertical tab, form feed and carriage return.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

_OID_PKCS7_DATA = x509.ObjectIdentifier("1.2.840.113549.1.7.1")
_OID_PKCS7_SIGNED_DATA = x509.ObjectIdentifier("1.2.840.113549.1.7.2")

_KEY_STAYS_WITH_HOSPITAL = "contains a private key, which must stay on the hospital side and was not stored"
# The reason of the CertificateError for a private key without a certificate, with `skip_private_keys`.
KEY_WITHOUT_CERTIFICATE = "contains a private key but no certificate"
_GIVE_CERTIFICATE_FILE = "Give a certificate file (PEM, Base64 .cer or DER)"
_USE_ONLY_CERTIFICATE = (
    "Use only the certificate: the .cer file, or the PEM block that starts with '-----BEGIN CERTIFICATE-----'"
)
_GIVE_ACCEPTED_FORMAT = "Give the certificate as PEM, Base64 .cer or DER (binary .cer/.crt)"


class CertificateError(ValueError):
    """Raised for an invalid key, certificate, name or upload.

    `reason` is what is wrong and `fix` the next step for the user. The
    message joins both as sentences and never contains key material.
    """

    def __init__(self, reason: str, fix: str) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. {fix}.")


# Keys, certificate signing requests and self-signed certificates


def generate_private_key(ec: bool = False) -> PrivateKey:
    """Generate an RSA 2048-bit key, or with `ec` an EC key on curve P-256."""
    if ec:
        return elliptic_curve.generate_private_key(elliptic_curve.SECP256R1())
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)


def build_csr(
    key: PrivateKey, common_name: str, *, alt_names: list[str] | None = None
) -> x509.CertificateSigningRequest:
    """Build a CSR that requests the extensions that `self_sign` sets, signed with SHA-256.

    `alt_names` are DNS names or IP addresses for the subjectAltName. Without
    them the common name becomes the only subjectAltName entry.
    """
    _require_supported_key(key)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(common_name))
    for extension, critical in _leaf_extensions(key, common_name, alt_names):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


def self_sign(
    key: PrivateKey,
    common_name: str,
    *,
    days: int = DEFAULT_VALIDITY_DAYS,
    alt_names: list[str] | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Create a self-signed certificate for `key`, valid for `days` days from `now`, signed with SHA-256.

    The certificate has basicConstraints CA:FALSE. The PACS uses it as a trust
    anchor, and RFC 5280 path validation (section 6.1) takes a trust anchor
    as given without checking its CA flag. Python's ssl module on OpenSSL 3.0
    accepts it as the only trust anchor when nginx, HAProxy or stunnel
    presents it (tests/test_certs_tls_servers.py checks this).
    CA:TRUE would let anyone who obtains the key issue certificates for other
    names that the PACS would then trust.

    keyUsage is digitalSignature and, for RSA, keyEncipherment (used by TLS 1.2
    RSA key exchange). extendedKeyUsage is serverAuth and clientAuth, because
    pacsbridge is the TLS client of a C-STORE and may also accept associations.
    """
    _require_supported_key(key)
    if days < 1:
        raise CertificateError(f"validity of {days} days is not positive", "Give a number of days of 1 or more")
    start = now or dt.datetime.now(dt.UTC)
    not_before = start - BACKDATE
    if days > (LATEST_NOT_AFTER - start).days:
        raise CertificateError(
            f"validity of {days} days ends after the year 9999, which X.509 cannot express",
            f"Give at most {(LATEST_NOT_AFTER - start).days} days",
        )
    not_after = start + dt.timedelta(days=days)

    subject = _subject(common_name)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in _leaf_extensions(key, common_name, alt_names):
        builder = builder.add_extension(extension, critical=critical)
    subject_key_identifier = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = builder.add_extension(subject_key_identifier, critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_identifier), critical=False
    )
    return builder.sign(key, hashes.SHA256())


def parse_alt_name(value: str) -> x509.GeneralName:
    """Parse one subjectAltName entry: an IPv4 or IPv6 address, else a DNS name.

    DNS names must be ASCII (IDNA A-labels for international names), and only
    the first label may be the wildcard '*'.
    """
    text = value.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise CertificateError(
                f"IPv6 address {value!r} has a zone index, which a certificate cannot contain",
                "Give the address without the '%' part",
            )
        return x509.IPAddress(address)
    if not _is_dns_name(text):
        raise CertificateError(
            f"subjectAltName {value!r} is neither an IP address nor a valid DNS name",
            "Give a host name such as pacs.hospital.example (ASCII letters, digits, hyphens and dots) "
            "or an IPv4/IPv6 address",
        )
    return x509.DNSName(text.lower())


def _is_dns_name(text: str) -> bool:
    if not text or len(text) > 253 or not text.isascii():
        return False
    labels = text.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    return all(_DNS_LABEL.fullmatch(label) for label in labels)


def _require_supported_key(key: object) -> PrivateKey:
    if not isinstance(key, (rsa.RSAPrivateKey, elliptic_curve.EllipticCurvePrivateKey)):
        raise CertificateError(
            f"{type(key).__name__} keys are not supported",
            "Use an RSA or EC key, such as one from generate_private_key",
        )
    return key


def _subject(common_name: str) -> x509.Name:
    name = common_name.strip()
    if not name:
        raise CertificateError("common name is empty", "Give a common name such as the host name of this computer")
    if len(name) > MAX_COMMON_NAME_LENGTH:
        raise CertificateError(
            f"common name {common_name!r} has {len(name)} characters, more than the X.509 maximum "
            f"of {MAX_COMMON_NAME_LENGTH}",
            "Give a shorter common name and put long host names in the subjectAltName",
        )
    if any(not character.isprintable() for character in name):
        raise CertificateError(
            f"common name {common_name!r} contains control characters", "Give a common name of printable characters"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _alt_names(common_name: str, alt_names: list[str] | None) -> x509.SubjectAlternativeName:
    if alt_names:
        entries: list[x509.GeneralName] = []
        for value in alt_names:
            entry = parse_alt_name(value)
            if entry not in entries:
                entries.append(entry)
        return x509.SubjectAlternativeName(entries)
    try:
        return x509.SubjectAlternativeName([parse_alt_name(common_name)])
    except CertificateError:
        raise CertificateError(
            f"common name {common_name!r} is not a host name or IP address, so it cannot be the default subjectAltName",
            "Give the host names and IP addresses of this computer as alt names (--san)",
        ) from None


def _leaf_extensions(
    key: PrivateKey, common_name: str, alt_names: list[str] | None
) -> list[tuple[x509.ExtensionType, bool]]:
    """Return the extensions of an end-entity certificate with their critical flags."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    extended_key_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage, True),
        (extended_key_usage, False),
        (_alt_names(common_name, alt_names), False),
    ]


# Encoding, loading and writing


def private_key_pem(key: PrivateKey) -> bytes:
    """Encode `key` as unencrypted PKCS#8 PEM, the form nginx, HAProxy and stunnel read without a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted RSA or EC private key from PEM (PKCS#8, PKCS#1 or SEC 1).

    Error messages never contain the key data.
    """
    if b"PRIVATE KEY-----" not in data:
        raise CertificateError(
            "contains no PEM private key", "Give the key file that 'pacsbridge certs key' or 'certs create' wrote"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            "contains an encrypted private key",
            "Give an unencrypted key, for example from 'openssl pkey -in KEY -out key.pem'",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            "contains a private key that cannot be read (damaged, or of an unsupported type)",
            "Give an RSA or EC key in PEM form",
        ) from None
    return _require_supported_key(key)


def check_key_matches_certificate(key: PrivateKey, certificate: x509.Certificate) -> None:
    """Raise CertificateError unless `certificate` contains the public key of `key`."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise CertificateError(
            "private key does not belong to the certificate",
            "Give the key that the certificate was created for",
        )


def write_output_file(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = False) -> None:
    """Write `data` to a new file with permission bits `mode`.

    Without `overwrite`, an existing file raises FileExistsError. With it, the
    new content goes to a temporary file that then replaces `path`, so a
    private key never sits in a file with wider permissions, not even briefly.
    """
    if not overwrite:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        return
    # mkstemp creates the file with mode 0600.
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def build_pkcs12(
    key: PrivateKey, certificate: x509.Certificate, password: bytes, *, friendly_name: str | None = None
) -> bytes:
    """Encode key and certificate as PKCS#12, encrypted with AES-256-CBC and a PBKDF2-SHA256 key, MAC SHA-256.

    `friendly_name` defaults to the certificate's common name.
    NOTE: import into Windows was not tested, and older Windows releases may
    reject PKCS#12 files with AES encryption.
    """
    if not password:
        raise CertificateError("PKCS#12 password is empty", "Give a non-empty password")
    check_key_matches_certificate(key, certificate)
    if friendly_name is None:
        friendly_name = _common_name(certificate) or "pacsbridge"
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(PKCS12_KDF_ROUNDS)
        .key_cert_algorithm(PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(friendly_name.encode("utf-8"), key, certificate, None, encryption)


def write_pkcs12(
    path: Path | str,
    key: PrivateKey,
    cert: x509.Certificate,
    password: bytes,
    *,
    friendly_name: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write `key` and `cert` as a password-protected PKCS#12 file with mode 0600 (see `build_pkcs12`)."""
    data = build_pkcs12(key, cert, password, friendly_name=friendly_name)
    write_output_file(Path(path), data, mode=0o600, overwrite=overwrite)


# Certificate uploads


@dataclass(frozen=True)
class CertificateUpload:
    """Certificates read from an upload, with the PEM text to store.

    `source_format` is "pem", "base64" (Base64 DER without BEGIN/END lines)
    or "der". `converted_from_der` is true for binary DER, which `pem` then
    contains re-encoded. `skipped_private_key` is true when the PEM text also
    contained a private key that `skip_private_keys` left out.
    """

    certificates: tuple[x509.Certificate, ...]
    pem: str
    source_format: str
    converted_from_der: bool
    skipped_private_key: bool = False


def parse_certificate_upload(data: bytes, *, skip_private_keys: bool = False) -> CertificateUpload:
    """Parse one certificate or a chain from PEM, Base64 .cer or DER bytes.

    Raises CertificateError for anything else. A private key or PKCS#12 file
    is rejected as such, even when it comes with certificates, and its content
    never appears in the message. With `skip_private_keys`, PEM private key
    blocks are left out instead, as in a combined certificate and key file,
    and a key without a certificate raises CertificateError with the reason
    KEY_WITHOUT_CERTIFICATE.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise CertificateError(
            f"is {len(data)} bytes, more than the {MAX_UPLOAD_BYTES} bytes a certificate chain can need",
            _GIVE_ACCEPTED_FORMAT,
        )
    text = _decode_text(data)
    if text is None:
        certificate = _load_der_certificate(data, source="DER", skip_private_keys=skip_private_keys)
        return _make_upload([certificate], source_format="der", converted_from_der=True)

    skipped_private_key = False
    if _PEM_PRIVATE_KEY_BEGIN.search(text):
        if not skip_private_keys:
            raise CertificateError(_KEY_STAYS_WITH_HOSPITAL, _USE_ONLY_CERTIFICATE)
        text = _PEM_PRIVATE_KEY_BLOCK.sub("", text)
        skipped_private_key = True
        if _PEM_PRIVATE_KEY_BEGIN.search(text):
            # A key block without its END line is left over.
            raise CertificateError(
                "contains a private key block without a matching END line",
                "Give the whole file, including the END line",
            )
        if "-----BEGIN" not in text:
            raise CertificateError(KEY_WITHOUT_CERTIFICATE, _GIVE_CERTIFICATE_FILE)
    if "-----BEGIN" in text:
        return _make_upload(
            _load_pem_certificates(text),
            source_format="pem",
            converted_from_der=False,
            skipped_private_key=skipped_private_key,
        )

    compact = _BASE64_NOISE.sub("", text)
    if not compact:
        raise CertificateError("is empty", _GIVE_ACCEPTED_FORMAT)
    not_base64 = CertificateError("is not a certificate: no PEM block and not Base64", _GIVE_ACCEPTED_FORMAT)
    if not _BASE64_TEXT.fullmatch(compact):
        raise not_base64
    try:
        der = base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise not_base64 from None
    certificate = _load_der_certificate(der, source="Base64", skip_private_keys=skip_private_keys)
    return _make_upload([certificate], source_format="base64", converted_from_der=False)


def _make_upload(
    certificates: list[x509.Certificate],
    *,
    source_format: str,
    converted_from_der: bool,
    skipped_private_key: bool = False,
) -> CertificateUpload:
    pem = "".join(certificate_pem(certificate).decode("ascii") for certificate in certificates)
    return CertificateUpload(tuple(certificates), pem, source_format, converted_from_der, skipped_private_key)


def _decode_text(data: bytes) -> str | None:
    """Decode `data` as UTF-8 or BOM-marked UTF-16 text, or return None for binary data.

    Text with control characters other than whitespace counts as binary.
    A DER certificate never passes as text, because it is longer than 127
    bytes, so its second byte is a length byte of 0x81 or more, which is not
    valid UTF-8 after the leading 0x30.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None
    if _CONTROL_CHARACTER.search(text):
        return None
    return text


def _load_pem_certificates(text: str) -> list[x509.Certificate]:
    certificates: list[x509.Certificate] = []
    position = 0
    while (begin := _PEM_BEGIN.search(text, position)) is not None:
        label = begin.group(1)
        end_line = f"-----END {label}-----"
        end = text.find(end_line, begin.end())
        if end < 0 or "-----BEGIN" in text[begin.end() : end]:
            raise CertificateError(
                f"has a '-----BEGIN {label}-----' line without a matching '{end_line}' line",
                "Give the whole file, including the END line",
            )
        _check_pem_label(label)
        number = len(certificates) + 1
        der = _decode_base64(_BASE64_NOISE.sub("", text[begin.end() : end]), source=f"PEM certificate {number}")
        certificates.append(_load_der_certificate(der, source=f"PEM certificate {number}"))
        position = end + len(end_line)
    if not certificates:
        raise CertificateError(
            "contains '-----BEGIN' but no complete '-----BEGIN CERTIFICATE-----' line", _GIVE_ACCEPTED_FORMAT
        )
    return certificates


def _check_pem_label(label: str) -> None:
    if label in _CERTIFICATE_LABELS:
        return
    if label in ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"):
        raise CertificateError(
            "contains a certificate signing request (CSR), not a certificate",
            "Give the certificate that the certificate authority issued for it",
        )
    if label in ("PKCS7", "CMS"):
        raise CertificateError(
            "contains a PKCS#7 bundle (.p7b), not a certificate",
            "Export the certificates as Base64 .cer or PEM, for example with "
            "'openssl pkcs7 -print_certs -in FILE -out chain.pem'",
        )
    raise CertificateError(f"contains a PEM block of type {label!r}, which is not a certificate", _GIVE_ACCEPTED_FORMAT)


def _decode_base64(text: str, *, source: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise CertificateError(
            f"is not a valid certificate: {source} is not valid Base64 ({exc})",
            "Give the file as exported, without edits",
        ) from None


def _load_der_certificate(der: bytes, *, source: str, skip_private_keys: bool = False) -> x509.Certificate:
    """Load one DER certificate, or raise CertificateError that names what `der` is instead.

    With `skip_private_keys`, the errors for a private key or PKCS#12 file do
    not say that the file was rejected for storage.
    """
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        certificate_error = str(exc)
    kind = _identify_der(der)
    if kind == "private key":
        if skip_private_keys:
            raise CertificateError(KEY_WITHOUT_CERTIFICATE, _GIVE_CERTIFICATE_FILE)
        raise CertificateError(_KEY_STAYS_WITH_HOSPITAL, _USE_ONLY_CERTIFICATE)
    if kind == "PKCS#12" and skip_private_keys:
        raise CertificateError(
            "is a PKCS#12 file (.pfx/.p12) with a private key, not a certificate file",
            "Extract the certificates with 'openssl pkcs12 -in FILE -nokeys -out chain.pem' and give that file",
        )
    if kind == "PKCS#12":
        raise CertificateError(
            "is a PKCS#12 file (.pfx/.p12), which contains a private key that must stay on the hospital side "
            "and was not stored",
            "Export only the certificate (in Windows: 'No, do not export the private key', "
            "format Base64 .cer) and give that file",
        )
    if kind == "CSR":
        raise CertificateError(
            "is a certificate signing request (CSR), not a certificate",
            "Give the certificate that the certificate authority issued for it",
        )
    if kind == "PKCS#7":
        raise CertificateError(
            "is a PKCS#7 bundle (.p7b), not a certificate",
            "Export the certificates as Base64 .cer or PEM, for example with "
            "'openssl pkcs7 -inform DER -print_certs -in FILE -out chain.pem'",
        )
    if kind == "ASN.1":
        raise CertificateError(
            f"is not a valid certificate: {source} is ASN.1 DER but not an X.509 certificate ({certificate_error})",
            _GIVE_ACCEPTED_FORMAT,
        )
    if source == "DER":
        raise CertificateError("is not a certificate (neither PEM text nor DER)", _GIVE_ACCEPTED_FORMAT)
    raise CertificateError(
        f"is not a certificate: the {source} data is not DER", _GIVE_ACCEPTED_FORMAT
    )


def _identify_der(der: bytes) -> str:
    """Name the kind of a DER structure that is not a certificate.

    Returns "private key", "PKCS#12", "CSR", "PKCS#7", "ASN.1" for another
    DER SEQUENCE, or "unknown" when `der` is not one DER SEQUENCE.
    """
    try:
        serialization.load_der_private_key(der, password=None)
        return "private key"
    except TypeError:
        # Raised for an encrypted PKCS#8 key, because no password was given.
        return "private key"
    except UnsupportedAlgorithm:
        # A well-formed key of a type that this OpenSSL build cannot load.
        return "private key"
    except ValueError:
        pass
    try:
        x509.load_der_x509_csr(der)
        return "CSR"
    except ValueError:
        pass

    try:
        tag, start, end = _read_tlv(der, 0)
    except ValueError:
        return "unknown"
    if tag != 0x30 or end != len(der):
        return "unknown"
    children = _read_children(der, start, end)
    # PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo, macData OPTIONAL } (RFC 7292).
    if len(children) >= 2 and der[children[0][1] : children[0][2]] == b"\x03" and children[0][0] == 0x02:
        content_info = _read_children(der, children[1][1], children[1][2])
        if content_info and _object_identifier(der, content_info[0]) in (_OID_PKCS7_DATA, _OID_PKCS7_SIGNED_DATA):
            return "PKCS#12"
    # ContentInfo ::= SEQUENCE { contentType OID (signedData), content [0] } (RFC 5652).
    if children and _object_identifier(der, children[0]) == _OID_PKCS7_SIGNED_DATA:
        return "PKCS#7"
    return "ASN.1"


def _read_tlv(der: bytes, offset: int) -> tuple[int, int, int]:
    """Read the DER tag and length at `offset` and return (tag, content start, content end)."""
    if offset + 2 > len(der):
        raise ValueError("truncated DER header")
    tag = der[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used by the structures identified here")
    length = der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(der):
            raise ValueError("invalid DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("DER length beyond the data")
    return tag, start, end


def _read_children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """Return (tag, content start, content end) of each element inside a constructed DER value."""
    children = []
    offset = start
    while offset < end:
        try:
            child = _read_tlv(der, offset)
        except ValueError:
            return children
        if child[2] > end:
            return children
        children.append(child)
        offset = child[2]
    return children


def _object_identifier(der: bytes, element: tuple[int, int, int]) -> x509.ObjectIdentifier | None:
    tag, start, end = element
    if tag != 0x06 or end <= start:
        return None
    content = der[start:end]
    # The first byte encodes the first two arcs as 40 * first + second.
    first_arc = min(content[0] // 40, 2)
    arcs = [first_arc, content[0] - 40 * first_arc]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    try:
        return x509.ObjectIdentifier(".".join(str(arc) for arc in arcs))
    except ValueError:
        return None


# Certificate details


def sha256_fingerprint(cert_or_der: x509.Certificate | bytes) -> str:
    """Return the SHA-256 fingerprint of a certificate or its DER bytes as 64 lower-case hex digits."""
    if isinstance(cert_or_der, x509.Certificate):
        return cert_or_der.fingerprint(hashes.SHA256()).hex()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(cert_or_der)
    return digest.finalize().hex()


def colon_fingerprint(fingerprint: str) -> str:
    """Format a hex fingerprint as upper-case byte pairs with colons, as 'openssl x509 -fingerprint' prints it."""
    upper = fingerprint.upper()
    return ":".join(upper[index : index + 2] for index in range(0, len(upper), 2))


@dataclass(frozen=True)
class CertificateInfo:
    """Details of one certificate that admins compare with what the other side shows.

    Times are timezone-aware UTC. `key_size` is in bits. `expired`,
    `not_yet_valid` and `expires_soon` refer to the time given to
    `describe_certificate`. `expires_soon` means within EXPIRY_WARNING_DAYS
    days and is false once the certificate has expired. `days_left` counts
    the days until `not_after` with a started day counted as a whole day, so
    a certificate made for 10 days shows 10 at first. It is negative once
    `not_after` has passed.
    """

    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str
    sha256_fingerprint_colons: str
    serial_number_hex: str
    key_type: str
    key_size: int | None
    key_curve: str | None
    subject_alt_names: tuple[str, ...]
    self_signed: bool
    is_ca: bool
    expired: bool
    not_yet_valid: bool
    expires_soon: bool
    days_left: int

    def as_dict(self) -> dict[str, object]:
        """Return the fields as JSON-ready values, with times in ISO 8601."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "sha256_fingerprint": self.sha256_fingerprint,
            "sha256_fingerprint_colons": self.sha256_fingerprint_colons,
            "serial_number_hex": self.serial_number_hex,
            "key_type": self.key_type,
            "key_size": self.key_size,
            "key_curve": self.key_curve,
            "subject_alt_names": list(self.subject_alt_names),
            "self_signed": self.self_signed,
            "is_ca": self.is_ca,
            "expired": self.expired,
            "not_yet_valid": self.not_yet_valid,
            "expires_soon": self.expires_soon,
            "days_left": self.days_left,
        }


def describe_certificate(cert: x509.Certificate, *, now: dt.datetime | None = None) -> CertificateInfo:
    """Collect the details of `cert`, with expiry judged at `now` (default: the current time)."""
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    expired = now > not_after
    fingerprint = sha256_fingerprint(cert)
    key_type, key_size, key_curve = _describe_public_key(cert.public_key())
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=not_before,
        not_after=not_after,
        sha256_fingerprint=fingerprint,
        sha256_fingerprint_colons=colon_fingerprint(fingerprint),
        serial_number_hex=format(cert.serial_number, "x"),
        key_type=key_type,
        key_size=key_size,
        key_curve=key_curve,
        subject_alt_names=_describe_alt_names(cert),
        self_signed=_is_self_signed(cert),
        is_ca=_is_ca(cert),
        expired=expired,
        not_yet_valid=now < not_before,
        expires_soon=not expired and not_after - now <= dt.timedelta(days=EXPIRY_WARNING_DAYS),
        days_left=_days_left(not_after - now),
    )


def _days_left(remaining: dt.timedelta) -> int:
    """Round a positive time left up to whole days, and an expired one down (so it is -1 or less)."""
    days = remaining / dt.timedelta(days=1)
    return math.ceil(days) if remaining >= dt.timedelta(0) else math.floor(days)


def _describe_public_key(public_key: object) -> tuple[str, int | None, str | None]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size, None
    if isinstance(public_key, elliptic_curve.EllipticCurvePublicKey):
        return "EC", public_key.curve.key_size, public_key.curve.name
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, None
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448", 456, None
    if isinstance(public_key, dsa.DSAPublicKey):
        return "DSA", public_key.key_size, None
    return type(public_key).__name__, None, None


def _describe_alt_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """Return the subjectAltName entries in OpenSSL's notation, such as 'DNS:pacs' and 'IP:10.0.0.5'."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    entries = []
    for name in extension.value:
        if isinstance(name, x509.DNSName):
            entries.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            entries.append(f"IP:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            entries.append(f"email:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            entries.append(f"URI:{name.value}")
        else:
            entries.append(f"{type(name).__name__}:{name.value}")
    return tuple(entries)


def _is_self_signed(certificate: x509.Certificate) -> bool:
    """Return whether the certificate names itself as issuer and its own key verifies its signature."""
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return extension.value.ca


def _common_name(certificate: x509.Certificate) -> str | None:
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")
