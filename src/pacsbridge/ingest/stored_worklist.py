"""Query the organization's Modality Worklist connection with its stored filters, timeouts and TLS settings.

Loading runs inside the caller's database transaction, and querying runs
after it, so a slow worklist server holds no database lock:

    with sessions.begin() as session:
        worklist = load_stored_worklist(session)
    query = worklist.build_query(patient_name="SMITH*")
    result = query_stored_worklist(worklist, query)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from sqlalchemy.orm import Session

from pacsbridge.connections import ConnectionKind, ConnectionSettings
from pacsbridge.db import (
    DEFAULT_ORGANIZATION,
    find_connection,
    get_worklist_connection,
    to_settings,
)
from pacsbridge.dicomnet.worklist import (
    DEFAULT_MAX_ITEMS,
    WorklistQuery,
    WorklistResult,
    query_worklist,
)
from pacsbridge.dicomnet.worklist_filters import (
    WorklistFilters,
    build_stored_query,
    parse_worklist_filters,
)
from pacsbridge.tls.client_ca import ClientIdentity
from pacsbridge.tls.endpoints import prepare_client_identity, stored_endpoint
from pacsbridge.tls.secret_key import SecretKey

NOT_CONFIGURED_MESSAGE = (
    "no Modality Worklist connection is configured for this organization: "
    "add one with 'pacsbridge connections add NAME --kind mwl ...'"
)


class WorklistNotConfiguredError(LookupError):
    """Raised when the organization has no Modality Worklist connection."""

    def __init__(self) -> None:
        super().__init__(NOT_CONFIGURED_MESSAGE)


class NotTheWorklistError(LookupError):
    """Raised when a connection name given for the worklist is not the organization's worklist connection."""


@dataclass(frozen=True)
class StoredWorklist:
    """A worklist connection ready for querying: its settings, parsed filters and client certificate."""

    settings: ConnectionSettings
    filters: WorklistFilters
    identity: ClientIdentity | None

    def build_query(
        self,
        *,
        patient_name: str | None = None,
        patient_id: str | None = None,
        now: datetime.datetime | None = None,
    ) -> WorklistQuery:
        """Return the query of the stored filters plus the patient patterns, dated from `now` (default: now)."""
        return build_stored_query(
            self.settings, self.filters, patient_name=patient_name, patient_id=patient_id, now=now
        )


def load_stored_worklist(
    session: Session,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    name: str | None = None,
    secret_key: SecretKey | None = None,
) -> StoredWorklist:
    """Load the organization's worklist connection and decrypt its client certificate, if it uses one.

    `name`, when given, must be the name of that connection. Raises
    WorklistNotConfiguredError, NotTheWorklistError, InvalidSettingsError for
    invalid stored filters, and SecretKeyError or ClientCertificateError when
    the client certificate cannot be loaded.
    """
    record = get_worklist_connection(session, organization=organization)
    if record is None:
        raise WorklistNotConfiguredError()
    if name is not None:
        named = find_connection(session, name, organization=organization)
        if named is None or named.id != record.id:
            if named is not None and named.kind != ConnectionKind.MWL:
                reason = f"connection {name!r} is a {named.kind.value} connection, not a Modality Worklist"
            else:
                reason = f"connection {name!r} not found"
            raise NotTheWorklistError(
                f"{reason}: the organization's Modality Worklist connection is {record.name!r}"
            )

    settings = to_settings(record)
    filters = parse_worklist_filters(settings.worklist_filters, settings.calling_ae_title, settings.character_set)
    identity = prepare_client_identity(session, record, secret_key)
    return StoredWorklist(settings, filters, identity)


def query_stored_worklist(
    worklist: StoredWorklist,
    query: WorklistQuery,
    *,
    bind_address: str | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    keep_responses: bool = False,
) -> WorklistResult:
    """Run `query` (see `StoredWorklist.build_query`) with the connection's endpoint, TLS and timeouts.

    Response text without a Specific Character Set is decoded with the
    connection's character set. In encryption-only TLS mode the query needs a
    confirmed fingerprint, because it sends and receives patient data.
    Raises as `query_worklist` does.
    """
    settings = worklist.settings
    with stored_endpoint(settings, worklist.identity, bind_address=bind_address, require_pin=True) as endpoint:
        result = query_worklist(
            endpoint,
            query,
            fallback_character_set=settings.character_set,
            max_items=max_items,
            keep_responses=keep_responses,
        )
    return result
