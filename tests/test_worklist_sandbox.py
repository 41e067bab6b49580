"""The sandbox worklist SCP: C-ECHO, C-FIND matching, called AE title check, cancel."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from pynetdicom import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsbridge.dicomnet.association import Endpoint, association
from pacsbridge.dicomnet.failures import DicomNetworkError, FailureKind
from pacsbridge.dicomnet.worklist import WorklistQuery, query_worklist
from pacsbridge.sandbox.mwl import SandboxWorklistServer, make_worklist_item

SANDBOX_AE = "PB-SANDBOX-MWL"

ITEMS = [
    make_worklist_item(
        patient_name="Müller^Zoë",
        patient_id="SB-001",
        birth_date=datetime.date(1980, 1, 1),
        sex="F",
        accession_number="SBACC1",
        scheduled_date=datetime.date(2024, 5, 10),
        scheduled_time="101500",
        station_ae_title="US_ROOM_1",
    ),
    make_worklist_item(
        patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
        patient_id="SB-002",
        scheduled_date="20240510",
        scheduled_time="080000",
        station_ae_title="US_ROOM_2",
        character_set="\\ISO 2022 IR 87",
    ),
    make_worklist_item(
        patient_name="Wang^XiaoDong=王^小东",
        patient_id="SB-003",
        scheduled_date="20240512",
        station_ae_title="US_ROOM_1",
        character_set="ISO_IR 192",
    ),
    make_worklist_item(
        patient_name="Doe^Jane",
        patient_id="SB-004",
        scheduled_date="20240510",
        modality="CT",
        station_ae_title="CT_ROOM_1",
    ),
]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxWorklistServer]:
    with SandboxWorklistServer(ITEMS) as server:
        yield server


def _endpoint(server: SandboxWorklistServer, called: str = SANDBOX_AE) -> Endpoint:
    return Endpoint("127.0.0.1", server.port, "PB_TEST", called, 30, 30, 30)


def _ids(server: SandboxWorklistServer, query: WorklistQuery) -> list[str | None]:
    return [item.patient_id for item in query_worklist(_endpoint(server), query).items]


def test_sandbox_binds_free_port(sandbox):
    assert sandbox.port > 0


def test_sandbox_responds_to_echo(sandbox):
    with association(_endpoint(sandbox), [build_context(Verification)]) as assoc:
        status = assoc.send_c_echo()

    assert status.Status == 0x0000


def test_sandbox_returns_exact_names(sandbox):
    result = query_worklist(_endpoint(sandbox), WorklistQuery(modality=None))

    names = {item.patient_id: item.patient_name for item in result.items}
    assert names == {
        "SB-001": "Müller^Zoë",
        "SB-002": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "SB-003": "Wang^XiaoDong=王^小东",
        "SB-004": "Doe^Jane",
    }
    assert result.warnings == []


def test_sandbox_returns_item_fields(sandbox):
    result = query_worklist(_endpoint(sandbox), WorklistQuery(patient_id="SB-001"))

    item = result.items[0]
    assert item.birth_date == "19800101"
    assert item.sex == "F"
    assert item.accession_number == "SBACC1"
    assert item.study_instance_uid
    assert item.requested_procedure_description == "Point-of-care ultrasound"
    step = item.scheduled_steps[0]
    assert step.start_date == "20240510"
    assert step.start_time == "101500"
    assert step.station_ae_title == "US_ROOM_1"
    assert step.modality == "US"


def test_sandbox_modality_filter(sandbox):
    assert _ids(sandbox, WorklistQuery(modality="US")) == ["SB-002", "SB-001", "SB-003"]
    assert _ids(sandbox, WorklistQuery(modality="CT")) == ["SB-004"]


def test_sandbox_date_filters(sandbox):
    assert _ids(sandbox, WorklistQuery(scheduled_date="20240510")) == ["SB-002", "SB-001"]
    assert _ids(sandbox, WorklistQuery(scheduled_date="20240511-20240531")) == ["SB-003"]
    assert _ids(sandbox, WorklistQuery(scheduled_date="-20240509")) == []


def test_sandbox_name_wildcards(sandbox):
    assert _ids(sandbox, WorklistQuery(patient_name="mül*")) == ["SB-001"]
    assert _ids(sandbox, WorklistQuery(patient_name="Yamada^Tar?u*")) == ["SB-002"]
    assert _ids(sandbox, WorklistQuery(patient_name="山田*", character_set="ISO_IR 192")) == ["SB-002"]
    assert _ids(sandbox, WorklistQuery(patient_name="王*", character_set="ISO_IR 192")) == ["SB-003"]


def test_sandbox_id_and_station_filters(sandbox):
    assert _ids(sandbox, WorklistQuery(patient_id="SB-00?")) == ["SB-002", "SB-001", "SB-003"]
    assert _ids(sandbox, WorklistQuery(scheduled_station_ae_title="US_ROOM_1")) == ["SB-001", "SB-003"]


def test_sandbox_rejects_unknown_called_ae(sandbox):
    with pytest.raises(DicomNetworkError) as raised:
        query_worklist(_endpoint(sandbox, "SOMEONE_ELSE"), WorklistQuery())

    failure = raised.value.failure
    assert failure.kind == FailureKind.REJECTED
    assert failure.codes == {"result": 1, "source": 1, "reason": 7}


def test_sandbox_truncates_with_cancel(sandbox):
    result = query_worklist(_endpoint(sandbox), WorklistQuery(modality=None), max_items=1)

    assert result.truncated is True
    assert len(result.items) == 1


def test_sandbox_start_twice_raises():
    with SandboxWorklistServer([]) as server, pytest.raises(RuntimeError, match="already running"):
        server.start()
    server.stop()


def test_make_worklist_item_without_charset():
    item = make_worklist_item(patient_name="Doe^John", patient_id="X1", scheduled_date="20240510", character_set=None)

    assert "SpecificCharacterSet" not in item
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "X1"
    assert item.RequestedProcedureID == "X1"
