"""The forwarding worker: claim a (destination, study) group, send it over one association, record each outcome.

Each C-STORE response is recorded in its own transaction as soon as it
arrives, so a worker killed mid-association loses at most the instance in
flight, whose lease then expires and which another worker sends again. An
instance is marked stored only after a success or warning response for it.

Before connecting, the worker checks that the connection may receive the
study: real (non-test) studies need TLS and a connection that is not marked
test-only (`pacsbridge.ingest.archives.blocking_reason`), and encryption-only
TLS needs a confirmed (pinned) SCP certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import secrets
import shlex
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.connections import ConnectionKind, TlsMode
from pacsbridge.db.connections import to_settings
from pacsbridge.db.forwarding import AttemptOutcome, DeliveryState, Study
from pacsbridge.db.models import ConnectionRecord, utc_now
from pacsbridge.dicomnet.echo import echo
from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.dicomnet.store import StoreOutcome, store_instances
from pacsbridge.forward import health
from pacsbridge.forward.policy import (
    CONNECTION_FAILURE_KINDS,
    Decision,
    ForwardingPolicy,
    decide,
)
from pacsbridge.forward.queue import Claim, ClaimedDelivery, LeaseLostError
from pacsbridge.forward.sql_queue import SqlDeliveryQueue, write_transaction
from pacsbridge.ingest.archives import blocking_reason
from pacsbridge.ingest.blobstore import BlobNotFoundError, BlobStore
from pacsbridge.prepare.plan import Preparation
from pacsbridge.tls.client_ca import ClientCertificateError, ClientIdentity
from pacsbridge.tls.endpoints import prepare_client_identity, stored_endpoint
from pacsbridge.tls.secret_key import SecretKey, SecretKeyError

LOGGER = logging.getLogger(__name__)

def new_worker_id() -> str:
    """Return an id unique to this worker: host name, process id and a random part."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"


class _StopSending(Exception):
    """Raised from the outcome callback to end the association early (stop requested or lease lost)."""


@dataclass
class WorkerSummary:
    """Summary of one worker run: the last state of each delivery it handled."""

    final_states: dict[int, DeliveryState] = field(default_factory=dict)
    claims: int = 0
    probes: int = 0

    @property
    def all_stored(self) -> bool:
        return all(state == DeliveryState.STORED for state in self.final_states.values())

    def count_stored(self) -> int:
        return sum(1 for state in self.final_states.values() if state == DeliveryState.STORED)


@dataclass(frozen=True)
class _Target:
    """The connection of a claim and its client certificate, loaded before sending."""

    record: ConnectionRecord
    identity: ClientIdentity | None


class Worker:
    """Send due deliveries until stopped, or until nothing is due with `run(drain=True)`."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        *,
        policy: ForwardingPolicy | None = None,
        worker_id: str | None = None,
        bind_address: str | None = None,
        secret_key: SecretKey | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.policy = policy or ForwardingPolicy()
        self.queue = SqlDeliveryQueue(sessions, self.policy)
        self.worker_id = worker_id or new_worker_id()
        self.bind_address = bind_address
        self.secret_key = secret_key
        self.stop = stop or threading.Event()
        self.clock = clock
        self.rng = rng or random.Random()
        self.summary = WorkerSummary()

    # The loop ---------------------------------------------------------------

    def run(self, *, drain: bool = False) -> WorkerSummary:
        """Work until `stop` is set; with `drain`, return as soon as nothing is due."""
        LOGGER.info("Worker %s started (drain=%s)", self.worker_id, drain)
        while not self.stop.is_set():
            busy = self.run_once()
            if not busy:
                if drain:
                    break
                self.stop.wait(self.policy.poll_seconds)
        LOGGER.info(
            "Worker %s stopped after %d claims and %d probes: %d deliveries stored, %d not stored",
            self.worker_id,
            self.summary.claims,
            self.summary.probes,
            self.summary.count_stored(),
            len(self.summary.final_states) - self.summary.count_stored(),
        )
        return self.summary

    def run_once(self) -> bool:
        """Run one due probe or one claim; return False when nothing was due."""
        if self._probe_once():
            return True
        claim = self.queue.claim(self.worker_id, now=self.clock())
        if claim is None:
            return False
        self.summary.claims += 1
        self.process(claim)
        return True

    # Probes -----------------------------------------------------------------

    def _probe_once(self) -> bool:
        with write_transaction(self.sessions) as session:
            connection_id = health.claim_due_probe(session, now=self.clock(), policy=self.policy)
        if connection_id is None:
            return False
        self.summary.probes += 1
        try:
            with write_transaction(self.sessions) as session:
                record = session.get(ConnectionRecord, connection_id)
                assert record is not None
                identity = prepare_client_identity(session, record, self.secret_key)
                settings = to_settings(record)
        except (SecretKeyError, ClientCertificateError) as exc:
            with write_transaction(self.sessions) as session:
                health.note_probe_failed(session, connection_id, str(exc), now=self.clock())
            return True
        with stored_endpoint(settings, identity, bind_address=self.bind_address, require_pin=True) as endpoint:
            report = echo(endpoint)
        with write_transaction(self.sessions) as session:
            if report.ok:
                health.note_reachable(session, connection_id, now=self.clock())
            else:
                failed = next((step for step in report.steps if step.outcome.value == "failed"), None)
                error = failed.detail if failed is not None else "Echo failed"
                health.note_probe_failed(session, connection_id, error, now=self.clock())
        return True

    # Claims -----------------------------------------------------------------

    def process(self, claim: Claim) -> None:
        """Send the deliveries of `claim` and record each outcome, then release what was not sent."""
        try:
            target = self._check_target(claim)
            if target is not None:
                self._send(claim, target)
        except _StopSending:
            pass
        finally:
            self.queue.release(claim, now=self.clock())

    def _check_target(self, claim: Claim) -> _Target | None:
        """Load the connection and its client certificate for sending the claim.

        When the study must not go to this connection, record needs-attention
        for every delivery of the claim and return None.
        """
        with write_transaction(self.sessions) as session:
            record = session.get(ConnectionRecord, claim.connection_id)
            study = session.get(Study, claim.study_id)
            assert record is not None and study is not None
            reason = self._guard_reason(record, study)
            identity = None
            if reason is None:
                try:
                    identity = prepare_client_identity(session, record, self.secret_key)
                except (SecretKeyError, ClientCertificateError) as exc:
                    reason = f"the client certificate of connection {record.name!r} cannot be used: {exc}"
        if reason is not None:
            LOGGER.warning(
                "Connection id=%d, study id=%d: %d deliveries need attention without connecting: %s",
                claim.connection_id,
                claim.study_id,
                len(claim.deliveries),
                reason,
            )
            for delivery in claim.deliveries:
                self._record(claim, delivery, _not_sent(reason))
            return None
        return _Target(record, identity)

    @staticmethod
    def _guard_reason(record: ConnectionRecord, study: Study) -> str | None:
        if record.kind != ConnectionKind.PACS:
            return (
                f"connection {record.name!r} is a {record.kind.value} connection, not a PACS: link a PACS "
                "connection to the archive instead"
            )
        # The upload applies the same rule when it creates the deliveries, but
        # the connection or the archive may have changed since.
        reason = blocking_reason(study, record)
        if reason is not None:
            return reason
        if record.tls_mode == TlsMode.ENCRYPTION_ONLY and not record.pinned_fingerprint:
            echo_command = shlex.join(["pacsbridge", "connections", "echo", record.name])
            return (
                f"the SCP certificate of connection {record.name!r} is not confirmed yet (TLS encryption-only): "
                f'run "{echo_command}", compare the fingerprint with the PACS admin '
                'and confirm it, then "pacsbridge deliveries retry ID"'
            )
        return None

    def _instance_files(self, claim: Claim) -> dict[int, InstanceFile]:
        files: dict[int, InstanceFile] = {}
        for delivery in claim.deliveries:
            try:
                path = self.blobs.open_path(delivery.blob_sha256)
            except BlobNotFoundError as exc:
                self._record(claim, delivery, _not_sent(str(exc)))
                continue
            files[delivery.delivery_id] = _instance_file(delivery, path)
        return files

    def _send(self, claim: Claim, target: _Target) -> None:
        files = self._instance_files(claim)
        if not files:
            return
        by_key = {(file.sop_instance_uid, file.path): delivery_id for delivery_id, file in files.items()}
        by_id = {delivery.delivery_id: delivery for delivery in claim.deliveries}
        first_outcome: list[StoreOutcome] = []
        heartbeat = _Heartbeat(self, claim, set(files))

        def on_outcome(outcome: StoreOutcome) -> None:
            delivery_id = by_key.pop((outcome.sop_instance_uid, outcome.path))
            heartbeat.done(delivery_id)
            if not first_outcome:
                first_outcome.append(outcome)
                self._note_health(claim.connection_id, outcome)
            delivery = by_id[delivery_id]
            decision = decide(
                outcome,
                attempts=delivery.attempts,
                first_queued_at=delivery.first_queued_at,
                now=self.clock(),
                policy=self.policy,
                rng=self.rng,
            )
            if not self._record(claim, delivery, decision):
                raise _StopSending
            if self.stop.is_set() or heartbeat.lost:
                # The current response is recorded, and `process` releases the unsent rest.
                raise _StopSending

        settings = to_settings(target.record)
        with stored_endpoint(
            settings, target.identity, bind_address=self.bind_address, require_pin=True
        ) as endpoint:
            heartbeat.start()
            try:
                store_instances(
                    endpoint,
                    list(files.values()),
                    preparation=Preparation.from_settings(settings),
                    on_outcome=on_outcome,
                )
            finally:
                heartbeat.finish()

    def _note_health(self, connection_id: int, outcome: StoreOutcome) -> None:
        failure = outcome.failure
        now = self.clock()
        with write_transaction(self.sessions) as session:
            if failure is not None and failure.kind in CONNECTION_FAILURE_KINDS:
                health.note_connection_failure(session, connection_id, failure.summary, now=now, policy=self.policy)
            else:
                health.note_reachable(session, connection_id, now=now)

    def _record(self, claim: Claim, delivery: ClaimedDelivery, decision: Decision) -> bool:
        """Record `decision`, or return False when the lease was lost and nothing was written."""
        try:
            self.queue.record(claim, delivery.delivery_id, decision, now=self.clock())
        except LeaseLostError as exc:
            LOGGER.warning("Worker %s: %s; the outcome %s was not recorded", self.worker_id, exc, decision.outcome)
            return False
        self.summary.final_states[delivery.delivery_id] = decision.state
        if decision.not_sent:
            LOGGER.info(
                "Delivery id=%d (instance id=%d, not sent): %s, %s",
                delivery.delivery_id,
                delivery.instance_id,
                decision.state.value,
                decision.detail,
            )
        else:
            LOGGER.info(
                "Delivery id=%d (instance id=%d, try %d): %s, %s",
                delivery.delivery_id,
                delivery.instance_id,
                delivery.attempts,
                decision.state.value,
                decision.detail,
            )
        return True


def _not_sent(reason: str) -> Decision:
    """Return the needs-attention decision for a delivery that the worker did not send, so no try is counted."""
    return Decision(
        DeliveryState.NEEDS_ATTENTION,
        AttemptOutcome.NEEDS_ATTENTION,
        reason,
        reason=reason,
        last_error=reason,
        not_sent=True,
    )


def _instance_file(delivery: ClaimedDelivery, path: Path) -> InstanceFile:
    return InstanceFile(
        path=path,
        sop_class_uid=delivery.sop_class_uid,
        sop_instance_uid=delivery.sop_instance_uid,
        transfer_syntax_uid=delivery.transfer_syntax_uid,
        number_of_frames=delivery.number_of_frames,
    )


class _Heartbeat:
    """A thread that extends the claim's lease every `heartbeat_seconds` while the association runs."""

    def __init__(self, worker: Worker, claim: Claim, pending: set[int]) -> None:
        self.worker = worker
        self.claim = claim
        self.pending = set(pending)
        self.lost = False
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker.worker_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def done(self, delivery_id: int) -> None:
        with self._lock:
            self.pending.discard(delivery_id)

    def finish(self) -> None:
        self._finished.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._finished.wait(self.worker.policy.heartbeat_seconds):
            try:
                held = self.worker.queue.heartbeat(self.claim, now=self.worker.clock())
            except Exception:
                # The lease runs out on its own if the database stays unreachable.
                LOGGER.exception("Worker %s could not extend its lease", self.worker.worker_id)
                continue
            with self._lock:
                # Pending only shrinks, so a pending delivery missing from `held` was taken over.
                missing = self.pending - held
            if missing:
                LOGGER.warning(
                    "Worker %s lost the lease of %d deliveries; it stops sending this group",
                    self.worker.worker_id,
                    len(missing),
                )
                self.lost = True
