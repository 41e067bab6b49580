"""Archives, their links to up to three PACS, the rules for new deliveries, and resending a study.

These functions never commit: the caller owns the transaction, as in
`with sessions.begin() as session: link_pacs(session, "Cardiology", "PACS A", actor="admin")`.
Archive names are stored in Unicode normalization form NFC and looked up the
same way. Every link change and resend writes an `AuditEvent`.
"""

from __future__ import annotations

import logging
import shlex
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacsbridge.connections import ConnectionKind, TlsMode
from pacsbridge.db import (
    DEFAULT_ORGANIZATION,
    ConnectionRecord,
    find_organization,
    get_connection,
)
from pacsbridge.db.connections import get_or_create_organization, normalize_name
from pacsbridge.db.forwarding import (
    MAX_LINKS,
    Archive,
    ArchiveLink,
    AuditEvent,
    Delivery,
    DeliveryState,
    DestinationHealth,
    Instance,
    InstanceState,
    Study,
)
from pacsbridge.db.models import NAME_MAX_LENGTH, utc_now
from pacsbridge.forward.progress import summarize as summarize_progress

LOGGER = logging.getLogger(__name__)


def unsecured_reason(connection_name: str) -> str:
    """Return the needs-attention reason of a real study waiting for the unsecured connection `connection_name`.

    The commands are in double quotes, with shell quoting of the name where it needs it.
    """
    edit = shlex.join(["pacsbridge", "connections", "edit", connection_name, "--tls", "active", "--scp-cert", "FILE"])
    return (
        "connection is unsecured: only test data may be sent without TLS. "
        f'Turn on TLS with "{edit}" (or --tls encryption-only), then "pacsbridge deliveries retry ID".'
    )


# Delivery states that `resend_study` puts back into the queue. Held and
# in-progress deliveries (queued, sending, retrying) are left alone.
RESENDABLE_STATES = (
    DeliveryState.STORED,
    DeliveryState.FAILED,
    DeliveryState.CANCELLED,
    DeliveryState.NEEDS_ATTENTION,
)
# Delivery states that unlinking a PACS cancels. A delivery in `sending` is
# leased by a worker, which records its outcome itself.
CANCELLED_ON_UNLINK = (
    DeliveryState.QUEUED,
    DeliveryState.RETRYING,
    DeliveryState.HELD,
    DeliveryState.NEEDS_ATTENTION,
)

_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


class ArchiveError(ValueError):
    """Raised when a request breaks an archive rule; the message names the value and the fix."""


class ArchiveNotFoundError(LookupError):
    """Raised when the organization has no archive of the requested name."""

    def __init__(self, name: str, organization: str, known_names: list[str]) -> None:
        self.name = name
        self.organization = organization
        self.known_names = known_names
        if known_names:
            hint = "Known archives: " + ", ".join(repr(known) for known in known_names) + "."
        else:
            hint = "No archives exist yet: create one with 'pacsbridge archives create NAME'."
        super().__init__(f"archive {name!r} not found in organization {organization!r}. {hint}")


class StudyNotFoundError(LookupError):
    """Raised when no study of the organization has the requested Study Instance UID."""


# Archives ---------------------------------------------------------------------


def create_archive(
    session: Session,
    name: str,
    *,
    is_test: bool = False,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> Archive:
    """Add an archive to `organization`; raise ArchiveError for an invalid or already used name."""
    normalized = _check_archive_name(name)
    owner = get_or_create_organization(session, organization)
    if find_archive(session, normalized, organization=organization) is not None:
        raise ArchiveError(
            f"archive name {name!r} is already used in organization {organization!r}: choose another name"
        )

    archive = Archive(organization_id=owner.id, name=normalized, is_test=is_test, created_at=utc_now())
    try:
        with session.begin_nested():
            session.add(archive)
    except IntegrityError:
        # Another process created an archive of this name after the check above.
        raise ArchiveError(
            f"archive name {name!r} is already used in organization {organization!r}: choose another name"
        ) from None
    record_audit_event(
        session,
        owner.id,
        "archive.create",
        actor,
        {"archive_id": archive.id, "archive": archive.name, "is_test": is_test},
    )
    LOGGER.info("Created archive id=%d is_test=%s organization id=%d", archive.id, is_test, owner.id)
    return archive


def find_archive(session: Session, name: str, *, organization: str = DEFAULT_ORGANIZATION) -> Archive | None:
    """Return the archive called `name`, or None if the organization has none of that name."""
    owner = find_organization(session, organization)
    if owner is None:
        return None
    return session.scalar(
        select(Archive).where(Archive.organization_id == owner.id, Archive.name == normalize_name(name))
    )


def get_archive(session: Session, name: str, *, organization: str = DEFAULT_ORGANIZATION) -> Archive:
    """Return the archive called `name`; raise ArchiveNotFoundError, which lists the known names, if none."""
    archive = find_archive(session, name, organization=organization)
    if archive is None:
        known = [known.name for known in list_archives(session, organization=organization)]
        raise ArchiveNotFoundError(name, organization, known)
    return archive


def list_archives(session: Session, *, organization: str = DEFAULT_ORGANIZATION) -> list[Archive]:
    """Return the organization's archives sorted by name."""
    owner = find_organization(session, organization)
    if owner is None:
        return []
    archives = session.scalars(select(Archive).where(Archive.organization_id == owner.id)).all()
    # Sorted here because SQLite and PostgreSQL collations order names differently.
    return sorted(archives, key=lambda archive: (archive.name.casefold(), archive.name))


def _check_archive_name(name: str) -> str:
    normalized = normalize_name(name)
    if not normalized.strip():
        raise ArchiveError("archive name is empty: give a name such as 'Cardiology'")
    if normalized != normalized.strip():
        raise ArchiveError(f"archive name {name!r} has leading or trailing spaces: remove them")
    if len(normalized) > NAME_MAX_LENGTH:
        raise ArchiveError(
            f"archive name has {len(normalized)} characters, more than the {NAME_MAX_LENGTH} that can be "
            "stored: shorten it"
        )
    if any(unicodedata.category(character) in _UNPRINTABLE_CATEGORIES for character in normalized):
        raise ArchiveError(
            f"archive name {name!r} contains a control character or line break: "
            "use a name on one line with printable characters only"
        )
    return normalized


# Links ------------------------------------------------------------------------


def link_pacs(
    session: Session,
    archive_name: str,
    connection_name: str,
    *,
    slot: int | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> ArchiveLink:
    """Link the PACS connection `connection_name` to the archive in `slot`, or in the first free slot.

    Only studies uploaded after the link get deliveries to this PACS; use
    `resend_study` for studies stored before. Raises ArchiveNotFoundError,
    ConnectionNotFoundError, or ArchiveError when a link rule is broken.
    """
    archive = get_archive(session, archive_name, organization=organization)
    connection = get_connection(session, connection_name, organization=organization)
    if connection.kind != ConnectionKind.PACS:
        raise ArchiveError(
            f"connection {connection.name!r} is a Modality Worklist connection (kind {connection.kind.value}), "
            "but archives forward studies by C-STORE to PACS connections only: link a connection of kind pacs"
        )

    links = {link.slot: link for link in archive.links}
    for link in links.values():
        if link.connection_id == connection.id:
            raise ArchiveError(
                f"connection {connection.name!r} is already linked to archive {archive.name!r} in slot "
                f"{link.slot}: each PACS is linked once"
            )
    slot = _choose_slot(archive, links, slot)

    new_link = ArchiveLink(archive_id=archive.id, slot=slot, connection_id=connection.id, created_at=utc_now())
    try:
        with session.begin_nested():
            session.add(new_link)
    except IntegrityError:
        raise ArchiveError(
            f"archive {archive.name!r} changed while linking (slot {slot} or connection {connection.name!r} "
            "was linked by someone else): check 'pacsbridge archives show' and try again"
        ) from None
    session.refresh(archive, ["links"])
    record_audit_event(
        session, archive.organization_id, "archive.link", actor, _link_details(archive, new_link, connection)
    )
    LOGGER.info("Linked connection id=%d to archive id=%d slot=%d", connection.id, archive.id, slot)
    return new_link


def _choose_slot(archive: Archive, links: dict[int, ArchiveLink], slot: int | None) -> int:
    if slot is None:
        free = [candidate for candidate in range(1, MAX_LINKS + 1) if candidate not in links]
        if not free:
            raise ArchiveError(
                f"archive {archive.name!r} already links {MAX_LINKS} PACS, the maximum "
                f"({_describe_links(links)}): unlink one with 'pacsbridge archives unlink "
                f"{archive.name!r} --slot N' first"
            )
        return free[0]
    if not 1 <= slot <= MAX_LINKS:
        raise ArchiveError(f"slot {slot} is invalid: use a slot from 1 to {MAX_LINKS}")
    if slot in links:
        raise ArchiveError(
            f"slot {slot} of archive {archive.name!r} is taken by connection "
            f"{links[slot].connection.name!r}: choose a free slot or unlink slot {slot} first"
        )
    return slot


def unlink(
    session: Session,
    archive_name: str,
    slot: int,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> tuple[ArchiveLink, int]:
    """Remove the link in `slot` and cancel the archive's waiting deliveries to that PACS.

    Returns the removed link and the number of deliveries cancelled. Deliveries
    already stored or being sent keep their state.
    """
    archive = get_archive(session, archive_name, organization=organization)
    link = next((link for link in archive.links if link.slot == slot), None)
    if link is None:
        raise ArchiveError(
            f"slot {slot} of archive {archive.name!r} has no link ({_describe_links(_slots(archive))}): "
            "give the slot of a linked PACS"
        )
    connection = link.connection
    cancelled = _cancel_waiting_deliveries(session, archive, connection, actor)

    details = _link_details(archive, link, connection)
    details["cancelled_deliveries"] = cancelled
    session.delete(link)
    session.flush()
    session.refresh(archive, ["links"])
    record_audit_event(session, archive.organization_id, "archive.unlink", actor, details)
    LOGGER.info(
        "Unlinked connection id=%d from archive id=%d slot=%d, cancelled %d deliveries",
        connection.id,
        archive.id,
        slot,
        cancelled,
    )
    return link, cancelled


def delete_connection(
    session: Session,
    name: str,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> ConnectionRecord:
    """Delete the connection `name` with its client certificates, when nothing refers to it.

    Raises ConnectionNotFoundError, or ArchiveError while an archive links the
    connection or deliveries to it are on record: the delivery history keeps the
    connection it was sent to.
    """
    connection = get_connection(session, name, organization=organization)
    links = session.execute(
        select(Archive.name, ArchiveLink.slot)
        .join(Archive, Archive.id == ArchiveLink.archive_id)
        .where(ArchiveLink.connection_id == connection.id)
        .order_by(Archive.name)
    ).all()
    if links:
        described = ", ".join(f"{archive!r} slot {slot}" for archive, slot in links)
        raise ArchiveError(
            f"connection {connection.name!r} is linked to archive {described}: unlink it first with "
            "'pacsbridge archives unlink ARCHIVE --slot N'"
        )
    deliveries = session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.connection_id == connection.id)
    )
    if deliveries:
        raise ArchiveError(
            f"connection {connection.name!r} has {deliveries} {'delivery' if deliveries == 1 else 'deliveries'} "
            "on record, and the delivery history keeps "
            "the connection each instance was sent to: it cannot be deleted. Unlinking it from every archive "
            "already stops all forwarding to it"
        )
    session.execute(delete(DestinationHealth).where(DestinationHealth.connection_id == connection.id))
    record_audit_event(
        session,
        connection.organization_id,
        "connection.delete",
        actor,
        {"connection": connection.name, "connection_id": connection.id, "kind": connection.kind.value},
    )
    session.delete(connection)
    session.flush()
    LOGGER.info("Deleted connection id=%d", connection.id)
    return connection


def _cancel_waiting_deliveries(session: Session, archive: Archive, connection: ConnectionRecord, actor: str) -> int:
    deliveries = session.scalars(
        select(Delivery)
        .join(Study, Study.id == Delivery.study_id)
        .where(
            Study.archive_id == archive.id,
            Delivery.connection_id == connection.id,
            Delivery.state.in_(CANCELLED_ON_UNLINK),
        )
    ).all()
    now = utc_now()
    for delivery in deliveries:
        delivery.state = DeliveryState.CANCELLED
        delivery.reason = f"the PACS was unlinked from archive {archive.name!r} by {actor}"
        delivery.next_attempt_at = now
        delivery.updated_at = now
    return len(deliveries)


def _slots(archive: Archive) -> dict[int, ArchiveLink]:
    return {link.slot: link for link in archive.links}


def _describe_links(links: dict[int, ArchiveLink]) -> str:
    if not links:
        return "no PACS linked"
    return ", ".join(f"slot {slot}: {links[slot].connection.name!r}" for slot in sorted(links))


def _link_details(archive: Archive, link: ArchiveLink, connection: ConnectionRecord) -> dict[str, object]:
    return {
        "archive_id": archive.id,
        "archive": archive.name,
        "slot": link.slot,
        "connection_id": connection.id,
        "connection": connection.name,
    }


def record_audit_event(
    session: Session, organization_id: int, action: str, actor: str, details: dict[str, object]
) -> None:
    """Add an AuditEvent. `details` contains ids, names and counts, and must not contain patient data."""
    details = {**details, "actor": actor}
    session.add(
        AuditEvent(
            organization_id=organization_id,
            action=action,
            actor=actor,
            details=details,
            created_at=utc_now(),
        )
    )
    session.flush()


# Delivery rules -----------------------------------------------------------------


def blocking_reason(study: Study, connection: ConnectionRecord) -> str | None:
    """Return why the instances of `study` must not be sent to `connection` now, or None when they may be.

    Real studies need TLS and a connection that is not test-only; test data may
    go anywhere.
    """
    if study.is_test:
        return None
    if connection.tls_mode == TlsMode.INACTIVE:
        return unsecured_reason(connection.name)
    if connection.test_only:
        return (
            f"connection {connection.name!r} is test-only and this study is not test data: "
            "link a PACS for real studies, or turn off test-only on the connection"
        )
    return None


def new_delivery(instance: Instance, study: Study, connection: ConnectionRecord) -> Delivery:
    """Build the outbox row of `instance` towards `connection`: queued, or needs-attention when blocked."""
    now = utc_now()
    reason = blocking_reason(study, connection)
    return Delivery(
        instance_id=instance.id,
        connection_id=connection.id,
        study_id=study.id,
        state=DeliveryState.QUEUED if reason is None else DeliveryState.NEEDS_ATTENTION,
        attempts=0,
        first_queued_at=now,
        next_attempt_at=now,
        reason=reason,
        created_at=now,
        updated_at=now,
    )


def _requeue(delivery: Delivery, study: Study, connection: ConnectionRecord) -> None:
    now = utc_now()
    reason = blocking_reason(study, connection)
    delivery.state = DeliveryState.QUEUED if reason is None else DeliveryState.NEEDS_ATTENTION
    delivery.reason = reason
    delivery.first_queued_at = now
    delivery.next_attempt_at = now
    delivery.lease_owner = None
    delivery.lease_expires_at = None
    delivery.status_code = None
    delivery.warning_text = None
    delivery.last_error = None
    delivery.sent_transfer_syntax = None
    delivery.updated_at = now


# Resend -------------------------------------------------------------------------


@dataclass
class ResendResult:
    """Counts of the deliveries that `resend_study` created, reset or left unchanged, per linked PACS name."""

    study: Study
    # Deliveries created, whatever state they start in.
    created: Counter[str] = field(default_factory=Counter)
    # Deliveries put back into the queue.
    reset: Counter[str] = field(default_factory=Counter)
    # Existing deliveries that a delivery rule sent straight back to needs-attention, so they are not queued.
    needs_attention_again: Counter[str] = field(default_factory=Counter)
    # Deliveries left as they were because they are queued, being sent, retrying or held.
    unchanged: Counter[str] = field(default_factory=Counter)
    # Reasons of the deliveries that ended up in needs-attention, per PACS name.
    blocked: dict[str, str] = field(default_factory=dict)

    def describe(self, name: str) -> str:
        """Return one line on what happened to the deliveries to the PACS `name`, for `studies resend`."""
        created = self.created[name]
        parts = [
            f"{created} {'delivery' if created == 1 else 'deliveries'} created",
            f"{self.reset[name]} queued again",
        ]
        blocked = self.needs_attention_again[name]
        if blocked:
            verb = "needs" if blocked == 1 else "need"
            parts.append(f"{blocked} {verb} attention again ({self.blocked.get(name, 'no reason recorded')})")
        parts.append(f"{self.unchanged[name]} left as they are (still queued, sending, retrying or held)")
        return ", ".join(parts)


def find_study(session: Session, study_instance_uid: str, *, organization: str = DEFAULT_ORGANIZATION) -> Study | None:
    owner = find_organization(session, organization)
    if owner is None:
        return None
    return session.scalar(
        select(Study).where(Study.organization_id == owner.id, Study.study_instance_uid == study_instance_uid)
    )


def resend_study(
    session: Session,
    study_instance_uid: str,
    *,
    connection_name: str | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> ResendResult:
    """Queue the study again for every linked PACS, or only for `connection_name`, which must be linked.

    Creates the deliveries that are missing, for example for a PACS linked
    after the upload. Puts stored, failed, cancelled and needs-attention
    deliveries back into the queue with a new `first_queued_at`, and keeps their
    attempt counter and history. Instances in state needs-attention (a conflicting second version) are
    never queued. The delivery rules of `blocking_reason` apply again, so an
    unsecured PACS still gets real studies as needs-attention.
    """
    study = find_study(session, study_instance_uid.strip(), organization=organization)
    if study is None:
        raise StudyNotFoundError(
            f"study {study_instance_uid!r} not found in organization {organization!r}: "
            "check the Study Instance UID with 'pacsbridge studies list'"
        )
    links = study.archive.links
    if connection_name is not None:
        connection = get_connection(session, connection_name, organization=organization)
        links = [link for link in links if link.connection_id == connection.id]
        if not links:
            raise ArchiveError(
                f"connection {connection.name!r} is not linked to archive {study.archive.name!r} "
                f"({_describe_links(_slots(study.archive))}): link it first or name a linked PACS"
            )
    if not links:
        raise ArchiveError(
            f"archive {study.archive.name!r} has no linked PACS, so there is nothing to resend to: "
            f"link one with 'pacsbridge archives link {study.archive.name!r} CONNECTION'"
        )

    result = ResendResult(study=study)
    instances = [instance for instance in study.instances if instance.state == InstanceState.OK]
    for link in links:
        _resend_to(session, study, instances, link.connection, result)
    session.flush()

    record_audit_event(
        session,
        study.organization_id,
        "study.resend",
        actor,
        {
            "study_id": study.id,
            "study_instance_uid": study.study_instance_uid,
            "archive_id": study.archive_id,
            "connection_ids": [link.connection_id for link in links],
            "created": sum(result.created.values()),
            "reset": sum(result.reset.values()),
            "needs_attention_again": sum(result.needs_attention_again.values()),
            "unchanged": sum(result.unchanged.values()),
        },
    )
    LOGGER.info(
        "Resent study id=%d: %d deliveries created, %d reset, %d need attention again, %d left unchanged",
        study.id,
        sum(result.created.values()),
        sum(result.reset.values()),
        sum(result.needs_attention_again.values()),
        sum(result.unchanged.values()),
    )
    return result


def _resend_to(
    session: Session,
    study: Study,
    instances: list[Instance],
    connection: ConnectionRecord,
    result: ResendResult,
) -> None:
    existing = {
        delivery.instance_id: delivery
        for delivery in session.scalars(
            select(Delivery).where(Delivery.study_id == study.id, Delivery.connection_id == connection.id)
        )
    }
    for instance in instances:
        delivery = existing.get(instance.id)
        if delivery is None:
            delivery = new_delivery(instance, study, connection)
            session.add(delivery)
            result.created[connection.name] += 1
        elif delivery.state in RESENDABLE_STATES:
            _requeue(delivery, study, connection)
            if delivery.state == DeliveryState.NEEDS_ATTENTION:
                result.needs_attention_again[connection.name] += 1
            else:
                result.reset[connection.name] += 1
        else:
            result.unchanged[connection.name] += 1
            continue
        if delivery.state == DeliveryState.NEEDS_ATTENTION and delivery.reason:
            result.blocked[connection.name] = delivery.reason


# Study summaries ------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationSummary:
    """The deliveries of one study to one PACS: counts per delivery state and the overall state."""

    connection_id: int
    connection: str
    linked: bool
    counts: dict[str, int]
    # A `pacsbridge.forward.progress.Progress` value, such as "delivered" or "held (needs release)".
    state: str


@dataclass(frozen=True)
class StudySummary:
    study: Study
    instance_count: int
    # Instances in state needs-attention: a second version of a stored SOP Instance UID.
    conflicting_instances: int
    destinations: list[DestinationSummary]


def destination_state(counts: Counter[DeliveryState]) -> str:
    """Return the overall state of one study towards one PACS from its delivery counts.

    The rules are those of `pacsbridge.forward.progress`, which `pacsbridge deliveries` uses too.
    """
    return summarize_progress(counts.elements()).value


def summarize_studies(
    session: Session, *, archive_name: str | None = None, organization: str = DEFAULT_ORGANIZATION
) -> list[StudySummary]:
    """Return the organization's studies, or those of one archive, newest first, with per-PACS delivery counts."""
    owner = find_organization(session, organization)
    if owner is None:
        if archive_name is not None:
            raise ArchiveNotFoundError(archive_name, organization, [])
        return []
    query = select(Study).where(Study.organization_id == owner.id)
    if archive_name is not None:
        query = query.where(Study.archive_id == get_archive(session, archive_name, organization=organization).id)
    studies = session.scalars(query.order_by(Study.created_at.desc(), Study.id.desc())).all()
    return [_summarize(session, study) for study in studies]


def _summarize(session: Session, study: Study) -> StudySummary:
    rows = session.execute(select(Delivery.connection_id, Delivery.state).where(Delivery.study_id == study.id)).all()
    counts: dict[int, Counter[DeliveryState]] = {}
    for connection_id, state in rows:
        counts.setdefault(connection_id, Counter())[state] += 1

    linked = {link.connection_id: link.connection for link in study.archive.links}
    connection_ids = list(linked) + sorted(set(counts) - set(linked))
    destinations = []
    for connection_id in connection_ids:
        connection = linked.get(connection_id) or session.get(ConnectionRecord, connection_id)
        assert connection is not None, "deliveries refer to connections by a RESTRICT foreign key"
        per_state = counts.get(connection_id, Counter())
        destinations.append(
            DestinationSummary(
                connection_id=connection_id,
                connection=connection.name,
                linked=connection_id in linked,
                counts={state.value: per_state[state] for state in DeliveryState if per_state[state]},
                state=destination_state(per_state),
            )
        )
    conflicting = sum(1 for instance in study.instances if instance.state == InstanceState.NEEDS_ATTENTION)
    return StudySummary(
        study=study,
        instance_count=len(study.instances),
        conflicting_instances=conflicting,
        destinations=destinations,
    )
