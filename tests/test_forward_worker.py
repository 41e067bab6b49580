"""The worker's guards before connecting, the drain exit status and a graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port
from fake_peers import storage_peer
from forward_helpers import (
    add_archive,
    add_pacs,
    delivery_states,
    open_test_database,
    store_study,
    write_instances,
)
from pydicom import Dataset
from sqlalchemy import select

from pacsbridge.db import close_database
from pacsbridge.db.forwarding import (
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
)
from pacsbridge.forward.policy import ForwardingPolicy
from pacsbridge.forward.worker import Worker, new_worker_id
from pacsbridge.ingest.archives import unsecured_reason
from pacsbridge.ingest.blobstore import BlobStore

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]
POLICY = ForwardingPolicy(retry_base_seconds=3600, poll_seconds=0.1)


def reasons(sessions) -> list[str | None]:
    with sessions.begin() as session:
        return [row.reason for row in session.scalars(select(Delivery).order_by(Delivery.id))]


def run_guarded(tmp_path: Path, *, is_test: bool, **connection: object):
    received: list[Dataset] = []
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    with storage_peer(received=received) as port:
        with sessions.begin() as session:
            add_pacs(session, "PACS", port, **connection)
            add_archive(session, "ward", ["PACS"], is_test=is_test)
            store_study(session, blobs, "ward", write_instances(tmp_path / "study", 2))
        Worker(sessions, blobs, policy=POLICY).run(drain=True)
    return sessions, received


def test_unsecured_real_study_not_sent(tmp_path: Path) -> None:
    sessions, received = run_guarded(tmp_path, is_test=False)
    try:
        assert received == []
        assert set(delivery_states(sessions).values()) == {DeliveryState.NEEDS_ATTENTION}
        assert reasons(sessions) == [unsecured_reason("PACS"), unsecured_reason("PACS")]
        with sessions.begin() as session:
            outcomes = {attempt.outcome for attempt in session.scalars(select(DeliveryAttempt))}
            tries = [row.attempts for row in session.scalars(select(Delivery))]
        assert outcomes == {AttemptOutcome.NEEDS_ATTENTION}
        # The guard blocked the send before connecting, so no try is counted.
        assert tries == [0, 0]
    finally:
        close_database(sessions)


def test_unsecured_test_study_sent(tmp_path: Path) -> None:
    sessions, received = run_guarded(tmp_path, is_test=True)
    try:
        assert len(received) == 2
        assert set(delivery_states(sessions).values()) == {DeliveryState.STORED}
    finally:
        close_database(sessions)


def test_test_only_connection_rejects_real_study(tmp_path: Path) -> None:
    sessions, received = run_guarded(
        tmp_path, is_test=False, tls_mode="encryption-only", pinned_fingerprint="a" * 64, test_only=True
    )
    try:
        assert received == []
        [first, _] = reasons(sessions)
        assert first is not None
        assert "is test-only and this study is not test data" in first
    finally:
        close_database(sessions)


def test_unpinned_encryption_only_not_sent(tmp_path: Path) -> None:
    sessions, received = run_guarded(tmp_path, is_test=False, tls_mode="encryption-only")
    try:
        assert received == []
        [first, _] = reasons(sessions)
        assert first is not None
        assert "not confirmed yet" in first
    finally:
        close_database(sessions)


def test_worker_ids_unique() -> None:
    ids = {new_worker_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(f":{os.getpid()}:" in worker_id for worker_id in ids)


def test_drain_exit_status(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    try:
        with storage_peer(status_for=lambda ds: 0xC000 if ds.InstanceNumber == 2 else 0x0000) as port:
            with sessions.begin() as session:
                add_pacs(session, "PACS", port)
                add_archive(session, "ward", ["PACS"])
                store_study(session, blobs, "ward", write_instances(tmp_path / "study", 2))
            failed = subprocess.run([*CLI, "worker", "--drain", "--data-dir", str(data_dir)],
                                    capture_output=True, text=True, timeout=60, check=False)
            assert failed.returncode == 1, failed.stderr
            assert "1 of the 2 deliveries handled in this run was not stored." in failed.stderr
            assert "PACS: 1 needs attention" in failed.stderr

            idle = subprocess.run([*CLI, "worker", "--drain", "--data-dir", str(data_dir)],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert idle.returncode == 0, idle.stderr
    finally:
        close_database(sessions)


def test_invalid_policy_env_exits_2(tmp_path: Path) -> None:
    run = subprocess.run(
        [*CLI, "worker", "--drain", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PACSBRIDGE_FORWARD_LEASE_SECONDS": "soon"},
    )
    assert run.returncode == 2
    assert "PACSBRIDGE_FORWARD_LEASE_SECONDS = 'soon' is invalid" in run.stderr


def test_sigterm_finishes_response_and_releases(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    received: list[Dataset] = []

    def slow(ds: Dataset) -> int:
        time.sleep(0.5)
        return 0x0000

    try:
        with storage_peer(status_for=slow, received=received) as port:
            with sessions.begin() as session:
                add_pacs(session, "PACS", port)
                add_archive(session, "ward", ["PACS"])
                store_study(session, blobs, "ward", write_instances(tmp_path / "study", 5))
            worker = subprocess.Popen([*CLI, "worker", "--data-dir", str(data_dir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while not received:
                assert time.monotonic() < deadline, "the worker sent nothing"
                time.sleep(0.02)
            worker.send_signal(signal.SIGTERM)
            _, stderr = worker.communicate(timeout=30)
        assert worker.returncode == 0, stderr
        states = list(delivery_states(sessions).values())
        # The response in flight was recorded, and the unsent rest is back in the queue.
        assert states.count(DeliveryState.STORED) == len(received)
        assert states.count(DeliveryState.QUEUED) == 5 - len(received)
        assert DeliveryState.SENDING not in states
    finally:
        close_database(sessions)


def test_drain_reports_outstanding_work(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    # Nothing listens on this port, so every connection is refused.
    refused_port = free_port()
    try:
        with sessions.begin() as session:
            add_pacs(session, "PACS-A", refused_port)
            add_pacs(session, "PACS-B", refused_port)
            add_archive(session, "ward", ["PACS-A", "PACS-B"])
            store_study(session, blobs, "ward", write_instances(tmp_path / "study", 2))
            for row in session.scalars(select(Delivery)):
                if row.connection.name == "PACS-B":
                    row.state = DeliveryState.HELD
        run = subprocess.run(
            [*CLI, "worker", "--drain", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PACSBRIDGE_FORWARD_DOWN_AFTER_FAILURES": "1"},
        )
        assert run.returncode == 1, run.stderr
        assert "2 of the 2 deliveries handled in this run were not stored." in run.stderr
        assert "PACS-A: 2 retrying; destination down since " in run.stderr
        assert ", next probe " in run.stderr
        assert "PACS-B: 2 held (needs release)" in run.stderr
        assert '2 deliveries are held: release them with "pacsbridge deliveries release --all"' in run.stderr
    finally:
        close_database(sessions)


def test_drain_all_stored_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    try:
        with storage_peer() as port:
            with sessions.begin() as session:
                add_pacs(session, "PACS", port)
                add_archive(session, "ward", ["PACS"])
                store_study(session, blobs, "ward", write_instances(tmp_path / "study", 2))
            run = subprocess.run([*CLI, "worker", "--drain", "--data-dir", str(data_dir)],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
        assert "Left to do" not in run.stderr
        assert set(delivery_states(sessions).values()) == {DeliveryState.STORED}
    finally:
        close_database(sessions)
