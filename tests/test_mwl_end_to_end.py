"""A worklist pick end to end: `worklist --connection`, `upload --worklist-item`, `worker --drain`, DCMTK storescp.

The worklist is DCMTK wlmscpfs and the PACS is DCMTK storescp, each on a free
127.0.0.1 port with its own folder.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import make_worklist_folder, require_dcmtk, wlmscpfs, write_worklist_file
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from typer.testing import CliRunner, Result

import pacsbridge.cli.main  # noqa: F401  (registers every command on the app)
from pacsbridge.cli.app import app
from pacsbridge.config import load_config
from pacsbridge.db import close_database, open_database
from pacsbridge.db.forwarding import Study
from pacsbridge.ingest.testimages import write_test_study
from pacsbridge.sandbox.mwl import make_worklist_item

pytestmark = pytest.mark.dcmtk

runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None})
# The worker configures the root logger, so it runs in a process of its own, as in production.
CLI = [sys.executable, "-m", "pacsbridge.cli.main"]

CALLED_AE = "PB_MWL"
CALLING_AE = "PB_US1"
MWL = "Hospital MWL"
PACS = "Test PACS"
ARCHIVE = "Test archive"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
ACCENTED = "Müller^Zoë"
WORKLIST_STUDY_UID = "1.2.826.0.1.3680043.10.1138.7.1"
REFERENCED_STUDY_UID = "1.2.826.0.1.3680043.10.1138.7.99"


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _japanese_item() -> Dataset:
    item = make_worklist_item(
        patient_name=JAPANESE,
        patient_id="E2E-1",
        issuer_of_patient_id="HOSPITAL_A",
        birth_date="19900315",
        sex="M",
        accession_number="E2EACC1",
        study_instance_uid=WORKLIST_STUDY_UID,
        requested_procedure_id="RP-E2E-1",
        requested_procedure_description="Abdominal ultrasound",
        step_id="SPS-E2E-1",
        step_description="Liver and gallbladder",
        scheduled_date=_today(),
        station_ae_title=CALLING_AE,
        character_set="\\ISO 2022 IR 87",
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    reference.ReferencedSOPInstanceUID = REFERENCED_STUDY_UID
    item.ReferencedStudySequence = [reference]
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS_A"
    item.IssuerOfAccessionNumberSequence = [issuer]
    return item


def _accented_item(accession: str, patient_id: str) -> Dataset:
    return make_worklist_item(
        patient_name=ACCENTED,
        patient_id=patient_id,
        accession_number=accession,
        scheduled_date=_today(),
        scheduled_time="110000",
        station_ae_title=CALLING_AE,
    )


@pytest.fixture(scope="module")
def worklist_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    require_dcmtk("wlmscpfs")
    root = tmp_path_factory.mktemp("e2e-worklists")
    folder = make_worklist_folder(root, CALLED_AE)
    write_worklist_file(_japanese_item(), folder / "japanese.wl")
    write_worklist_file(_accented_item("E2EACC2", "E2E-2"), folder / "accented.wl")
    # Two items with one accession number, which --worklist-item must reject as ambiguous.
    write_worklist_file(_accented_item("E2EDUP", "E2E-3"), folder / "duplicate-1.wl")
    write_worklist_file(_accented_item("E2EDUP", "E2E-4"), folder / "duplicate-2.wl")
    with wlmscpfs(root, "--keep-char-set") as port:
        yield port


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)])


def run_ok(data_dir: Path, *args: str) -> Result:
    result = run(data_dir, *args)
    assert result.exit_code == 0, result.output
    return result


def _add_connection(data_dir: Path, name: str, kind: str, port: int, called_ae: str, *extra: str) -> None:
    run_ok(
        data_dir,
        "connections",
        "add",
        name,
        "--kind",
        kind,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--calling-aet",
        CALLING_AE,
        "--called-aet",
        called_ae,
        "--timezone",
        "UTC",
        "--acse-timeout",
        "10",
        "--dimse-timeout",
        "10",
        "--connection-timeout",
        "10",
        *extra,
    )


@pytest.fixture
def data_dir(tmp_path: Path, worklist_port: int) -> Path:
    """A data folder with the worklist connection and an empty test archive without links."""
    folder = tmp_path / "data"
    _add_connection(folder, MWL, "mwl", worklist_port, CALLED_AE)
    run_ok(folder, "archives", "create", ARCHIVE, "--test")
    return folder


def _studies(data_dir: Path) -> list[dict]:
    return json.loads(run_ok(data_dir, "studies", "list", "--json").stdout)


def test_pick_flows_to_pacs(data_dir, tmp_path, start_storescp):
    storescp = start_storescp()
    # The PACS takes UTF-8: its default, ISO_IR 100, cannot hold the Japanese name.
    _add_connection(data_dir, PACS, "pacs", storescp.port, storescp.ae_title, "--charset", "ISO_IR 192")
    run_ok(data_dir, "archives", "link", ARCHIVE, PACS)

    listed = json.loads(run_ok(data_dir, "worklist", "--connection", MWL, "--json").stdout)
    picked = next(item for item in listed["items"] if item["patient_name"] == JAPANESE)
    originals = write_test_study(tmp_path / "images")
    uploaded = run_ok(
        data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", picked["accession_number"], str(tmp_path / "images"), "--json"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PACSBRIDGE_")}
    drained = subprocess.run(
        [*CLI, "worker", "--drain", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )

    upload = json.loads(uploaded.stdout)
    assert upload["counts"]["accepted"] == 3
    assert upload["worklist_item"]["study_instance_uid"] == WORKLIST_STUDY_UID
    assert upload["worklist_item"]["performed_step_ids"] == ["SPS-E2E-1"]
    assert drained.returncode == 0, drained.stderr

    received = [dcmread(path) for path in storescp.received()]
    original_uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in originals}
    assert {str(ds.SOPInstanceUID) for ds in received} == original_uids
    for ds in received:
        assert ds.StudyInstanceUID == WORKLIST_STUDY_UID
        assert ds.AccessionNumber == "E2EACC1"
        # DCMTK 3.6.7 wlmscpfs does not return Issuer of Accession Number Sequence, so none is written.
        assert "IssuerOfAccessionNumberSequence" not in ds
        assert str(ds.PatientName) == JAPANESE
        assert ds.PatientID == "E2E-1"
        assert ds.IssuerOfPatientID == "HOSPITAL_A"
        assert ds.PatientBirthDate == "19900315"
        assert ds.PatientSex == "M"
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == REFERENCED_STUDY_UID
        request = ds.RequestAttributesSequence[0]
        assert request.RequestedProcedureID == "RP-E2E-1"
        assert request.RequestedProcedureDescription == "Abdominal ultrasound"
        assert request.ScheduledProcedureStepID == "SPS-E2E-1"
        assert request.ScheduledProcedureStepDescription == "Liver and gallbladder"
        assert request.AccessionNumber == "E2EACC1"
        assert request.StudyInstanceUID == WORKLIST_STUDY_UID


def test_pick_stored_on_study_row(data_dir, tmp_path):
    write_test_study(tmp_path / "images")

    run_ok(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", "SPS-E2E-1", str(tmp_path / "images"))

    [study] = _studies(data_dir)
    assert study["study_instance_uid"] == WORKLIST_STUDY_UID
    assert study["patient_id"] == "E2E-1"
    assert study["patient_name"] == JAPANESE
    assert study["accession_number"] == "E2EACC1"
    assert study["issuer_of_patient_id"] == "HOSPITAL_A"
    sessions = open_database(load_config(data_dir, environ={}))
    try:
        with sessions.begin() as session:
            attributes = session.scalars(select(Study)).one().worklist_attributes
    finally:
        close_database(sessions)
    assert attributes["accession_number"] == "E2EACC1"
    assert attributes["performed_step_ids"] == ["SPS-E2E-1"]
    assert attributes["item_id"] == "SPS-E2E-1"


def test_pick_latin1_name_kept_charset(data_dir, tmp_path):
    paths = write_test_study(tmp_path / "images")

    run_ok(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", "E2EACC2", str(paths[0]))

    [study] = _studies(data_dir)
    assert study["patient_name"] == ACCENTED
    assert study["patient_id"] == "E2E-2"


def test_unknown_item_stores_nothing(data_dir, tmp_path):
    write_test_study(tmp_path / "images")

    result = run(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", "NO-SUCH-ID", str(tmp_path / "images"))

    assert result.exit_code == 1
    assert "no worklist item has accession number or scheduled procedure step ID 'NO-SUCH-ID'" in result.stderr
    assert "Nothing was stored" in result.stderr
    assert _studies(data_dir) == []


def test_ambiguous_item_stores_nothing(data_dir, tmp_path):
    write_test_study(tmp_path / "images")

    result = run(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", "E2EDUP", str(tmp_path / "images"))

    assert result.exit_code == 1
    assert "2 worklist items carry the ID 'E2EDUP'" in result.stderr
    assert _studies(data_dir) == []


def test_two_studies_rejected(data_dir, tmp_path):
    first = write_test_study(tmp_path / "first")
    second = write_test_study(tmp_path / "second")

    result = run(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", "E2EACC1", str(first[0]), str(second[0]))

    assert result.exit_code == 2
    assert "the files belong to 2 studies" in result.stderr
    assert _studies(data_dir) == []


@pytest.mark.parametrize("item_id", ["E2E*", "", "A" * 17])
def test_invalid_item_id_exit_2(data_dir, tmp_path, item_id):
    paths = write_test_study(tmp_path / "images")

    result = run(data_dir, "upload", "--archive", ARCHIVE, "--worklist-item", item_id, str(paths[0]))

    assert result.exit_code == 2
    assert "worklist item ID" in result.stderr


def test_upload_without_worklist_connection(tmp_path):
    folder = tmp_path / "data"
    run_ok(folder, "archives", "create", ARCHIVE, "--test")
    paths = write_test_study(tmp_path / "images")

    result = run(folder, "upload", "--archive", ARCHIVE, "--worklist-item", "E2EACC1", str(paths[0]))

    assert result.exit_code == 1
    assert "no Modality Worklist connection is configured" in result.stderr
    assert _studies(folder) == []
