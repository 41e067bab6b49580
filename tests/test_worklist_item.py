"""Choosing a worklist item by ID and writing its identifiers into instances, without a network."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacsbridge.dicomnet.worklist import WorklistQuery, WorklistResult, convert_identifier
from pacsbridge.ingest.testimages import TestPatient, write_test_study
from pacsbridge.ingest.worklist_item import (
    WorklistItemError,
    select_worklist_item,
    write_with_worklist_item,
)
from pacsbridge.sandbox.mwl import make_worklist_item

CHINESE = "Wang^XiaoDong=王^小东"


def _step(modality: str, step_id: str) -> Dataset:
    step = Dataset()
    step.Modality = modality
    step.ScheduledProcedureStepStartDate = "20240510"
    step.ScheduledProcedureStepID = step_id
    step.ScheduledProcedureStepDescription = f"{modality} step"
    return step


def _item(accession: str, *, name: str = "Doe^John", charset: str = "ISO_IR 100", **keywords) -> Dataset:
    return make_worklist_item(
        patient_name=name,
        patient_id=f"ID-{accession}",
        accession_number=accession,
        scheduled_date="20240510",
        character_set=charset,
        **keywords,
    )


def _result(*items: Dataset, truncated: bool = False) -> WorklistResult:
    return WorklistResult([convert_identifier(item) for item in items], [], truncated, Dataset())


def test_select_by_accession_uses_matching_steps():
    item = _item("ACC1")
    item.ScheduledProcedureStepSequence = [_step("CT", "STEP-CT"), _step("US", "STEP-US")]

    pick = select_worklist_item(_result(item, _item("ACC2")), WorklistQuery(modality="US"), "ACC1")

    assert pick.item.accession_number == "ACC1"
    assert [step.step_id for step in pick.steps] == ["STEP-US"]


def test_select_by_step_id():
    item = _item("ACC1")
    item.ScheduledProcedureStepSequence = [_step("CT", "STEP-CT"), _step("US", "STEP-US")]

    pick = select_worklist_item(_result(item), WorklistQuery(modality="US"), " STEP-CT ")

    assert [step.step_id for step in pick.steps] == ["STEP-CT"]
    assert pick.item_id == "STEP-CT"


def test_select_none_matches():
    with pytest.raises(WorklistItemError, match="no worklist item .* 'ACC9' among the 1 items"):
        select_worklist_item(_result(_item("ACC1")), WorklistQuery(), "ACC9")


def test_select_truncated_hint():
    with pytest.raises(WorklistItemError, match="may be among those not returned"):
        select_worklist_item(_result(_item("ACC1"), truncated=True), WorklistQuery(), "ACC9")


def test_select_ambiguous():
    other = _item("ACC2", step_id="ACC1")

    with pytest.raises(WorklistItemError, match="2 worklist items carry the ID 'ACC1'") as raised:
        select_worklist_item(_result(_item("ACC1"), other), WorklistQuery(), "ACC1")
    # Each match is named by its identifiers, so the admin can pick one by its step ID.
    assert "accession number 'ACC2', step ID 'ACC1'" in str(raised.value)


@pytest.fixture
def test_image(tmp_path: Path) -> Path:
    patient = TestPatient(family_name="Old", given_name="Patient", issuer_of_patient_id="OLD_ISSUER")
    return write_test_study(tmp_path / "images", patient=patient)[0]


def _rewrite(source: Path, raw: Dataset, tmp_path: Path, query: WorklistQuery | None = None) -> Dataset:
    accession = raw.AccessionNumber
    pick = select_worklist_item(_result(raw), query or WorklistQuery(), accession)
    target = tmp_path / "rewritten.dcm"
    write_with_worklist_item(source, target, pick)
    return dcmread(target)


def test_rewrite_utf8_switch_keeps_pixels(test_image, tmp_path):
    raw = _item("ACC1", name=CHINESE, charset="ISO_IR 192")
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS_A"
    raw.IssuerOfAccessionNumberSequence = [issuer]
    original = dcmread(test_image)

    rewritten = _rewrite(test_image, raw, tmp_path)

    assert original.SpecificCharacterSet == "ISO_IR 100"
    assert rewritten.SpecificCharacterSet == "ISO_IR 192"
    assert str(rewritten.PatientName) == CHINESE
    assert rewritten.SOPInstanceUID == original.SOPInstanceUID
    assert rewritten.PixelData == original.PixelData
    assert rewritten.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert rewritten.StudyDescription == original.StudyDescription
    assert rewritten.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS_A"
    assert rewritten.RequestAttributesSequence[0].IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS_A"


def test_rewrite_latin1_keeps_charset(test_image, tmp_path):
    rewritten = _rewrite(test_image, _item("ACC1", name="Müller^Zoë"), tmp_path)

    assert rewritten.SpecificCharacterSet == "ISO_IR 100"
    assert str(rewritten.PatientName) == "Müller^Zoë"


def test_rewrite_removes_old_identifiers(test_image, tmp_path):
    raw = _item("ACC1")
    raw.StudyInstanceUID = ""
    original = dcmread(test_image)

    rewritten = _rewrite(test_image, raw, tmp_path)

    assert original.IssuerOfPatientID == "OLD_ISSUER"
    assert "IssuerOfPatientID" not in rewritten
    assert rewritten.PatientBirthDate == ""
    assert rewritten.PatientSex == ""
    assert rewritten.PatientID == "ID-ACC1"
    assert rewritten.AccessionNumber == "ACC1"
    # Without a Study Instance UID in the item, the file's own stays.
    assert rewritten.StudyInstanceUID == original.StudyInstanceUID
    assert "StudyInstanceUID" not in rewritten.RequestAttributesSequence[0]
    assert "ReferencedStudySequence" not in rewritten


def test_rewrite_valid_for_dciodvfy(test_image, tmp_path):
    dciodvfy = require_tool("dciodvfy")
    raw = _item("ACC1", name=CHINESE, charset="ISO_IR 192")
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1138.8.1"
    raw.ReferencedStudySequence = [reference]
    _rewrite(test_image, raw, tmp_path)

    before = subprocess.run([dciodvfy, str(test_image)], capture_output=True, text=True, timeout=30, check=False)
    rewritten = str(tmp_path / "rewritten.dcm")
    after = subprocess.run([dciodvfy, rewritten], capture_output=True, text=True, timeout=30, check=False)

    def findings(output: subprocess.CompletedProcess) -> set[str]:
        return {line for line in (output.stdout + output.stderr).splitlines() if line.startswith(("Error", "Warning"))}

    assert findings(after) <= findings(before)
