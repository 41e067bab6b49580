"""The main job end to end on one machine, with sandbox SCPs of our own.

The demo starts a storage SCP and a worklist SCP on free loopback ports and
stores connections for them. It echoes both and takes a patient from the
worklist. Then it generates a test study for that patient and uploads it into
a test archive linked to the sandbox PACS, and a worker forwards it, as in
production. Last, it checks that every instance arrived intact.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import AppConfig, prepare_data_dir
from pacsbridge.connections import ConnectionKind, ConnectionSettings
from pacsbridge.db import (
    close_database,
    find_connection,
    open_database,
    save_connection,
    to_settings,
    update_connection,
)
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.echo import EchoReport, echo
from pacsbridge.db.forwarding import Delivery, DeliveryState
from pacsbridge.dicomnet.worklist import WorklistItem, WorklistQuery, query_worklist
from pacsbridge.forward.worker import Worker
from pacsbridge.ingest.archives import create_archive, find_archive, link_pacs
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.testimages import TestPatient, write_test_study
from pacsbridge.ingest.upload import upload_files
from pacsbridge.sandbox.mwl import SandboxWorklistServer, make_worklist_item
from pacsbridge.sandbox.storage import SandboxStorageServer

LOGGER = logging.getLogger(__name__)

# The demo keeps its connections in an organization of its own, so it never
# collides with the one worklist connection a real organization may have.
DEMO_ORGANIZATION = "demo"
PACS_CONNECTION = "Sandbox PACS"
MWL_CONNECTION = "Sandbox MWL"
ARCHIVE = "Sandbox archive"
ACTOR = "pacsbridge demo"
CALLING_AE_TITLE = "PACSBRIDGE"
# Attributes that must reach the PACS exactly as the worklist gave them.
WORKLIST_KEYS = ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID")


@dataclass
class Arrival:
    sop_instance_uid: str
    sent_path: Path
    received_path: Path | None
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.received_path is not None and not self.problems


@dataclass
class DemoResult:
    echo_reports: dict[str, EchoReport] = field(default_factory=dict)
    worklist_item: WorklistItem | None = None
    study_files: list[Path] = field(default_factory=list)
    # Final delivery state per SOP Instance UID, after the worker drained the queue.
    delivery_states: dict[str, str] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and bool(self.arrivals)
            and all(arrival.intact for arrival in self.arrivals)
            and all(report.ok for report in self.echo_reports.values())
            and all(state == DeliveryState.STORED.value for state in self.delivery_states.values())
        )


def sandbox_worklist_items(today: datetime.date) -> list:
    """Return the sandbox worklist: two ultrasound exams today and one CT that the US filter excludes."""
    return [
        make_worklist_item(
            patient_name="Müller^Zoë",
            patient_id="DEMO-0001",
            issuer_of_patient_id="PACSBRIDGE-DEMO",
            birth_date="19800214",
            sex="F",
            accession_number="DEMOACC0001",
            scheduled_date=today,
            scheduled_time="090000",
            requested_procedure_description="FAST examination",
        ),
        make_worklist_item(
            patient_name="Ødegård^Åsmund",
            patient_id="DEMO-0002",
            issuer_of_patient_id="PACSBRIDGE-DEMO",
            birth_date="19661103",
            sex="M",
            accession_number="DEMOACC0002",
            scheduled_date=today,
            scheduled_time="103000",
            requested_procedure_description="Lung ultrasound",
        ),
        make_worklist_item(
            patient_name="Rossi^Giulia",
            patient_id="DEMO-0003",
            accession_number="DEMOACC0003",
            scheduled_date=today,
            modality="CT",
            requested_procedure_description="CT abdomen",
        ),
    ]


def _upsert_connection(session: Session, settings: ConnectionSettings) -> ConnectionSettings:
    existing = find_connection(session, settings.name, organization=DEMO_ORGANIZATION)
    if existing is None:
        record, _ = save_connection(session, settings, organization=DEMO_ORGANIZATION)
    else:
        record, _ = update_connection(
            session,
            settings.name,
            organization=DEMO_ORGANIZATION,
            host=settings.host,
            port=settings.port,
            called_ae_title=settings.called_ae_title,
        )
    return to_settings(record)


def _patient_from(item: WorklistItem) -> TestPatient:
    name = item.raw.get("PatientName")
    birth = item.birth_date
    return TestPatient(
        family_name=str(name.family_name) if name else "TEST",
        given_name=str(name.given_name) if name else "PACSBRIDGE",
        patient_id=item.patient_id or "PB-TEST-0001",
        issuer_of_patient_id=item.issuer_of_patient_id or "",
        birth_date=datetime.datetime.strptime(birth, "%Y%m%d").date() if birth else None,
        sex=item.sex or "O",
    )


def check_arrivals(sent: list[Path], received_folder: Path, item: WorklistItem | None) -> list[Arrival]:
    """Compare each sent file with what the storage SCP wrote: identity, worklist keys and pixel bytes."""
    received = {}
    for path in received_folder.glob("*.dcm"):
        received[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path

    arrivals = []
    for path in sent:
        source = dcmread(path)
        uid = str(source.SOPInstanceUID)
        arrival = Arrival(uid, path, received.get(uid))
        if arrival.received_path is None:
            arrival.problems.append("not received")
            arrivals.append(arrival)
            continue
        copy = dcmread(arrival.received_path)
        if copy.PixelData != source.PixelData:
            arrival.problems.append("pixel data differs")
        for keyword in WORKLIST_KEYS:
            if str(copy.get(keyword, "")) != str(source.get(keyword, "")):
                arrival.problems.append(f"{keyword} differs")
        if item is not None:
            if str(copy.get("AccessionNumber", "")) != (item.accession_number or ""):
                arrival.problems.append("accession number is not the worklist's")
            if str(copy.get("StudyInstanceUID", "")) != (item.study_instance_uid or ""):
                arrival.problems.append("Study Instance UID is not the worklist's")
        arrivals.append(arrival)
    return arrivals


class Demo:
    """The sandbox SCPs and the data folder of one demo run."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.received_folder = config.data_dir / "sandbox-pacs"
        today = datetime.date.today()
        self.storage = SandboxStorageServer(self.received_folder)
        self.worklist = SandboxWorklistServer(sandbox_worklist_items(today))
        self.sessions: sessionmaker[Session] | None = None

    def start(self) -> None:
        prepare_data_dir(self.config)
        self.sessions = open_database(self.config)
        self.storage.start()
        self.worklist.start()

    def stop(self) -> None:
        self.worklist.stop()
        self.storage.stop()
        if self.sessions is not None:
            close_database(self.sessions)
            self.sessions = None

    def _upload(self, files: list[Path], report: Callable[[str], None]) -> str | None:
        """Upload `files` into the demo's test archive, linked to the sandbox PACS; return an error or None."""
        assert self.sessions is not None
        blobs = BlobStore(self.config.blob_dir)
        with self.sessions.begin() as session:
            if find_archive(session, ARCHIVE, organization=DEMO_ORGANIZATION) is None:
                create_archive(session, ARCHIVE, is_test=True, organization=DEMO_ORGANIZATION, actor=ACTOR)
                link_pacs(session, ARCHIVE, PACS_CONNECTION, slot=1, organization=DEMO_ORGANIZATION, actor=ACTOR)
            upload = upload_files(session, blobs, ARCHIVE, files, organization=DEMO_ORGANIZATION, actor=ACTOR)
        bad = [item for item in upload.files if item.result.value not in ("accepted", "duplicate")]
        if bad:
            return "the upload did not accept: " + "; ".join(f"{item.path}: {item.reason}" for item in bad)
        report(f"Uploaded {len(upload.files)} files into test archive {ARCHIVE!r}, linked to {PACS_CONNECTION}.")
        return None

    def _forward(self, result: DemoResult, report: Callable[[str], None]) -> None:
        """Run a worker until nothing is due, then record each instance's delivery state."""
        assert self.sessions is not None
        summary = Worker(self.sessions, BlobStore(self.config.blob_dir)).run(drain=True)
        report(f"Worker forwarded the study: {summary.count_stored()} deliveries stored.")
        uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in result.study_files}
        with self.sessions() as session:
            for delivery in session.scalars(select(Delivery)):
                uid = delivery.instance.sop_instance_uid
                if uid in uids:
                    result.delivery_states[uid] = delivery.state.value
        for uid, state in sorted(result.delivery_states.items()):
            report(f"Delivery of {uid} to {PACS_CONNECTION}: {state}")

    def connections(self) -> tuple[ConnectionSettings, ConnectionSettings]:
        assert self.sessions is not None
        pacs = ConnectionSettings(
            name=PACS_CONNECTION,
            kind=ConnectionKind.PACS,
            host="127.0.0.1",
            port=self.storage.port,
            calling_ae_title=CALLING_AE_TITLE,
            called_ae_title=self.storage.ae_title,
            test_only=True,
        )
        mwl = ConnectionSettings(
            name=MWL_CONNECTION,
            kind=ConnectionKind.MWL,
            host="127.0.0.1",
            port=self.worklist.port,
            calling_ae_title=CALLING_AE_TITLE,
            called_ae_title=self.worklist.ae_title,
            test_only=True,
        )
        with self.sessions.begin() as session:
            return _upsert_connection(session, pacs), _upsert_connection(session, mwl)

    def run(self, report: Callable[[str], None]) -> DemoResult:
        """Run every step once, calling `report` with a line of progress for the operator."""
        result = DemoResult()
        pacs, mwl = self.connections()
        report(f"Connections stored in {self.config.database_url_for_display} (organization {DEMO_ORGANIZATION!r}).")

        for settings in (pacs, mwl):
            endpoint = Endpoint.from_settings(settings)
            echo_report = echo(endpoint)
            result.echo_reports[settings.name] = echo_report
            verdict = "passed" if echo_report.ok else "FAILED"
            report(f"Echo {settings.name} ({endpoint.address}): {verdict}")
            if not echo_report.ok:
                result.error = f"Echo of {settings.name} failed"
                return result

        query = WorklistQuery(modality="US", scheduled_date=datetime.date.today())
        worklist = query_worklist(Endpoint.from_settings(mwl), query)
        report(f"Worklist {mwl.name}: {len(worklist.items)} ultrasound items scheduled today.")
        if not worklist.items:
            result.error = "the sandbox worklist returned no items"
            return result
        item = worklist.items[0]
        result.worklist_item = item
        report(f"Picked worklist item with accession number {item.accession_number}.")

        study_folder = self.config.data_dir / "test-study"
        result.study_files = write_test_study(
            study_folder,
            patient=_patient_from(item),
            study_instance_uid=item.study_instance_uid,
            accession_number=item.accession_number,
        )
        report(f"Test study written to {study_folder} ({len(result.study_files)} instances).")

        error = self._upload(result.study_files, report)
        if error is not None:
            result.error = error
            return result
        self._forward(result, report)

        result.arrivals = check_arrivals(result.study_files, self.received_folder, item)
        for arrival in result.arrivals:
            where = arrival.received_path or "nowhere"
            state = "intact" if arrival.intact else "; ".join(arrival.problems)
            report(f"Arrived {arrival.sop_instance_uid} at {where}: {state}")
        return result
