"""Delivery status, admin actions, deliveries held after a connection change, and the `deliveries` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forward_helpers import (
    add_archive,
    add_pacs,
    delivery_states,
    open_test_database,
    store_study,
    write_instances,
)
from sqlalchemy import select
from typer.testing import CliRunner

from pacsbridge.cli.main import app
from pacsbridge.db import close_database, update_connection
from pacsbridge.db.forwarding import (
    AuditEvent,
    Delivery,
    DeliveryState,
    DestinationHealth,
    DestinationState,
)
from pacsbridge.forward.status import (
    DeliveryActionError,
    Progress,
    cancel,
    list_studies,
    release,
    retry_now,
    summarize,
)
from pacsbridge.ingest.blobstore import BlobStore

S = DeliveryState


@pytest.mark.parametrize(
    ("states", "progress"),
    [
        ([S.STORED, S.STORED], Progress.DELIVERED),
        ([S.STORED, S.CANCELLED], Progress.DELIVERED),
        ([S.STORED, S.RETRYING], Progress.PARTIAL),
        ([S.STORED, S.NEEDS_ATTENTION], Progress.PARTIAL),
        ([S.QUEUED, S.NEEDS_ATTENTION], Progress.IN_PROGRESS),
        ([S.HELD], Progress.IN_PROGRESS),
        ([S.FAILED, S.NEEDS_ATTENTION], Progress.FAILED),
        ([S.CANCELLED], Progress.CANCELLED),
    ],
)
def test_summarize_states(states, progress) -> None:
    assert summarize(states) == progress


@pytest.fixture
def data(tmp_path: Path):
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    with sessions.begin() as session:
        add_pacs(session, "PACS-A", 11112)
        add_pacs(session, "PACS-B", 11113)
        add_archive(session, "ward", ["PACS-A", "PACS-B"])
        store_study(session, blobs, "ward", write_instances(tmp_path / "study", 2))
    yield data_dir, sessions
    close_database(sessions)


def set_states(sessions, states: dict[int, DeliveryState]) -> None:
    with sessions.begin() as session:
        for delivery_id, state in states.items():
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.state = state
            row.reason = f"reason {delivery_id}"


def audit_actions(sessions) -> list[str]:
    with sessions.begin() as session:
        return [event.action for event in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_list_studies_groups_by_destination(data) -> None:
    _, sessions = data
    set_states(sessions, {1: S.STORED})
    with sessions.begin() as session:
        [study] = list_studies(session, archive="ward")
        assert list_studies(session, archive="other") == []
    by_destination = {entry["connection"]: entry for entry in study.as_dict()["destinations"]}
    assert study.progress == Progress.PARTIAL
    assert by_destination["PACS-A"]["progress"] == "partial"
    assert by_destination["PACS-A"]["stored"] == 1
    assert by_destination["PACS-A"]["total"] == 2


def test_retry_requeues_and_probes(data) -> None:
    _, sessions = data
    set_states(sessions, {1: S.NEEDS_ATTENTION, 2: S.FAILED, 3: S.RETRYING, 4: S.STORED})
    with sessions.begin() as session:
        session.add(DestinationHealth(connection_id=1, state=DestinationState.DOWN, consecutive_failures=3,
                                      next_probe_at=None))
    with sessions.begin() as session:
        result = retry_now(session)
    assert result.changed == [1, 2, 3]
    states = delivery_states(sessions)
    assert [states[i] for i in (1, 2, 3, 4)] == [S.QUEUED, S.QUEUED, S.QUEUED, S.STORED]
    with sessions.begin() as session:
        health = session.get(DestinationHealth, 1)
        assert health is not None
        assert health.next_probe_at is not None
        assert session.get(Delivery, 1).reason is None  # type: ignore[union-attr]
    assert audit_actions(sessions) == ["deliveries.retry"]


def test_retry_rejects_stored_and_unknown(data) -> None:
    _, sessions = data
    set_states(sessions, {1: S.STORED})
    with sessions.begin() as session:
        with pytest.raises(DeliveryActionError, match=r"cannot retry deliveries 1 \(stored\)"):
            retry_now(session, [1])
        with pytest.raises(DeliveryActionError, match="deliveries not found: 99"):
            retry_now(session, [2, 99])
    assert delivery_states(sessions)[2] == S.QUEUED


def test_cancel_and_refuse_sending(data) -> None:
    _, sessions = data
    set_states(sessions, {2: S.SENDING})
    with sessions.begin() as session:
        assert cancel(session, [1]).changed == [1]
        with pytest.raises(DeliveryActionError, match="being sent right now"):
            cancel(session, [2])
    assert delivery_states(sessions)[1] == S.CANCELLED


def test_connection_change_holds_and_release(data) -> None:
    _, sessions = data
    set_states(sessions, {1: S.STORED, 3: S.RETRYING})
    with sessions.begin() as session:
        update_connection(session, "PACS-A", host="127.0.0.2", port=4242)
    with sessions.begin() as session:
        rows = {row.id: row for row in session.scalars(select(Delivery))}
        event = session.scalars(select(AuditEvent)).one()
    connection_a = rows[1].connection_id
    held = sorted(i for i, row in rows.items() if row.state == S.HELD)
    assert held == sorted(i for i, row in rows.items() if row.connection_id == connection_a and i != 1)
    assert rows[1].state == S.STORED
    reason = rows[held[0]].reason
    assert reason == (
        "connection changed from host 127.0.0.1, port 11112 to host 127.0.0.2, port 4242: "
        "release to send to the new endpoint"
    )
    assert event.action == "connection.endpoint-changed"
    assert event.details["held_deliveries"] == len(held)

    with sessions.begin() as session:
        assert release(session).changed == held
    states = delivery_states(sessions)
    assert all(states[i] == S.QUEUED for i in held)


def test_rename_does_not_hold(data) -> None:
    _, sessions = data
    with sessions.begin() as session:
        update_connection(session, "PACS-A", name="PACS-A renamed", dimse_timeout=30.0)
    assert S.HELD not in delivery_states(sessions).values()
    assert audit_actions(sessions) == []


def test_deliveries_cli_lists_and_acts(data) -> None:
    data_dir, sessions = data
    set_states(sessions, {1: S.NEEDS_ATTENTION, 2: S.HELD})
    runner = CliRunner()

    listing = runner.invoke(app, ["deliveries", "--data-dir", str(data_dir)])
    assert listing.exit_code == 0, listing.output
    assert "(archive ward): in progress" in listing.output
    assert "needs-attention" in listing.output
    assert "reason 1" in listing.output

    as_json = runner.invoke(app, ["deliveries", "--archive", "ward", "--json", "--data-dir", str(data_dir)])
    assert as_json.exit_code == 0, as_json.output
    [study] = json.loads(as_json.output)["studies"]
    assert len(study["deliveries"]) == 4

    retry = runner.invoke(app, ["deliveries", "retry", "1", "--data-dir", str(data_dir)])
    assert retry.exit_code == 0, retry.output
    assert "Queued 1 deliveries: 1." in retry.output

    release_all = runner.invoke(app, ["deliveries", "release", "--all", "--data-dir", str(data_dir)])
    assert release_all.exit_code == 0, release_all.output
    assert "Released 1 deliveries: 2." in release_all.output

    cancelled = runner.invoke(app, ["deliveries", "cancel", "3", "--data-dir", str(data_dir)])
    assert cancelled.exit_code == 0, cancelled.output
    assert delivery_states(sessions) == {1: S.QUEUED, 2: S.QUEUED, 3: S.CANCELLED, 4: S.QUEUED}


def test_deliveries_cli_errors(data) -> None:
    data_dir, _ = data
    runner = CliRunner()
    nothing = runner.invoke(app, ["deliveries", "retry", "--data-dir", str(data_dir)])
    assert nothing.exit_code == 2
    assert "give their ids" in nothing.output
    unknown = runner.invoke(app, ["deliveries", "cancel", "42", "--data-dir", str(data_dir)])
    assert unknown.exit_code == 1
    assert "deliveries not found: 42" in unknown.output
    already = runner.invoke(app, ["deliveries", "release", "1", "--data-dir", str(data_dir)])
    assert already.exit_code == 0, already.output
    assert "Already queued: 1." in already.output
    stored = runner.invoke(app, ["deliveries", "retry", "--all", "2", "--data-dir", str(data_dir)])
    assert stored.exit_code == 2
    assert "not both" in stored.output
