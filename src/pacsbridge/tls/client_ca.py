"""Per-organization certificate authorities and the SCU client certificates they issue.

Each organization gets one CA (EC P-256, valid 10 years) on first use. It
issues one client certificate per connection (EC P-256, valid 2 years, at most
until the CA expires) whose subject names the organization (O) and the
connection (CN), with extendedKeyUsage clientAuth. The hospital adds either the
CA certificate or the client certificate to the SCP's trusted certificates.

Rotation issues a new active certificate, and pacsbridge sends with it at
once, because it sends with the active certificate only. The old one is
marked as retiring until its grace period ends. That mark is a record for
admins and changes nothing that is sent. An SCP that trusts the CA accepts
the new certificate at once, but one that trusts only the old client
certificate must add the new one first.

When PACSBRIDGE_SECRET_KEY is lost, `reissue_all` replaces the CA (whose key
then cannot be decrypted) and all client certificates of the organization.

Private keys are stored encrypted with the key in PACSBRIDGE_SECRET_KEY and
bound to their certificate's fingerprint (see pacsbridge.tls.secret_key).
Like the connection repository, these functions never commit.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacsbridge.connections import ScuAuthentication, TlsMode
from pacsbridge.db.models import (
    CertificateAuthorityRecord,
    ClientCertificateRecord,
    ClientCertificateStatus,
    ConnectionRecord,
    Organization,
    utc_now,
)
from pacsbridge.tls.certificates import (
    BACKDATE,
    MAX_COMMON_NAME_LENGTH,
    PrivateKey,
    certificate_pem,
    generate_private_key,
    private_key_pem,
    sha256_fingerprint,
)
from pacsbridge.tls.secret_key import SecretKey

LOGGER = logging.getLogger(__name__)

CA_VALIDITY_DAYS = 3650
CLIENT_VALIDITY_DAYS = 730
DEFAULT_GRACE_DAYS = 14
MAX_GRACE_DAYS = 365
# ub-organization-name in RFC 5280, appendix A.
MAX_ORGANIZATION_NAME_LENGTH = 64


class ClientCertificateError(RuntimeError):
    """Raised when a client certificate cannot be issued, rotated or found. The message contains the fix."""


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate with its decrypted private key, ready to present to an SCP."""

    certificate_pem: bytes
    private_key: PrivateKey
    fingerprint: str

    def __repr__(self) -> str:
        return f"ClientIdentity(fingerprint={self.fingerprint!r})"


def _truncate(text: str, length: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 1] + "…"


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _truncate(organization, MAX_ORGANIZATION_NAME_LENGTH)),
            x509.NameAttribute(NameOID.COMMON_NAME, _truncate(common_name, MAX_COMMON_NAME_LENGTH)),
        ]
    )


def _key_usage(*, certificate_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not certificate_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_sign,
        crl_sign=certificate_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca_certificate(
    key: PrivateKey, organization: str, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """Create the self-signed CA certificate of `organization`, valid CA_VALIDITY_DAYS days."""
    start = now or utc_now()
    subject = _name(f"pacsbridge SCU CA {organization}", organization)
    public_key = key.public_key()
    subject_key_identifier = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + dt.timedelta(days=CA_VALIDITY_DAYS))
        # Path length 0: the CA signs client certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificate_sign=True), critical=True)
        .add_extension(subject_key_identifier, critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def build_client_certificate(
    key: PrivateKey,
    ca_key: PrivateKey,
    ca_certificate: x509.Certificate,
    *,
    organization: str,
    connection: str,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Issue a client certificate for `key` that names `organization` and `connection`, signed by the CA."""
    start = now or utc_now()
    not_after = min(start + dt.timedelta(days=CLIENT_VALIDITY_DAYS), ca_certificate.not_valid_after_utc)
    if not_after <= start:
        raise ClientCertificateError(
            f"the certificate authority of organization {organization!r} expired on "
            f"{ca_certificate.not_valid_after_utc:%Y-%m-%d}, so it cannot issue client certificates"
        )
    ca_key_identifier = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(connection, organization))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certificate_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_identifier), critical=False
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def _associated_data(table: str, fingerprint: str) -> bytes:
    return f"pacsbridge {table} {fingerprint}".encode("ascii")


def _encrypt_key(secret_key: SecretKey, key: PrivateKey, table: str, fingerprint: str) -> str:
    return secret_key.encrypt(private_key_pem(key), _associated_data(table, fingerprint))


def _decrypt_key(secret_key: SecretKey, token: str, table: str, fingerprint: str) -> PrivateKey:
    pem = secret_key.decrypt(token, _associated_data(table, fingerprint))
    key = serialization.load_pem_private_key(pem, password=None)
    return key  # type: ignore[return-value]


# Certificate authorities


def find_authority(session: Session, organization: Organization) -> CertificateAuthorityRecord | None:
    return session.scalar(
        select(CertificateAuthorityRecord).where(CertificateAuthorityRecord.organization_id == organization.id)
    )


def get_or_create_authority(
    session: Session, organization: Organization, secret_key: SecretKey
) -> CertificateAuthorityRecord:
    """Return the organization's CA, creating its key and certificate on first use."""
    existing = find_authority(session, organization)
    if existing is not None:
        return existing
    key = generate_private_key(ec=True)
    certificate = build_ca_certificate(key, organization.name)
    fingerprint = sha256_fingerprint(certificate)
    record = CertificateAuthorityRecord(
        organization_id=organization.id,
        certificate_pem=certificate_pem(certificate).decode("ascii"),
        encrypted_private_key=_encrypt_key(secret_key, key, "certificate_authorities", fingerprint),
        created_at=utc_now(),
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        # Another process created the CA between the SELECT and the INSERT.
        existing = find_authority(session, organization)
        if existing is None:
            raise
        return existing
    LOGGER.info("Created certificate authority for organization id=%d, SHA-256 %s", organization.id, fingerprint)
    return record


def _load_authority(
    record: CertificateAuthorityRecord, secret_key: SecretKey
) -> tuple[PrivateKey, x509.Certificate]:
    certificate = x509.load_pem_x509_certificate(record.certificate_pem.encode("ascii"))
    fingerprint = sha256_fingerprint(certificate)
    return _decrypt_key(secret_key, record.encrypted_private_key, "certificate_authorities", fingerprint), certificate


# Client certificates


def list_client_certificates(session: Session, connection: ConnectionRecord) -> list[ClientCertificateRecord]:
    """Return the connection's client certificates, newest first."""
    return list(
        session.scalars(
            select(ClientCertificateRecord)
            .where(ClientCertificateRecord.connection_id == connection.id)
            .order_by(ClientCertificateRecord.created_at.desc(), ClientCertificateRecord.id.desc())
        )
    )


def find_active_certificate(session: Session, connection: ConnectionRecord) -> ClientCertificateRecord | None:
    return session.scalar(
        select(ClientCertificateRecord).where(
            ClientCertificateRecord.connection_id == connection.id,
            ClientCertificateRecord.status == ClientCertificateStatus.ACTIVE,
        )
    )


def effective_status(record: ClientCertificateRecord, now: dt.datetime | None = None) -> ClientCertificateStatus:
    """Return the status at `now`: a retiring certificate whose grace period has ended counts as retired."""
    now = now or utc_now()
    if (
        record.status == ClientCertificateStatus.RETIRING
        and record.retire_after is not None
        and record.retire_after <= now
    ):
        return ClientCertificateStatus.RETIRED
    return record.status


def retire_overdue(session: Session, connection: ConnectionRecord, now: dt.datetime | None = None) -> int:
    """Mark retiring certificates whose grace period has ended as retired, and return how many changed."""
    changed = 0
    for record in list_client_certificates(session, connection):
        if record.status != effective_status(record, now):
            record.status = ClientCertificateStatus.RETIRED
            changed += 1
    if changed:
        session.flush()
    return changed


def _issue(
    session: Session, connection: ConnectionRecord, secret_key: SecretKey, now: dt.datetime
) -> ClientCertificateRecord:
    authority = get_or_create_authority(session, connection.organization, secret_key)
    ca_key, ca_certificate = _load_authority(authority, secret_key)
    key = generate_private_key(ec=True)
    certificate = build_client_certificate(
        key,
        ca_key,
        ca_certificate,
        organization=connection.organization.name,
        connection=connection.name,
        now=now,
    )
    fingerprint = sha256_fingerprint(certificate)
    record = ClientCertificateRecord(
        connection_id=connection.id,
        certificate_pem=certificate_pem(certificate).decode("ascii"),
        encrypted_private_key=_encrypt_key(secret_key, key, "client_certificates", fingerprint),
        serial=format(certificate.serial_number, "x"),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        fingerprint=fingerprint,
        status=ClientCertificateStatus.ACTIVE,
        created_at=now,
        retire_after=None,
    )
    with session.begin_nested():
        session.add(record)
    LOGGER.info("Issued client certificate for connection id=%d, SHA-256 %s", connection.id, fingerprint)
    return record


def ensure_client_certificate(
    session: Session, connection: ConnectionRecord, secret_key: SecretKey
) -> tuple[ClientCertificateRecord, bool]:
    """Return the connection's active client certificate and whether it was issued now, issuing one if it has none."""
    active = find_active_certificate(session, connection)
    if active is not None:
        return active, False
    return _issue(session, connection, secret_key, utc_now()), True


def rotate_client_certificate(
    session: Session,
    connection: ConnectionRecord,
    secret_key: SecretKey,
    *,
    grace_days: int = DEFAULT_GRACE_DAYS,
    now: dt.datetime | None = None,
) -> tuple[ClientCertificateRecord, ClientCertificateRecord | None]:
    """Issue a new active certificate and mark the previous one as retiring for `grace_days` days.

    Returns the new certificate and the previous one (None when there was none).
    Retiring certificates whose grace period has ended become retired.
    """
    if isinstance(grace_days, bool) or not 0 <= grace_days <= MAX_GRACE_DAYS:
        raise ClientCertificateError(
            f"grace period of {grace_days} days is out of range: give 0 to {MAX_GRACE_DAYS} days "
            f"(default {DEFAULT_GRACE_DAYS})"
        )
    now = now or utc_now()
    retire_overdue(session, connection, now)
    previous = find_active_certificate(session, connection)
    if previous is not None:
        previous.retire_after = now + dt.timedelta(days=grace_days)
        previous.status = ClientCertificateStatus.RETIRING if grace_days else ClientCertificateStatus.RETIRED
        # The old row must leave the active state before the new one is added,
        # because a unique index allows one active certificate per connection.
        session.flush()
    new = _issue(session, connection, secret_key, now)
    LOGGER.info(
        "Rotated client certificate of connection id=%d, grace period %d days", connection.id, grace_days
    )
    return new, previous


@dataclass(frozen=True)
class ReissueResult:
    """Outcome of `reissue_all`: the new CA, the fingerprint of the CA it replaced, and the certificates changed."""

    authority: CertificateAuthorityRecord
    previous_authority_fingerprint: str | None
    retired: list[ClientCertificateRecord]
    issued: list[tuple[ConnectionRecord, ClientCertificateRecord]]


def _organization_connections(session: Session, organization: Organization) -> list[ConnectionRecord]:
    connections = session.scalars(select(ConnectionRecord).where(ConnectionRecord.organization_id == organization.id))
    return sorted(connections, key=lambda connection: (connection.name.casefold(), connection.name))


def _uses_client_certificate(connection: ConnectionRecord) -> bool:
    return (
        connection.tls_mode != TlsMode.INACTIVE
        and connection.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE
    )


def _replace_authority(
    session: Session, organization: Organization, secret_key: SecretKey, now: dt.datetime
) -> tuple[CertificateAuthorityRecord, str | None]:
    """Give `organization` a new CA key and certificate, and return the record and the replaced CA's fingerprint.

    The row is updated in place, because an organization has one CA row. The
    old CA key is not decrypted, so this works without the key that encrypted it.
    """
    record = find_authority(session, organization)
    if record is None:
        return get_or_create_authority(session, organization, secret_key), None
    previous = sha256_fingerprint(x509.load_pem_x509_certificate(record.certificate_pem.encode("ascii")))
    key = generate_private_key(ec=True)
    certificate = build_ca_certificate(key, organization.name, now=now)
    fingerprint = sha256_fingerprint(certificate)
    record.certificate_pem = certificate_pem(certificate).decode("ascii")
    record.encrypted_private_key = _encrypt_key(secret_key, key, "certificate_authorities", fingerprint)
    record.created_at = now
    session.flush()
    return record, previous


def reissue_all(
    session: Session, organization: Organization, secret_key: SecretKey, *, now: dt.datetime | None = None
) -> ReissueResult:
    """Replace the organization's CA and issue new client certificates, all encrypted with `secret_key`.

    Every active or retiring client certificate of the organization becomes
    retired now, with `retire_after` set to `now` as the record of when. Each
    connection with SCU authentication over TLS gets a new active certificate
    from the new CA. Connections without it get one from the new CA when it is
    turned on. No stored private key is decrypted, so this is the way out
    after PACSBRIDGE_SECRET_KEY was lost.
    """
    now = now or utc_now()
    connections = _organization_connections(session, organization)
    retired: list[ClientCertificateRecord] = []
    for connection in connections:
        for record in list_client_certificates(session, connection):
            if record.status == ClientCertificateStatus.RETIRED:
                continue
            record.status = ClientCertificateStatus.RETIRED
            if record.retire_after is None or record.retire_after > now:
                record.retire_after = now
            retired.append(record)
    # The old rows must leave the active state before new ones are added (one active certificate per connection).
    session.flush()

    authority, previous = _replace_authority(session, organization, secret_key, now)
    issued = [
        (connection, _issue(session, connection, secret_key, now))
        for connection in connections
        if _uses_client_certificate(connection)
    ]
    LOGGER.info(
        "Replaced certificate authority of organization id=%d (SHA-256 %s, previously %s): retired %d and issued "
        "%d client certificates",
        organization.id,
        sha256_fingerprint(x509.load_pem_x509_certificate(authority.certificate_pem.encode("ascii"))),
        previous or "none",
        len(retired),
        len(issued),
    )
    return ReissueResult(authority, previous, retired, issued)


def load_client_identity(record: ClientCertificateRecord, secret_key: SecretKey) -> ClientIdentity:
    """Decrypt the private key of `record`, or raise SecretKeyError when PACSBRIDGE_SECRET_KEY does not match."""
    key = _decrypt_key(secret_key, record.encrypted_private_key, "client_certificates", record.fingerprint)
    return ClientIdentity(record.certificate_pem.encode("ascii"), key, record.fingerprint)


def authority_certificate_pem(session: Session, connection: ConnectionRecord) -> str | None:
    """Return the PEM certificate of the CA of the connection's organization, or None before it exists."""
    authority = find_authority(session, connection.organization)
    return None if authority is None else authority.certificate_pem
