"""SQLAlchemy models of the pacsbridge database.

The Alembic migrations in `migrations/versions/` create the schema, so a change
to these models needs a new migration. The test suite compares the two.

Enum fields are stored as their string values in VARCHAR columns with CHECK
constraints, so the database stays readable without the Python enums and a new
value only needs a migration that replaces the constraint.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from pacsbridge.connections import (
    Compression,
    ConnectionKind,
    MonochromeMode,
    ScuAuthentication,
    TlsMode,
)
from pacsbridge.connections.settings import DEFAULT_JPEG_QUALITY

# Explicit constraint names let later migrations drop or alter constraints by
# name, which SQLite batch migrations need.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_MAX_LENGTH = 200
ENUM_MAX_LENGTH = 32


def utc_now() -> dt.datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back as an aware UTC datetime.

    SQLite has no time zone support and returns naive values, and PostgreSQL
    returns values in the session's time zone, so this type converts both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} cannot be stored: pass an aware datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class StrEnumType(TypeDecorator[enum.StrEnum]):
    """A string enum stored as its value in a VARCHAR column."""

    impl = String(ENUM_MAX_LENGTH)
    cache_ok = True

    def __init__(self, enum_type: type[enum.StrEnum]) -> None:
        super().__init__()
        self.enum_type = enum_type

    def process_bind_param(self, value: object, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_type(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> enum.StrEnum | None:
        if value is None:
            return None
        return self.enum_type(value)


def _in_values(column: str, enum_type: type[enum.StrEnum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum_type)
    return f"{column} IN ({values})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Organization(Base):
    """A customer organization: the owner of connections and, later, archives and studies."""

    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    connections: Mapped[list[ConnectionRecord]] = relationship(back_populates="organization")

    def __repr__(self) -> str:
        return f"Organization(id={self.id!r})"


class ConnectionRecord(Base):
    """A stored PACS (C-STORE destination) or Modality Worklist connection.

    Its columns carry the names of the `ConnectionSettings` fields.
    """

    __tablename__ = "connections"
    __table_args__ = (
        UniqueConstraint("organization_id", "name"),
        # An organization queries at most one Modality Worklist.
        Index(
            "uq_connections_one_mwl_per_organization",
            "organization_id",
            unique=True,
            sqlite_where=text("kind = 'mwl'"),
            postgresql_where=text("kind = 'mwl'"),
        ),
        CheckConstraint(_in_values("kind", ConnectionKind), name="kind"),
        CheckConstraint("port BETWEEN 1 AND 65535", name="port"),
        CheckConstraint(_in_values("tls_mode", TlsMode), name="tls_mode"),
        CheckConstraint(_in_values("scu_authentication", ScuAuthentication), name="scu_authentication"),
        CheckConstraint(_in_values("image_compression", Compression), name="image_compression"),
        CheckConstraint(_in_values("loop_compression", Compression), name="loop_compression"),
        CheckConstraint(_in_values("monochrome", MonochromeMode), name="monochrome"),
        CheckConstraint("jpeg_quality BETWEEN 1 AND 100", name="jpeg_quality"),
        CheckConstraint(
            "acse_timeout > 0 AND dimse_timeout > 0 AND connection_timeout > 0", name="timeouts_positive"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    kind: Mapped[ConnectionKind] = mapped_column(StrEnumType(ConnectionKind))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    timezone: Mapped[str] = mapped_column(String(64))
    character_set: Mapped[str] = mapped_column(String(256))
    tls_mode: Mapped[TlsMode] = mapped_column(StrEnumType(TlsMode))
    scp_certificate_pem: Mapped[str | None] = mapped_column(Text)
    pinned_fingerprint: Mapped[str | None] = mapped_column(String(64))
    server_name: Mapped[str | None] = mapped_column(String(255))
    check_hostname: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    legacy_ciphers: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    scu_authentication: Mapped[ScuAuthentication] = mapped_column(StrEnumType(ScuAuthentication))
    image_compression: Mapped[Compression] = mapped_column(StrEnumType(Compression))
    loop_compression: Mapped[Compression] = mapped_column(StrEnumType(Compression))
    jpeg_quality: Mapped[int] = mapped_column(Integer, default=DEFAULT_JPEG_QUALITY, server_default=text("90"))
    monochrome: Mapped[MonochromeMode] = mapped_column(StrEnumType(MonochromeMode))
    acse_timeout: Mapped[float] = mapped_column(Float)
    dimse_timeout: Mapped[float] = mapped_column(Float)
    connection_timeout: Mapped[float] = mapped_column(Float)
    test_only: Mapped[bool] = mapped_column(Boolean, default=False)
    worklist_filters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    organization: Mapped[Organization] = relationship(back_populates="connections")
    client_certificates: Mapped[list[ClientCertificateRecord]] = relationship(
        back_populates="connection", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"ConnectionRecord(id={self.id!r}, kind={self.kind!r})"


class ClientCertificateStatus(enum.StrEnum):
    """Life cycle of a client certificate: the active one is sent, a retiring one stays valid until retire_after."""

    ACTIVE = "active"
    RETIRING = "retiring"
    RETIRED = "retired"


class CertificateAuthorityRecord(Base):
    """The certificate authority of one organization, which issues its SCU client certificates.

    `encrypted_private_key` is the PEM key encrypted with PACSBRIDGE_SECRET_KEY
    (see pacsbridge.tls.secret_key), never the key itself.
    """

    __tablename__ = "certificate_authorities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="RESTRICT"), unique=True
    )
    certificate_pem: Mapped[str] = mapped_column(Text)
    encrypted_private_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    organization: Mapped[Organization] = relationship()

    def __repr__(self) -> str:
        return f"CertificateAuthorityRecord(id={self.id!r}, organization_id={self.organization_id!r})"


class ClientCertificateRecord(Base):
    """A client certificate that pacsbridge presents to the SCP of one connection (SCU authentication).

    `encrypted_private_key` is encrypted as in CertificateAuthorityRecord.
    `serial` is the certificate serial number in lower-case hex, `fingerprint`
    the SHA-256 of the DER certificate in lower-case hex. `retire_after` is set
    for a retiring certificate: the end of its grace period.
    """

    __tablename__ = "client_certificates"
    __table_args__ = (
        CheckConstraint(_in_values("status", ClientCertificateStatus), name="status"),
        UniqueConstraint("fingerprint"),
        Index("ix_client_certificates_connection_id", "connection_id"),
        # pacsbridge sends with one certificate per connection at a time.
        Index(
            "uq_client_certificates_one_active_per_connection",
            "connection_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="CASCADE"))
    certificate_pem: Mapped[str] = mapped_column(Text)
    encrypted_private_key: Mapped[str] = mapped_column(Text)
    serial: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    not_after: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[ClientCertificateStatus] = mapped_column(StrEnumType(ClientCertificateStatus))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    retire_after: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())

    connection: Mapped[ConnectionRecord] = relationship(back_populates="client_certificates")

    def __repr__(self) -> str:
        return f"ClientCertificateRecord(id={self.id!r}, status={self.status!r})"
