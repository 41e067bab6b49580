"""Store, read and change connections, validating them before anything is written.

These functions never commit: the caller owns the transaction, for example
`with sessions.begin() as session: save_connection(session, settings)`.
Connection names are stored in Unicode normalization form NFC and looked up
the same way, so a name typed with combining accents finds the stored one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import unicodedata
from collections.abc import Mapping

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacsbridge.connections import (
    Compression,
    ConnectionKind,
    ConnectionSettings,
    InvalidSettingsError,
    MonochromeMode,
    Problem,
    ScuAuthentication,
    Severity,
    TlsMode,
    ValidationReport,
    validate_settings,
)
from pacsbridge.connections.settings import normalize_fingerprint
from pacsbridge.db.models import NAME_MAX_LENGTH, ConnectionRecord, Organization, utc_now

LOGGER = logging.getLogger(__name__)

DEFAULT_ORGANIZATION = "default"
SETTINGS_FIELDS = tuple(field.name for field in dataclasses.fields(ConnectionSettings))

# Unicode categories that break a name across lines or make it unprintable:
# control characters, line separators and paragraph separators.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


class ConnectionNotFoundError(LookupError):
    """Raised when no connection of the organization has the requested name."""

    def __init__(self, name: str, organization: str, known_names: list[str]) -> None:
        self.name = name
        self.organization = organization
        self.known_names = known_names
        if known_names:
            hint = "Known connections: " + ", ".join(repr(known) for known in known_names) + "."
        else:
            hint = "No connections are stored yet."
        super().__init__(f"connection {name!r} not found in organization {organization!r}. {hint}")


def normalize_name(name: str) -> str:
    """Return `name` in Unicode normalization form NFC, the form names are stored in."""
    return unicodedata.normalize("NFC", name)


def find_organization(session: Session, name: str = DEFAULT_ORGANIZATION) -> Organization | None:
    """Return the organization called `name`, or None if it does not exist yet."""
    return session.scalar(select(Organization).where(Organization.name == name))


def get_or_create_organization(session: Session, name: str = DEFAULT_ORGANIZATION) -> Organization:
    """Return the organization called `name`, creating it on first use."""
    organization = find_organization(session, name)
    if organization is not None:
        return organization

    organization = Organization(name=name, created_at=utc_now())
    try:
        with session.begin_nested():
            session.add(organization)
    except IntegrityError:
        # Another process created it between the SELECT and the INSERT.
        existing = find_organization(session, name)
        if existing is None:
            raise
        return existing
    LOGGER.info("Created organization id=%d", organization.id)
    return organization


def find_connection(
    session: Session, name: str, *, organization: str = DEFAULT_ORGANIZATION
) -> ConnectionRecord | None:
    """Return the connection called `name`, or None if the organization has none of that name."""
    owner = find_organization(session, organization)
    if owner is None:
        return None
    return session.scalar(
        select(ConnectionRecord).where(
            ConnectionRecord.organization_id == owner.id,
            ConnectionRecord.name == normalize_name(name),
        )
    )


def get_connection(session: Session, name: str, *, organization: str = DEFAULT_ORGANIZATION) -> ConnectionRecord:
    """Return the connection called `name`.

    Raises ConnectionNotFoundError, which lists the known names, when there is none.
    """
    record = find_connection(session, name, organization=organization)
    if record is None:
        known = [known.name for known in list_connections(session, organization=organization)]
        raise ConnectionNotFoundError(name, organization, known)
    return record


def list_connections(
    session: Session,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    kind: ConnectionKind | None = None,
) -> list[ConnectionRecord]:
    """Return the organization's connections, optionally of one kind, sorted by name."""
    owner = find_organization(session, organization)
    if owner is None:
        return []
    query = select(ConnectionRecord).where(ConnectionRecord.organization_id == owner.id)
    if kind is not None:
        query = query.where(ConnectionRecord.kind == kind)
    records = session.scalars(query).all()
    # Sorted here because SQLite and PostgreSQL collations order names differently.
    return sorted(records, key=lambda record: (record.name.casefold(), record.name))


def get_worklist_connection(
    session: Session, *, organization: str = DEFAULT_ORGANIZATION
) -> ConnectionRecord | None:
    """Return the organization's Modality Worklist connection, or None if it has none."""
    worklists = list_connections(session, organization=organization, kind=ConnectionKind.MWL)
    return worklists[0] if worklists else None


def to_settings(record: ConnectionRecord) -> ConnectionSettings:
    """Convert a stored connection to the settings it was saved from."""
    values = {name: copy.deepcopy(getattr(record, name)) for name in SETTINGS_FIELDS}
    return ConnectionSettings(**values)


def check_connection(
    session: Session,
    settings: ConnectionSettings,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    existing: ConnectionRecord | None = None,
) -> ValidationReport:
    """Validate `settings` and check that they fit the database and the organization's other connections.

    `existing` is the stored connection that `settings` would replace, if any.
    """
    problems = list(validate_settings(settings).problems)
    fields_with_errors = {problem.field for problem in problems if problem.severity == Severity.ERROR}
    problems += [problem for problem in check_storable(settings) if problem.field not in fields_with_errors]
    problems += _check_conflicts(session, settings, organization, existing)
    return ValidationReport(problems)


def check_storable(settings: ConnectionSettings) -> list[Problem]:
    """Check the storage limits that `validate_settings` does not cover: lengths, characters, JSON filters."""
    problems = _check_name(settings.name)
    for field in SETTINGS_FIELDS:
        value = getattr(settings, field)
        if field != "name" and isinstance(value, str):
            problems += _check_text_column(field, value)
    problems += _check_worklist_filters(settings.worklist_filters)
    if settings.kind == ConnectionKind.PACS and settings.worklist_filters:
        problems.append(
            Problem.warning(
                "worklist_filters",
                settings.worklist_filters,
                "are ignored, because they apply only to worklist (mwl) connections and this is a PACS connection",
                "Remove --worklist-filters, or set them on the organization's worklist connection.",
            )
        )
    if settings.kind == ConnectionKind.MWL and not any(p.severity == Severity.ERROR for p in problems):
        # Imported here because pacsbridge.dicomnet imports this package's callers.
        from pacsbridge.dicomnet.worklist_filters import check_worklist_filters

        problems += check_worklist_filters(
            settings.worklist_filters, settings.calling_ae_title, settings.character_set
        )
    return problems


def _check_text_column(field: str, value: str) -> list[Problem]:
    problem_field, shown_value = field, value
    if field == "scp_certificate_pem":
        # Same field name as the validator uses, and the PEM text is never echoed.
        problem_field, shown_value = "scp_certificate", "(not shown)"
    if "\x00" in value:
        # PostgreSQL rejects NUL characters in text columns.
        return [Problem.error(problem_field, shown_value, "contains a NUL character", "Remove it.")]
    column_type = ConnectionRecord.__table__.c[field].type
    if isinstance(column_type, String) and column_type.length is not None and len(value) > column_type.length:
        return [
            Problem.error(
                problem_field,
                shown_value,
                f"has {len(value)} characters, more than the {column_type.length} that can be stored",
                "Shorten it.",
            )
        ]
    return []


def _check_name(name: object) -> list[Problem]:
    if not isinstance(name, str) or not name.strip():
        return []  # validate_settings reports empty names.
    normalized = normalize_name(name)
    if len(normalized) > NAME_MAX_LENGTH:
        return [
            Problem.error(
                "name",
                name,
                f"has {len(normalized)} characters, more than the {NAME_MAX_LENGTH} that can be stored",
                "Shorten it.",
            )
        ]
    if any(unicodedata.category(character) in _UNPRINTABLE_CATEGORIES for character in normalized):
        return [
            Problem.error(
                "name",
                name,
                "contains a control character or line break",
                "Use a name on one line with printable characters only.",
            )
        ]
    if name != name.strip():
        return [
            Problem.warning(
                "name",
                name,
                "has leading or trailing spaces, which are easy to miss when typing the name",
                "Remove them unless they are intended.",
            )
        ]
    return []


def _check_worklist_filters(filters: object) -> list[Problem]:
    fix = "Use a JSON object with text keys, for example {\"modality\": \"US\"}."
    if not isinstance(filters, Mapping) or not all(isinstance(key, str) for key in filters):
        return [Problem.error("worklist_filters", filters, "is not an object with text keys", fix)]
    try:
        json.dumps(filters, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return [Problem.error("worklist_filters", filters, f"cannot be stored as JSON ({exc})", fix)]
    return []


def _check_conflicts(
    session: Session,
    settings: ConnectionSettings,
    organization: str,
    existing: ConnectionRecord | None,
) -> list[Problem]:
    owner = find_organization(session, organization)
    if owner is None:
        return []
    existing_id = existing.id if existing is not None else None
    problems: list[Problem] = []

    if isinstance(settings.name, str) and settings.name.strip():
        namesake = find_connection(session, settings.name, organization=organization)
        if namesake is not None and namesake.id != existing_id:
            problems.append(
                Problem.error(
                    "name",
                    settings.name,
                    f"is already used by another connection of organization {organization!r}",
                    "Choose another name, or edit the existing connection.",
                )
            )

    if settings.kind == ConnectionKind.MWL:
        worklist = get_worklist_connection(session, organization=organization)
        if worklist is not None and worklist.id != existing_id:
            problems.append(
                Problem.error(
                    "kind",
                    str(settings.kind),
                    f"is rejected because organization {organization!r} already has a Modality Worklist "
                    f"connection, {worklist.name!r}",
                    f"An organization queries one worklist only: edit {worklist.name!r} instead.",
                )
            )
    return problems


def _normalize(settings: ConnectionSettings) -> ConnectionSettings:
    """Convert validated settings to the types stored: enums, int port, float timeouts, NFC name."""
    return settings.replace(
        name=normalize_name(settings.name),
        kind=ConnectionKind(settings.kind),
        port=int(settings.port),
        tls_mode=TlsMode(settings.tls_mode),
        scp_certificate_pem=settings.scp_certificate_pem or None,
        # Validation accepted the colon form too, and pins are stored as 64 lower-case hex digits.
        pinned_fingerprint=normalize_fingerprint(settings.pinned_fingerprint),
        scu_authentication=ScuAuthentication(settings.scu_authentication),
        image_compression=Compression(settings.image_compression),
        loop_compression=Compression(settings.loop_compression),
        jpeg_quality=int(str(settings.jpeg_quality).strip()),
        monochrome=MonochromeMode(settings.monochrome),
        acse_timeout=float(settings.acse_timeout),
        dimse_timeout=float(settings.dimse_timeout),
        connection_timeout=float(settings.connection_timeout),
        test_only=bool(settings.test_only),
        worklist_filters=copy.deepcopy(dict(settings.worklist_filters)),
    )


def save_connection(
    session: Session,
    settings: ConnectionSettings,
    *,
    organization: str = DEFAULT_ORGANIZATION,
) -> tuple[ConnectionRecord, ValidationReport]:
    """Validate `settings` and add them as a new connection of `organization`.

    Returns the new record and the report, whose warnings the caller should
    show. Raises InvalidSettingsError with every error found, including a
    duplicate name or a second worklist, and then writes nothing.
    """
    report = check_connection(session, settings, organization=organization)
    report.raise_for_errors()

    normalized = _normalize(settings)
    owner = get_or_create_organization(session, organization)
    now = utc_now()
    record = ConnectionRecord(organization_id=owner.id, created_at=now, updated_at=now)
    _write(session, record, normalized, organization, existing=None)
    LOGGER.info(
        "Saved connection id=%d kind=%s organization id=%d", record.id, record.kind.value, owner.id
    )
    return record, report


def update_connection(
    session: Session,
    name: str,
    /,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    **changes: object,
) -> tuple[ConnectionRecord, ValidationReport]:
    """Change the given fields of the connection called `name`.

    The keyword names are `ConnectionSettings` fields. `session` and `name` are
    positional-only, so `name=...` renames the connection.
    The merged settings are validated as in `save_connection`, and nothing
    changes when they have errors. Raises ConnectionNotFoundError for an
    unknown name and TypeError for an unknown field. A change of the endpoint
    (host, port, AE titles, TLS settings) puts the connection's queued and
    retrying deliveries on hold (see `pacsbridge.forward.holds`).
    """
    unknown = sorted(set(changes) - set(SETTINGS_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown connection fields {unknown}: use the ConnectionSettings fields {list(SETTINGS_FIELDS)}"
        )

    record = get_connection(session, name, organization=organization)
    merged = to_settings(record).replace(**changes)
    report = check_connection(session, merged, organization=organization, existing=record)
    report.raise_for_errors()

    normalized = _normalize(merged)
    changed = [field for field in SETTINGS_FIELDS if getattr(record, field) != getattr(normalized, field)]
    if changed:
        # Imported here because pacsbridge.forward imports this package.
        from pacsbridge.forward.holds import endpoint_snapshot, hold_deliveries_on_change

        endpoint_before = endpoint_snapshot(record)
        _write(session, record, normalized, organization, existing=record)
        LOGGER.info("Updated connection id=%d fields=%s", record.id, ",".join(changed))
        hold_deliveries_on_change(session, record, endpoint_before)
    return record, report


def _write(
    session: Session,
    record: ConnectionRecord,
    settings: ConnectionSettings,
    organization: str,
    existing: ConnectionRecord | None,
) -> None:
    """Copy `settings` into `record` and flush it inside a savepoint.

    A concurrent writer can still take the name or the worklist slot between
    the checks and this flush. The unique indexes then reject the row, the
    savepoint is rolled back (which restores an existing record) and the
    conflict is reported like any other error.
    """
    try:
        with session.begin_nested():
            for field in SETTINGS_FIELDS:
                setattr(record, field, getattr(settings, field))
            if existing is not None:
                record.updated_at = utc_now()
            session.add(record)
    except IntegrityError:
        conflicts = _check_conflicts(session, settings, organization, existing)
        if conflicts:
            raise InvalidSettingsError(conflicts) from None
        raise
