"""Models of durable forwarding: archives, their PACS links, studies, instances and the outbox.

One `Delivery` row exists per (instance, linked PACS). It is created in the
same transaction that stores the instance (a transactional outbox), and its
state is the truth shown to admins: an instance is `stored` only after a
success or warning C-STORE response for it. Every attempt is kept in
`DeliveryAttempt`.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pacsbridge.db.models import (
    NAME_MAX_LENGTH,
    Base,
    ConnectionRecord,
    Organization,
    StrEnumType,
    UtcDateTime,
    _in_values,
    utc_now,
)

UID_MAX_LENGTH = 64
# Archives link to at most this many PACS, in slots 1 to MAX_LINKS.
MAX_LINKS = 3


class InstanceState(enum.StrEnum):
    OK = "ok"
    # The same SOP Instance UID arrived again with different bytes: kept, not sent.
    NEEDS_ATTENTION = "needs-attention"


class DeliveryState(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    STORED = "stored"
    RETRYING = "retrying"
    NEEDS_ATTENTION = "needs-attention"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HELD = "held"


# States a worker may pick up once `next_attempt_at` has passed.
DUE_STATES = (DeliveryState.QUEUED, DeliveryState.RETRYING)
# States that end a delivery until an admin acts.
FINAL_STATES = (DeliveryState.STORED, DeliveryState.FAILED, DeliveryState.CANCELLED)


class AttemptOutcome(enum.StrEnum):
    STORED = "stored"
    RETRY = "retry"
    NEEDS_ATTENTION = "needs-attention"
    FAILED = "failed"
    # The worker lost its lease (it died or stalled) before recording a response.
    LEASE_LOST = "lease-lost"
    # The worker stopped before sending this instance, so the try does not count.
    NOT_SENT = "not-sent"


class DestinationState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


class Archive(Base):
    """A named collection of studies of one organization, forwarded to its linked PACS."""

    __tablename__ = "archives"
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    # Studies of a test archive count as test data, which unsecured connections may receive.
    is_test: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    organization: Mapped[Organization] = relationship()
    links: Mapped[list[ArchiveLink]] = relationship(back_populates="archive", order_by="ArchiveLink.slot")

    def __repr__(self) -> str:
        return f"Archive(id={self.id!r})"


class ArchiveLink(Base):
    """One PACS linked to an archive, in slot 1, 2 or 3."""

    __tablename__ = "archive_links"
    __table_args__ = (
        CheckConstraint(f"slot BETWEEN 1 AND {MAX_LINKS}", name="slot"),
        UniqueConstraint("archive_id", "slot"),
        UniqueConstraint("archive_id", "connection_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    archive_id: Mapped[int] = mapped_column(ForeignKey("archives.id", ondelete="CASCADE"))
    slot: Mapped[int] = mapped_column(Integer)
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="RESTRICT"))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    archive: Mapped[Archive] = relationship(back_populates="links")
    connection: Mapped[ConnectionRecord] = relationship()


class AuditEvent(Base):
    """An admin action worth keeping: link changes, resends, releases, connection edits."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_organization_id_created_at", "organization_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"))
    action: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    # Ids and names only: never patient data.
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)


class Study(Base):
    """A study stored in an archive, with the patient and exam details it was uploaded with."""

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("organization_id", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"))
    archive_id: Mapped[int] = mapped_column(ForeignKey("archives.id", ondelete="RESTRICT"))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    is_test: Mapped[bool] = mapped_column(Boolean, default=False)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    notes: Mapped[str | None] = mapped_column(Text)
    # Worklist attributes to put into every instance sent (see the MWL query).
    worklist_attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    archive: Mapped[Archive] = relationship()
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    """One stored DICOM instance; its bytes live in the blob store under `blob_sha256`."""

    __tablename__ = "instances"
    __table_args__ = (
        CheckConstraint(_in_values("state", InstanceState), name="state"),
        UniqueConstraint("organization_id", "sop_instance_uid", "blob_sha256"),
        Index("ix_instances_study_id", "study_id"),
        # One sendable version per SOP Instance UID, even when two uploads of
        # different bytes commit at the same moment.
        Index(
            "uq_instances_one_ok_version",
            "organization_id",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text("state = 'ok'"),
            postgresql_where=text("state = 'ok'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    blob_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    state: Mapped[InstanceState] = mapped_column(StrEnumType(InstanceState), default=InstanceState.OK)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    study: Mapped[Study] = relationship(back_populates="instances")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="instance")


class Delivery(Base):
    """The state of one instance towards one PACS: the outbox row that workers claim."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(_in_values("state", DeliveryState), name="state"),
        UniqueConstraint("instance_id", "connection_id"),
        Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_deliveries_connection_id_study_id", "connection_id", "study_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="RESTRICT"))
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="RESTRICT"))
    # Copied from the instance so that workers group by (destination, study) without a join.
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"))
    state: Mapped[DeliveryState] = mapped_column(StrEnumType(DeliveryState), default=DeliveryState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the current series of tries began, for the maximum retry age.
    first_queued_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer)
    warning_text: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Why a delivery needs attention or is held, in words an admin can act on.
    reason: Mapped[str | None] = mapped_column(Text)
    sent_transfer_syntax: Mapped[str | None] = mapped_column(String(UID_MAX_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)

    instance: Mapped[Instance] = relationship(back_populates="deliveries")
    connection: Mapped[ConnectionRecord] = relationship()
    attempt_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id"
    )


class DeliveryAttempt(Base):
    """One try to send one delivery, kept for the admin's history."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        CheckConstraint(_in_values("outcome", AttemptOutcome), name="outcome"),
        Index("ix_delivery_attempts_delivery_id", "delivery_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    worker: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    outcome: Mapped[AttemptOutcome | None] = mapped_column(StrEnumType(AttemptOutcome))
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_log")


class DestinationHealth(Base):
    """Whether a PACS is reachable: a destination that keeps failing to connect is marked down and probed."""

    __tablename__ = "destination_health"
    __table_args__ = (CheckConstraint(_in_values("state", DestinationState), name="state"),)

    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[DestinationState] = mapped_column(StrEnumType(DestinationState), default=DestinationState.UP)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    down_since: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    next_probe_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utc_now)
