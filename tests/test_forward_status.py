"""Delivery status, admin actions, deliveries held after a connection change, and the `deliveries` command."""

from __future__ import annotations

import datetime as dt
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
from typer.main import get_command
from typer.testing import CliRunner

from pacsbridge.cli.main import app
from pacsbridge.db import close_database, update_connection
from pacsbridge.db.forwarding import (
    AuditEvent,
    Delivery,
    DeliveryState,
    DestinationHealth,
    DestinationState,
    Instance,
    InstanceState,
)
from pacsbridge.db.models import utc_now
from pacsbridge.forward.status import (
    DeliveryActionError,
    Progress,
    cancel,
    list_studies,
    release,
    retry_now,
    summarize,
)
from pacsbridge.ingest.archives import summarize_studies
from pacsbridge.ingest.blobstore import BlobStore

S = DeliveryState


@pytest.mark.parametrize(
    ("states", "progress"),
    [
        ([], Progress.NOT_QUEUED),
        ([S.STORED, S.STORED], Progress.DELIVERED),
        ([S.STORED, S.CANCELLED], Progress.PARTIAL),
        ([S.STORED, S.FAILED], Progress.PARTIAL),
        ([S.STORED, S.NEEDS_ATTENTION], Progress.PARTIAL),
        ([S.STORED, S.RETRYING], Progress.IN_PROGRESS),
        ([S.QUEUED, S.NEEDS_ATTENTION], Progress.IN_PROGRESS),
        ([S.SENDING, S.HELD], Progress.IN_PROGRESS),
        ([S.HELD], Progress.HELD),
        ([S.STORED, S.HELD, S.NEEDS_ATTENTION], Progress.HELD),
        ([S.FAILED, S.NEEDS_ATTENTION], Progress.NEEDS_ATTENTION),
        ([S.FAILED, S.CANCELLED], Progress.FAILED),
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
    by_destination = {entry["connection"]: entry for entry in study.as_dict()["destinations"]}
    assert study.progress == Progress.IN_PROGRESS
    assert by_destination["PACS-A"]["progress"] == "in progress"
    assert by_destination["PACS-A"]["counts"] == {"stored": 1, "queued": 1}
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
    assert "Queued 1 delivery: 1." in retry.output

    release_all = runner.invoke(app, ["deliveries", "release", "--all", "--data-dir", str(data_dir)])
    assert release_all.exit_code == 0, release_all.output
    assert "Released 1 delivery: 2." in release_all.output

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


# One state vocabulary, down destinations, conflicts, filters and next steps -----------


def test_views_agree_on_cancelled_delivery(data) -> None:
    _, sessions = data
    set_states(sessions, {1: S.STORED, 2: S.STORED, 3: S.CANCELLED, 4: S.STORED})
    with sessions.begin() as session:
        [study] = list_studies(session)
        [summary] = summarize_studies(session)
    deliveries_view = {entry["connection"]: entry["progress"] for entry in study.as_dict()["destinations"]}
    studies_view = {destination.connection: destination.state for destination in summary.destinations}
    assert deliveries_view == {"PACS-A": "partial", "PACS-B": "delivered"}
    assert studies_view == deliveries_view
    assert study.progress == Progress.PARTIAL


def test_held_is_its_own_state(data) -> None:
    data_dir, sessions = data
    set_states(sessions, {1: S.STORED, 2: S.STORED, 3: S.HELD, 4: S.STORED})
    listing = CliRunner().invoke(app, ["deliveries", "--data-dir", str(data_dir)])
    assert listing.exit_code == 0, listing.output
    assert "(archive ward): held (needs release)" in listing.output
    assert "PACS-A: held (needs release), 1 of 2 stored" in listing.output
    assert '1 delivery is held: release it with "pacsbridge deliveries release --all" (or give its ID: 3).' in (
        listing.output
    )


def mark_down(sessions, connection_id: int, now: dt.datetime) -> None:
    with sessions.begin() as session:
        session.add(
            DestinationHealth(
                connection_id=connection_id,
                state=DestinationState.DOWN,
                consecutive_failures=3,
                down_since=now - dt.timedelta(minutes=10),
                next_probe_at=now + dt.timedelta(minutes=2),
                last_error="Connection refused by 127.0.0.1:11112.",
                updated_at=now,
            )
        )


def test_down_destination_shown(data) -> None:
    data_dir, sessions = data
    now = utc_now().replace(microsecond=0)
    with sessions.begin() as session:
        row = session.get(Delivery, 1)
        assert row is not None
        row.state = S.RETRYING
        row.next_attempt_at = now - dt.timedelta(minutes=5)
        row.last_error = "Connection refused by 127.0.0.1:11112."
        connection_id = row.connection_id
    mark_down(sessions, connection_id, now)
    since = (now - dt.timedelta(minutes=10)).isoformat()
    probe = (now + dt.timedelta(minutes=2)).isoformat()
    runner = CliRunner()

    listing = runner.invoke(app, ["deliveries", "--data-dir", str(data_dir)])
    assert listing.exit_code == 0, listing.output
    assert f"PACS-A: in progress, 0 of 2 stored; destination down since {since}, next probe {probe}" in listing.output
    assert f"waiting for the destination to come back (next probe {probe})" in listing.output
    assert "next try" not in listing.output

    as_json = runner.invoke(app, ["deliveries", "--json", "--data-dir", str(data_dir)])
    [study] = json.loads(as_json.output)["studies"]
    destinations = {entry["connection"]: entry for entry in study["destinations"]}
    assert destinations["PACS-A"]["down"]["down_since"] == since
    assert destinations["PACS-A"]["down"]["next_probe_at"] == probe
    assert destinations["PACS-B"]["down"] is None
    first = next(delivery for delivery in study["deliveries"] if delivery["id"] == 1)
    assert first["detail"].startswith("waiting for the destination to come back")

    show = runner.invoke(app, ["archives", "show", "ward", "--data-dir", str(data_dir)])
    assert show.exit_code == 0, show.output
    assert f"destination down since {since}, next probe {probe}" in show.output
    show_json = runner.invoke(app, ["archives", "show", "ward", "--json", "--data-dir", str(data_dir)])
    links = {link["connection"]: link for link in json.loads(show_json.output)["links"]}
    assert links["PACS-A"]["destination"]["state"] == "down"
    assert links["PACS-B"]["destination"] == {"state": "up"}


def test_past_retry_time_not_shown(data) -> None:
    data_dir, sessions = data
    with sessions.begin() as session:
        row = session.get(Delivery, 1)
        assert row is not None
        row.state = S.RETRYING
        row.next_attempt_at = utc_now() - dt.timedelta(hours=1)
        row.last_error = "0xA700 Out of resources"
    listing = CliRunner().invoke(app, ["deliveries", "--data-dir", str(data_dir)])
    assert "next try due now, when a worker runs; last error: 0xA700 Out of resources" in listing.output


def test_conflicting_instances_listed(data) -> None:
    data_dir, sessions = data
    with sessions.begin() as session:
        stored = session.get(Instance, 1)
        assert stored is not None
        session.add(
            Instance(
                organization_id=stored.organization_id,
                study_id=stored.study_id,
                sop_instance_uid=stored.sop_instance_uid,
                sop_class_uid=stored.sop_class_uid,
                transfer_syntax_uid=stored.transfer_syntax_uid,
                number_of_frames=1,
                blob_sha256="b" * 64,
                size=10,
                state=InstanceState.NEEDS_ATTENTION,
                reason="conflicting version",
            )
        )
        uid = stored.sop_instance_uid
    runner = CliRunner()

    listing = runner.invoke(app, ["deliveries", "--data-dir", str(data_dir)])
    assert listing.exit_code == 0, listing.output
    assert "1 conflicting instance needs attention (not forwarded):" in listing.output
    assert f"    {uid}: conflicting version" in listing.output

    as_json = runner.invoke(app, ["deliveries", "--json", "--data-dir", str(data_dir)])
    [study] = json.loads(as_json.output)["studies"]
    [conflict] = study["conflicting_instances"]
    assert conflict["sop_instance_uid"] == uid
    assert conflict["reason"] == "conflicting version"
    assert conflict["blob_sha256"] == "b" * 64


def test_unknown_filters_exit_1(data) -> None:
    data_dir, sessions = data
    runner = CliRunner()
    archive = runner.invoke(app, ["deliveries", "--archive", "nope", "--data-dir", str(data_dir)])
    assert archive.exit_code == 1
    assert "archive 'nope' not found" in archive.output
    assert "Known archives: 'ward'." in archive.output

    study = runner.invoke(app, ["deliveries", "--study", "1.2.3.unknown", "--data-dir", str(data_dir)])
    assert study.exit_code == 1
    assert "study '1.2.3.unknown' not found in organization 'default'" in study.output
    assert "Known archives: 'ward'." in study.output

    with sessions.begin() as session:
        [view] = list_studies(session)
    known = runner.invoke(
        app, ["deliveries", "--archive", "ward", "--study", view.study_instance_uid, "--data-dir", str(data_dir)]
    )
    assert known.exit_code == 0, known.output


def test_study_of_other_archive_named(data, tmp_path: Path) -> None:
    data_dir, sessions = data
    with sessions.begin() as session:
        add_archive(session, "ward-2", ["PACS-A"])
        [view] = list_studies(session)
    result = CliRunner().invoke(
        app, ["deliveries", "--archive", "ward-2", "--study", view.study_instance_uid, "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 1
    assert "not found in archive 'ward-2' (it is in archive 'ward')" in result.output


def test_retry_clears_stale_reason(data) -> None:
    _, sessions = data
    with sessions.begin() as session:
        row = session.get(Delivery, 1)
        assert row is not None
        row.state = S.NEEDS_ATTENTION
        row.reason = row.last_error = "connection is unsecured"
    with sessions.begin() as session:
        retry_now(session, [1])
    with sessions.begin() as session:
        row = session.get(Delivery, 1)
        assert row is not None
        assert row.state == S.QUEUED
        assert row.reason is None
        assert row.last_error is None


def test_action_messages_use_plurals(data) -> None:
    data_dir, _ = data
    runner = CliRunner()
    one = runner.invoke(app, ["deliveries", "cancel", "3", "--data-dir", str(data_dir)])
    assert "Cancelled 1 delivery: 3." in one.output
    two = runner.invoke(app, ["deliveries", "cancel", "1", "2", "--data-dir", str(data_dir)])
    assert "Cancelled 2 deliveries: 1, 2." in two.output


def test_connection_edit_prints_next_steps(data) -> None:
    data_dir, sessions = data
    set_states(sessions, {1: S.NEEDS_ATTENTION})
    result = CliRunner().invoke(app, ["connections", "edit", "PACS-A", "--port", "4242", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert (
        "1 delivery to 'PACS-A' is held: release it with \"pacsbridge deliveries release --all\" (or give its ID: 3)."
        in result.output
    )
    assert "1 delivery to 'PACS-A' needs attention: retry it with \"pacsbridge deliveries retry 1\"." in result.output
    untouched = CliRunner().invoke(
        app, ["connections", "edit", "PACS-B", "--dimse-timeout", "20", "--data-dir", str(data_dir)]
    )
    assert untouched.exit_code == 0, untouched.output
    assert "held" not in untouched.output
    assert "attention" not in untouched.output


def test_connection_edit_help_has_no_defaults() -> None:
    connections = get_command(app).commands["connections"]  # type: ignore[attr-defined]
    edit = {param.name: param.help or "" for param in connections.commands["edit"].params}
    add = {param.name: param.help or "" for param in connections.commands["add"].params}
    assert "(default: inactive)" in add["tls"]
    with_defaults = [name for name, text in edit.items() if "(default:" in text and name != "data_dir"]
    assert with_defaults == []


def test_endpoint_change_probes_down_destination(data) -> None:
    _, sessions = data
    now = utc_now()
    mark_down(sessions, 1, now)
    with sessions.begin() as session:
        update_connection(session, "PACS-A", port=4242)
    with sessions.begin() as session:
        health = session.get(DestinationHealth, 1)
        assert health is not None
        assert health.next_probe_at is not None
        assert health.next_probe_at <= utc_now()


def test_sending_detail_names_lease(data) -> None:
    _, sessions = data
    now = utc_now()
    with sessions.begin() as session:
        live, stale = session.get(Delivery, 1), session.get(Delivery, 2)
        for row, expires in ((live, now + dt.timedelta(seconds=60)), (stale, now - dt.timedelta(seconds=5))):
            row.state = S.SENDING
            row.lease_owner = "host:1:abc"
            row.lease_expires_at = expires
    with sessions.begin() as session:
        views = {view.id: view for study in list_studies(session) for view in study.deliveries}
    assert views[1].detail.startswith("being sent by worker host:1:abc (lease until ")
    assert views[2].detail.startswith("worker host:1:abc stopped renewing its lease at ")
    assert views[2].detail.endswith("the next worker run takes it over")
