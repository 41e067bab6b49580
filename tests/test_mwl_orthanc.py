"""Worklist queries against the Modality Worklists plugin of Debian's Orthanc 1.10.1."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc_peers import OrthancWorklist, orthanc_worklist
from pydicom.dataset import Dataset
from typer.testing import CliRunner, Result

import pacsbridge.cli.main  # noqa: F401  (registers every command on the app)
from pacsbridge.cli.app import app
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.failures import DicomNetworkError
from pacsbridge.dicomnet.worklist import WorklistQuery, query_worklist
from pacsbridge.sandbox.mwl import make_worklist_item

runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None})

CALLING_AE = "PB_US1"
MWL = "Orthanc MWL"
CHINESE = "Wang^XiaoDong=王^小东"


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _step(modality: str, step_id: str, time: str) -> Dataset:
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = CALLING_AE
    step.ScheduledProcedureStepStartDate = _today().strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = time
    step.ScheduledProcedureStepID = step_id
    step.ScheduledProcedureStepDescription = f"{modality} step"
    return step


def _ct_then_us() -> Dataset:
    item = make_worklist_item(
        patient_name="Ct^ThenUs", patient_id="OR-1", accession_number="ORACC1", scheduled_date=_today()
    )
    item.ScheduledProcedureStepSequence = [_step("CT", "OR-CT-1", "080000"), _step("US", "OR-US-1", "093000")]
    return item


def _minimal() -> Dataset:
    """An item with only a name, an ID and one step: no birth date, sex, accession number or Study Instance UID."""
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.PatientName = "Müller^Zoë"
    item.PatientID = "OR-2"
    step = Dataset()
    step.Modality = "US"
    step.ScheduledStationAETitle = CALLING_AE
    step.ScheduledProcedureStepStartDate = _today().strftime("%Y%m%d")
    item.ScheduledProcedureStepSequence = [step]
    return item


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancWorklist]:
    folder = tmp_path_factory.mktemp("orthanc-mwl")
    with orthanc_worklist(folder, calling_ae_titles=(CALLING_AE,)) as peer:
        peer.add_item("ct-then-us", _ct_then_us())
        peer.add_item("minimal", _minimal())
        peer.add_item(
            "chinese",
            make_worklist_item(
                patient_name=CHINESE,
                patient_id="OR-3",
                accession_number="ORACC3",
                scheduled_date=_today(),
                scheduled_time="110000",
                station_ae_title=CALLING_AE,
                character_set="ISO_IR 192",
            ),
        )
        peer.add_item(
            "ct-only",
            make_worklist_item(
                patient_name="Doe^Jane",
                patient_id="OR-4",
                accession_number="ORACC4",
                scheduled_date=_today(),
                modality="CT",
                station_ae_title=CALLING_AE,
            ),
        )
        # The plugin reads only files ending in .wl, so this one is never served.
        (peer.database / "ignored.dcm").write_bytes((peer.database / "ct-only.wl").read_bytes())
        yield peer


def _endpoint(peer: OrthancWorklist, called: str | None = None) -> Endpoint:
    return Endpoint("127.0.0.1", peer.port, CALLING_AE, called or peer.ae_title, 10, 10, 10)


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)])


def test_orthanc_any_modality(orthanc):
    result = query_worklist(_endpoint(orthanc), WorklistQuery(modality=None))

    assert sorted(item.patient_id for item in result.items) == ["OR-1", "OR-2", "OR-3", "OR-4"]
    two_steps = next(item for item in result.items if item.patient_id == "OR-1")
    assert [step.modality for step in two_steps.scheduled_steps] == ["CT", "US"]


def test_orthanc_us_second_step_kept(orthanc):
    result = query_worklist(_endpoint(orthanc), WorklistQuery(modality="US", scheduled_station_ae_title=CALLING_AE))

    assert sorted(item.patient_id for item in result.items) == ["OR-1", "OR-2", "OR-3"]
    two_steps = next(item for item in result.items if item.patient_id == "OR-1")
    # Orthanc 1.10.1 returns only the sequence items that match the step keys.
    assert [step.step_id for step in two_steps.scheduled_steps] == ["OR-US-1"]


def test_orthanc_missing_keys_tolerated(orthanc):
    result = query_worklist(_endpoint(orthanc), WorklistQuery(patient_id="OR-2"))

    assert len(result.items) == 1
    item = result.items[0]
    assert item.patient_name == "Müller^Zoë"
    assert item.birth_date is None
    assert item.sex is None
    assert item.accession_number is None
    assert item.study_instance_uid is None
    assert item.scheduled_steps[0].start_time is None
    assert result.warnings == []


def test_orthanc_utf8_name_search(orthanc):
    query = WorklistQuery(modality=None, patient_name="Wang*", character_set="ISO_IR 192")

    result = query_worklist(_endpoint(orthanc), query)

    assert [item.patient_name for item in result.items] == [CHINESE]
    assert result.items[0].patient_name_components["ideographic"] == "王^小东"


def test_orthanc_wrong_called_ae_fails(orthanc):
    with pytest.raises(DicomNetworkError):
        query_worklist(_endpoint(orthanc, "NOT_ORTHANC"), WorklistQuery())


def test_orthanc_stored_connection(orthanc, tmp_path):
    added = run(
        tmp_path,
        "connections",
        "add",
        MWL,
        "--kind",
        "mwl",
        "--host",
        "127.0.0.1",
        "--port",
        str(orthanc.port),
        "--calling-aet",
        CALLING_AE,
        "--called-aet",
        orthanc.ae_title,
        "--timezone",
        "UTC",
    )
    assert added.exit_code == 0, added.output

    result = run(tmp_path, "worklist", "--connection", MWL, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [item["patient_id"] for item in data["items"]] == ["OR-1", "OR-3", "OR-2"]
