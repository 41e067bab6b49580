"""Faulty storage SCPs on real sockets: scripted statuses, an abort mid-data set, a late response, a stalled reader.

Each test runs one worker until nothing is due and checks the state of every
delivery. Retry delays are long, so a retried delivery stays `retrying`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port
from fake_peers import storage_peer
from forward_helpers import (
    add_archive,
    add_pacs,
    dataset_fault_proxy,
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
    Instance,
)
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.store import store_instances
from pacsbridge.forward.policy import ForwardingPolicy
from pacsbridge.forward.worker import Worker
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.files import inspect_file

POLICY = ForwardingPolicy(retry_base_seconds=3600, poll_seconds=0.1)

# Status the fake PACS returns for the instance with this InstanceNumber, and the state it must lead to.
SCRIPT = {
    1: (0x0000, DeliveryState.STORED),
    2: (0xB000, DeliveryState.STORED),
    3: (0xA700, DeliveryState.RETRYING),
    4: (0xA900, DeliveryState.NEEDS_ATTENTION),
    5: (0xC000, DeliveryState.NEEDS_ATTENTION),
    6: (0x0122, DeliveryState.NEEDS_ATTENTION),
    7: (0x0111, DeliveryState.NEEDS_ATTENTION),
    8: (0x0110, DeliveryState.RETRYING),
}


def setup_study(tmp_path: Path, port: int, count: int, pixel_bytes: int = 4096, **connection: object):
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    with sessions.begin() as session:
        add_pacs(session, "PACS", port, **connection)
        add_archive(session, "ward", ["PACS"])
        store_study(session, blobs, "ward", write_instances(tmp_path / "study", count, pixel_bytes=pixel_bytes))
    return sessions, blobs


def rows_by_number(sessions) -> dict[int, tuple[Delivery, list[DeliveryAttempt]]]:
    """Return each delivery with its attempts, keyed by the InstanceNumber written by write_instances."""
    with sessions.begin() as session:
        result = {}
        for delivery, instance in session.execute(
            select(Delivery, Instance).join(Instance, Delivery.instance_id == Instance.id).order_by(Instance.id)
        ):
            attempts = list(
                session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id)).all()
            )
            result[len(result) + 1] = (delivery, attempts)
        return result


def test_scripted_statuses_end_in_right_states(tmp_path: Path) -> None:
    received: list[Dataset] = []
    with storage_peer(status_for=lambda ds: SCRIPT[int(ds.InstanceNumber)][0], received=received) as port:
        sessions, blobs = setup_study(tmp_path, port, len(SCRIPT))
        summary = Worker(sessions, blobs, policy=POLICY).run(drain=True)
    try:
        assert summary.claims == 1
        assert len(received) == len(SCRIPT)
        for number, (delivery, attempts) in rows_by_number(sessions).items():
            code, state = SCRIPT[number]
            assert delivery.state == state, (number, delivery.reason)
            assert delivery.status_code == code
            [attempt] = attempts
            assert attempt.status_code == code
            assert attempt.finished_at is not None
        warning = rows_by_number(sessions)[2][0].warning_text
        assert warning is not None
        assert warning.startswith("0xB000")
        duplicate = rows_by_number(sessions)[7][0].reason
        assert duplicate is not None
        assert "already has an instance with this UID" in duplicate
    finally:
        close_database(sessions)


def test_abort_mid_dataset_retries(tmp_path: Path) -> None:
    received: list[Dataset] = []
    with storage_peer(received=received) as upstream, dataset_fault_proxy(upstream, "abort") as port:
        # 600 kB per instance spans several PDUs, so the abort lands inside the data set.
        sessions, blobs = setup_study(tmp_path, port, 2, pixel_bytes=600_000)
        Worker(sessions, blobs, policy=POLICY).run(drain=True)
    try:
        assert received == []
        for delivery, attempts in rows_by_number(sessions).values():
            assert delivery.state == DeliveryState.RETRYING
            assert delivery.status_code is None
            assert attempts[-1].outcome == AttemptOutcome.RETRY
            assert delivery.last_error
    finally:
        close_database(sessions)


def test_response_after_dimse_timeout_retries(tmp_path: Path) -> None:
    received: list[Dataset] = []

    def late(ds: Dataset) -> int:
        time.sleep(2.5)
        return 0x0000

    with storage_peer(status_for=late, received=received) as port:
        sessions, blobs = setup_study(tmp_path, port, 1, dimse_timeout=1.0)
        Worker(sessions, blobs, policy=POLICY).run(drain=True)
    try:
        [(delivery, attempts)] = rows_by_number(sessions).values()
        # The PACS has the instance, but without its response it is not stored: it is sent again later.
        assert len(received) == 1
        assert delivery.state == DeliveryState.RETRYING
        assert delivery.last_error is not None
        assert "No C-STORE response within 1 s" in delivery.last_error
        assert attempts[0].outcome == AttemptOutcome.RETRY
    finally:
        close_database(sessions)


def test_peer_that_stops_reading_retries(tmp_path: Path) -> None:
    with storage_peer() as upstream, dataset_fault_proxy(upstream, "stop-reading") as port:
        # 16 MB is more than the loopback socket buffers take, so the send blocks.
        sessions, blobs = setup_study(tmp_path, port, 2, pixel_bytes=16_000_000, dimse_timeout=1.0, acse_timeout=1.0)
        worker = Worker(sessions, blobs, policy=POLICY)
        thread = threading.Thread(target=worker.run, kwargs={"drain": True}, daemon=True)
        thread.start()
        thread.join(timeout=8)
        finished = not thread.is_alive()
        worker.stop.set()
    # Closing the proxy above ends a blocked send, so the thread ends here in either case.
    thread.join(timeout=15)
    try:
        assert finished, "the worker was still blocked 8 s after the DIMSE timeout of 1 s"
        for delivery, _ in rows_by_number(sessions).values():
            assert delivery.state == DeliveryState.RETRYING
    finally:
        close_database(sessions)


def test_refused_connection_logs_not_sent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    instance = inspect_file(write_instances(tmp_path / "study", 1)[0])
    # Nothing listens on this port, so the TCP connection is refused and nothing is sent.
    endpoint = Endpoint("127.0.0.1", free_port(), "PACSBRIDGE", "NOBODY", connection_timeout=5)
    with caplog.at_level(logging.INFO, logger="pacsbridge.dicomnet.store"):
        store_instances(endpoint, [instance])
    [line] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("C-STORE")]
    assert line.startswith(f"C-STORE {instance.sop_instance_uid} to NOBODY@127.0.0.1:")
    assert ": not sent: Connection to 127.0.0.1 port " in line
    assert "failure" not in line
