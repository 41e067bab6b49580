"""Worker processes killed with SIGKILL in the middle of associations, over and over.

A slow pynetdicom storage SCP delays each response, so that each kill lands
while an association is open: sometimes before the response, sometimes just
after it and before the worker recorded it. At the end nothing may be lost,
and nothing may be marked stored without a success response that the SCP sent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from forward_helpers import (
    add_archive,
    add_pacs,
    open_test_database,
    store_study,
    write_instances,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select

from pacsbridge.db import close_database
from pacsbridge.db.forwarding import (
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
)
from pacsbridge.ingest.blobstore import BlobStore

KILLS = 22
RESPONSE_DELAY_SECONDS = 0.25
LEASE_SECONDS = 1.5
WORKER_ENV = {
    "PACSBRIDGE_FORWARD_LEASE_SECONDS": str(LEASE_SECONDS),
    "PACSBRIDGE_FORWARD_HEARTBEAT_SECONDS": "0.3",
    "PACSBRIDGE_FORWARD_RETRY_BASE_SECONDS": "0.1",
    "PACSBRIDGE_FORWARD_RETRY_CAP_SECONDS": "0.2",
    "PACSBRIDGE_FORWARD_POLL_SECONDS": "0.1",
    "PACSBRIDGE_FORWARD_CLAIM_BATCH_SIZE": "4",
    "PACSBRIDGE_LOG_LEVEL": "WARNING",
}


class SlowScp:
    """A storage SCP that waits before each success response and counts the requests and responses per UID."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.requests = 0
        ae = AE(ae_title="SLOWSCP")
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.received[uid] += 1
            self.requests += 1
        time.sleep(RESPONSE_DELAY_SECONDS)
        with self.lock:
            self.answered[uid] += 1
        return 0x0000

    def request_count(self) -> int:
        with self.lock:
            return self.requests


def start_worker(data_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pacsbridge.cli.main", "worker", "--data-dir", str(data_dir), *extra],
        env={**os.environ, **WORKER_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_request(scp: SlowScp, before: int, worker: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while scp.request_count() <= before:
        assert worker.poll() is None, f"worker exited early: {worker.stderr.read().decode() if worker.stderr else ''}"
        assert time.monotonic() < deadline, "no C-STORE request reached the SCP in time"
        time.sleep(0.01)


def test_sigkill_mid_association_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config, sessions = open_test_database(data_dir)
    blobs = BlobStore(config.blob_dir)
    scp = SlowScp()
    rng = random.Random(20260110)
    try:
        with sessions.begin() as session:
            add_pacs(session, "SLOW", scp.port, called_ae_title="SLOWSCP")
            add_archive(session, "ward", ["SLOW"])
            for index in range(10):
                store_study(session, blobs, "ward", write_instances(tmp_path / f"study-{index}", 6))

        for _ in range(KILLS):
            before = scp.request_count()
            worker = start_worker(data_dir)
            wait_for_request(scp, before, worker)
            # Kill while the SCP delays the response, or just after it sent the response.
            time.sleep(rng.uniform(0, RESPONSE_DELAY_SECONDS * 1.4))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            assert worker.returncode == -signal.SIGKILL

        # Leases of the killed workers expire, then one worker sends the rest.
        time.sleep(LEASE_SECONDS + 0.2)
        final = start_worker(data_dir, "--drain")
        _, stderr = final.communicate(timeout=120)
        assert final.returncode == 0, stderr.decode()

        with sessions.begin() as session:
            rows = session.execute(select(Delivery, Instance).join(Instance, Delivery.instance_id == Instance.id)).all()
            attempts = list(session.scalars(select(DeliveryAttempt)).all())
        by_delivery: dict[int, list[DeliveryAttempt]] = {}
        for attempt in attempts:
            by_delivery.setdefault(attempt.delivery_id, []).append(attempt)

        assert len(rows) == 60
        lease_lost_total = 0
        for delivery, instance in rows:
            uid = instance.sop_instance_uid
            history = by_delivery[delivery.id]
            assert delivery.state == DeliveryState.STORED, (delivery.id, delivery.state)
            stored = [attempt for attempt in history if attempt.outcome == AttemptOutcome.STORED]
            assert len(stored) == 1
            assert stored[0].status_code == 0x0000
            assert scp.answered[uid] >= 1, f"{uid} is stored but the SCP never answered it"
            lost = sum(attempt.outcome == AttemptOutcome.LEASE_LOST for attempt in history)
            lease_lost_total += lost
            # A second copy reaches the SCP only when a worker died before recording a response.
            assert scp.received[uid] <= 1 + lost, (uid, scp.received[uid], lost)
        assert lease_lost_total >= 1
    finally:
        scp.server.shutdown()
        close_database(sessions)
