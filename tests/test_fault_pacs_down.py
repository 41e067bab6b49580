"""A PACS that is down while studies arrive, then comes up: DCMTK storescp processes on real sockets."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, require_tool, wait_for_port
from forward_helpers import (
    add_archive,
    add_pacs,
    delivery_states,
    open_test_database,
    store_study,
    write_instances,
)
from pydicom import dcmread

from pacsbridge.db import close_database
from pacsbridge.db.forwarding import DeliveryState, DestinationHealth, DestinationState
from pacsbridge.forward.policy import ForwardingPolicy
from pacsbridge.forward.status import Progress, list_studies
from pacsbridge.forward.worker import Worker
from pacsbridge.ingest.blobstore import BlobStore

pytestmark = pytest.mark.dcmtk

# Short delays, so that retries, the destination going down and the probe all happen within seconds.
POLICY = ForwardingPolicy(
    retry_base_seconds=0.2,
    retry_cap_seconds=0.5,
    retry_jitter=0,
    down_after_failures=2,
    probe_base_seconds=0.3,
    probe_cap_seconds=0.6,
    poll_seconds=0.05,
)


class StorescpProcess:
    """A storescp on a fixed port that keeps every received file under a unique name."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [require_tool("storescp"), "--aetitle", "STORESCP", "--output-directory", str(folder),
             "--unique-filenames", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, self.process)

    def received(self) -> Counter[str]:
        """Count the files received per SOP Instance UID."""
        return Counter(
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in self.folder.iterdir()
            if path.is_file()
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)


@pytest.fixture
def storescps() -> Iterator[list[StorescpProcess]]:
    started: list[StorescpProcess] = []
    yield started
    for peer in started:
        peer.stop()


def work_until(worker: Worker, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "deliveries did not finish in time"
        if not worker.run_once():
            time.sleep(POLICY.poll_seconds)


def test_pacs_down_then_up_delivers_once(tmp_path: Path, storescps: list[StorescpProcess]) -> None:
    port = free_port()
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    uids: list[str] = []
    with sessions.begin() as session:
        connection_id = add_pacs(session, "PACS", port)
        add_archive(session, "ward", ["PACS"])
    worker = Worker(sessions, blobs, policy=POLICY)
    try:
        for index in range(3):
            paths = write_instances(tmp_path / f"study-{index}", 3)
            uids += [str(dcmread(path).SOPInstanceUID) for path in paths]
            with sessions.begin() as session:
                store_study(session, blobs, "ward", paths)
            worker.run(drain=True)

        states = delivery_states(sessions)
        assert set(states.values()) <= {DeliveryState.RETRYING, DeliveryState.QUEUED}
        # The study that arrived after the destination went down was not even tried.
        assert DeliveryState.QUEUED in states.values()
        with sessions.begin() as session:
            destination = session.get(DestinationHealth, connection_id)
            assert destination is not None
            assert destination.state == DestinationState.DOWN
            assert destination.last_error is not None
            assert "refused" in destination.last_error
        # While the PACS is down, its groups are not claimed: no study burns its own retries.
        assert worker.queue.claim("probe-check", now=destination.updated_at) is None

        peer = StorescpProcess(tmp_path / "received", port)
        storescps.append(peer)
        work_until(worker, lambda: set(delivery_states(sessions).values()) == {DeliveryState.STORED})

        with sessions.begin() as session:
            destination = session.get(DestinationHealth, connection_id)
            assert destination is not None
            assert destination.state == DestinationState.UP
        received = peer.received()
        assert sorted(received) == sorted(uids)
        assert set(received.values()) == {1}
    finally:
        close_database(sessions)


def test_three_pacs_one_down_partial_then_delivered(tmp_path: Path, storescps: list[StorescpProcess]) -> None:
    ports = [free_port() for _ in range(3)]
    storescps += [StorescpProcess(tmp_path / "a", ports[0]), StorescpProcess(tmp_path / "b", ports[1])]
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    paths = write_instances(tmp_path / "study", 3)
    uids = sorted(str(dcmread(path).SOPInstanceUID) for path in paths)
    with sessions.begin() as session:
        for name, port in zip(("PACS-A", "PACS-B", "PACS-C"), ports):
            add_pacs(session, name, port)
        add_archive(session, "ward", ["PACS-A", "PACS-B", "PACS-C"])
        store_study(session, blobs, "ward", paths)
    worker = Worker(sessions, blobs, policy=POLICY)
    try:
        worker.run(drain=True)
        with sessions.begin() as session:
            [study] = list_studies(session)
        destinations = {entry["connection"]: entry["progress"] for entry in study.as_dict()["destinations"]}
        # Retrying deliveries keep the study in progress, even though two of three PACS have it.
        assert study.progress == Progress.IN_PROGRESS
        assert destinations == {"PACS-A": "delivered", "PACS-B": "delivered", "PACS-C": "in progress"}
        assert sorted(storescps[0].received()) == uids
        assert sorted(storescps[1].received()) == uids

        storescps.append(StorescpProcess(tmp_path / "c", ports[2]))

        def delivered() -> bool:
            with sessions.begin() as session:
                return list_studies(session)[0].progress == Progress.DELIVERED

        work_until(worker, delivered)
        assert sorted(storescps[2].received()) == uids
        assert set(storescps[0].received().values()) == {1}
    finally:
        close_database(sessions)
