"""Archives and their PACS links: names, slots, the link rules and the audit events they write."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import load_config
from pacsbridge.db import ConnectionNotFoundError, close_database, open_database
from pacsbridge.db.forwarding import AuditEvent, DeliveryState
from pacsbridge.ingest.archives import (
    ArchiveError,
    ArchiveNotFoundError,
    create_archive,
    destination_state,
    get_archive,
    link_pacs,
    list_archives,
    unlink,
)
from test_ingest_upload import ACTOR, add_pacs, add_worklist


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    factory = open_database(load_config(tmp_path / "data", environ={}))
    yield factory
    close_database(factory)


@pytest.fixture
def connections(sessions: sessionmaker[Session]) -> list[str]:
    names = ["PACS A", "PACS B", "PACS C", "PACS D"]
    with sessions.begin() as session:
        for name in names:
            add_pacs(session, name)
        add_worklist(session, "Worklist")
        create_archive(session, "Cardiology", actor=ACTOR)
    return names


def slots(sessions: sessionmaker[Session], archive: str = "Cardiology") -> dict[int, str]:
    with sessions.begin() as session:
        return {link.slot: link.connection.name for link in get_archive(session, archive).links}


def audit_events(sessions: sessionmaker[Session], action: str) -> list[tuple[str, dict]]:
    with sessions.begin() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        return [(event.actor, event.details) for event in events]


# Archives --------------------------------------------------------------------------


def test_create_archive_stores_flags(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)
        create_archive(session, "Sandbox", is_test=True, actor=ACTOR)

    with sessions.begin() as session:
        archives = [(archive.name, archive.is_test) for archive in list_archives(session)]
    assert archives == [("Cardiology", False), ("Sandbox", True)]
    assert [details["archive"] for _, details in audit_events(sessions, "archive.create")] == ["Cardiology", "Sandbox"]


def test_create_archive_duplicate_name_rejected(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveError, match="'Cardiology' is already used"):
        create_archive(session, "Cardiology", actor=ACTOR)


def test_create_archive_same_name_other_organization(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)
        create_archive(session, "Cardiology", organization="clinic-2", actor=ACTOR)

    with sessions.begin() as session:
        assert [archive.name for archive in list_archives(session, organization="clinic-2")] == ["Cardiology"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (" Cardiology", "leading or trailing spaces"),
        ("Cardio\nlogy", "control character"),
        ("x" * 201, "more than the 200"),
    ],
)
def test_create_archive_invalid_name_rejected(sessions: sessionmaker[Session], name: str, message: str) -> None:
    with sessions.begin() as session, pytest.raises(ArchiveError, match=message):
        create_archive(session, name, actor=ACTOR)


def test_archive_name_found_in_nfc(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        create_archive(session, "Kardiologie Zu\u0308rich", actor=ACTOR)

    with sessions.begin() as session:
        assert get_archive(session, "Kardiologie Z\u00fcrich").name == "Kardiologie Z\u00fcrich"


def test_get_archive_unknown_lists_known(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveNotFoundError, match="Known archives: 'Cardiology'"):
        get_archive(session, "Radiology")


# Links -------------------------------------------------------------------------------


def test_link_takes_first_free_slot(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", slot=2, actor=ACTOR)
        link_pacs(session, "Cardiology", "PACS B", actor=ACTOR)
        link_pacs(session, "Cardiology", "PACS C", actor=ACTOR)

    assert slots(sessions) == {1: "PACS B", 2: "PACS A", 3: "PACS C"}


def test_link_fourth_rejected_naming_linked(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        for name in connections[:3]:
            link_pacs(session, "Cardiology", name, actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveError) as raised:
        link_pacs(session, "Cardiology", "PACS D", actor=ACTOR)

    message = str(raised.value)
    assert "already links 3 PACS" in message
    for slot, name in ((1, "PACS A"), (2, "PACS B"), (3, "PACS C")):
        assert f"slot {slot}: {name!r}" in message
    assert slots(sessions) == {1: "PACS A", 2: "PACS B", 3: "PACS C"}


def test_link_worklist_rejected(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session, pytest.raises(ArchiveError, match="Modality Worklist connection"):
        link_pacs(session, "Cardiology", "Worklist", actor=ACTOR)

    assert slots(sessions) == {}


def test_link_same_connection_twice_rejected(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveError, match="already linked .* in slot 1"):
        link_pacs(session, "Cardiology", "PACS A", slot=2, actor=ACTOR)


def test_link_taken_slot_rejected(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", slot=3, actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveError, match="slot 3 .* is taken by connection 'PACS A'"):
        link_pacs(session, "Cardiology", "PACS B", slot=3, actor=ACTOR)


@pytest.mark.parametrize("slot", [0, 4, -1])
def test_link_invalid_slot_rejected(sessions: sessionmaker[Session], connections: list[str], slot: int) -> None:
    with sessions.begin() as session, pytest.raises(ArchiveError, match=f"slot {slot} is invalid"):
        link_pacs(session, "Cardiology", "PACS A", slot=slot, actor=ACTOR)


def test_link_unknown_connection_raises(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session, pytest.raises(ConnectionNotFoundError):
        link_pacs(session, "Cardiology", "PACS Z", actor=ACTOR)


def test_link_connection_of_other_organization_not_found(
    sessions: sessionmaker[Session], connections: list[str]
) -> None:
    with sessions.begin() as session:
        create_archive(session, "Cardiology", organization="clinic-2", actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ConnectionNotFoundError):
        link_pacs(session, "Cardiology", "PACS A", organization="clinic-2", actor=ACTOR)


def test_unlink_frees_slot(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", actor=ACTOR)
        link_pacs(session, "Cardiology", "PACS B", actor=ACTOR)

    with sessions.begin() as session:
        removed, cancelled = unlink(session, "Cardiology", 1, actor=ACTOR)
        assert removed.connection.name == "PACS A"
        assert cancelled == 0
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS C", actor=ACTOR)

    assert slots(sessions) == {1: "PACS C", 2: "PACS B"}


def test_unlink_empty_slot_rejected(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", actor=ACTOR)

    with sessions.begin() as session, pytest.raises(ArchiveError, match="slot 2 .* has no link"):
        unlink(session, "Cardiology", 2, actor=ACTOR)


def test_link_changes_write_audit_events(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session:
        link_pacs(session, "Cardiology", "PACS A", actor="alice")
        link_pacs(session, "Cardiology", "PACS B", slot=3, actor="alice")
    with sessions.begin() as session:
        unlink(session, "Cardiology", 3, actor="bob")

    links = audit_events(sessions, "archive.link")
    unlinks = audit_events(sessions, "archive.unlink")
    assert [(actor, details["slot"], details["connection"]) for actor, details in links] == [
        ("alice", 1, "PACS A"),
        ("alice", 3, "PACS B"),
    ]
    assert len(unlinks) == 1
    actor, details = unlinks[0]
    assert actor == "bob"
    assert details["actor"] == "bob"
    assert details["slot"] == 3
    assert details["connection"] == "PACS B"
    assert details["archive"] == "Cardiology"
    assert isinstance(details["archive_id"], int)
    assert isinstance(details["connection_id"], int)
    assert details["cancelled_deliveries"] == 0


def test_rejected_link_writes_no_audit_event(sessions: sessionmaker[Session], connections: list[str]) -> None:
    with sessions.begin() as session, pytest.raises(ArchiveError):
        link_pacs(session, "Cardiology", "Worklist", actor=ACTOR)

    assert audit_events(sessions, "archive.link") == []


# Destination state -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({}, "not queued"),
        ({DeliveryState.STORED: 3}, "delivered"),
        ({DeliveryState.STORED: 2, DeliveryState.QUEUED: 1}, "in progress"),
        ({DeliveryState.FAILED: 1, DeliveryState.SENDING: 1}, "in progress"),
        ({DeliveryState.HELD: 1}, "held (needs release)"),
        ({DeliveryState.STORED: 2, DeliveryState.FAILED: 1}, "partial"),
        ({DeliveryState.NEEDS_ATTENTION: 1}, "needs attention"),
        ({DeliveryState.FAILED: 1, DeliveryState.CANCELLED: 1}, "failed"),
        ({DeliveryState.STORED: 2, DeliveryState.CANCELLED: 1}, "partial"),
        ({DeliveryState.CANCELLED: 2}, "cancelled"),
    ],
)
def test_destination_state_table(counts: dict[DeliveryState, int], expected: str) -> None:
    assert destination_state(Counter(counts)) == expected


def test_delete_connection_keeps_delivery_history(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    from forward_helpers import store_study, write_instances

    from pacsbridge.config import load_config
    from pacsbridge.ingest.archives import delete_connection
    from pacsbridge.ingest.blobstore import BlobStore

    blobs = BlobStore(load_config(tmp_path / "data", environ={}).blob_dir)
    with sessions.begin() as session:
        add_pacs(session, "Sent to")
        add_pacs(session, "Never used")
        create_archive(session, "Ward", is_test=True, actor=ACTOR)
        link_pacs(session, "Ward", "Sent to", actor=ACTOR)
        store_study(session, blobs, "Ward", write_instances(tmp_path / "study", 1))
        unlink(session, "Ward", 1, actor=ACTOR)

    with sessions.begin() as session:
        with pytest.raises(ArchiveError, match="has 1 delivery on record"):
            delete_connection(session, "Sent to", actor=ACTOR)
        delete_connection(session, "Never used", actor=ACTOR)
    with sessions.begin() as session:
        with pytest.raises(ConnectionNotFoundError):
            delete_connection(session, "Never used", actor=ACTOR)
    assert [details["connection"] for _, details in audit_events(sessions, "connection.delete")] == ["Never used"]
