"""Worklist query behaviour against pynetdicom fake SCPs: failure statuses, odd character sets, cancel."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from peers import fake_worklist_scp, raw_identifier
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.failures import DicomNetworkError, FailureKind
from pacsbridge.dicomnet.worklist import WorklistError, WorklistQuery, query_worklist
from pacsbridge.sandbox.mwl import make_worklist_item

# pydicom warns about the odd character sets these tests send on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.charset")

PENDING = 0xFF00
SUCCESS = 0x0000


def _endpoint(port: int, *, dimse_timeout: float = 30) -> Endpoint:
    return Endpoint("127.0.0.1", port, "PB_TEST", "FAKEMWL", 30, dimse_timeout, 30)


def _item(name: str = "Doe^John", *, modality: str = "US", date: str = "20240510", **keywords) -> Dataset:
    return make_worklist_item(
        patient_name=name, patient_id=f"ID-{name[:3]}", scheduled_date=date, modality=modality, **keywords
    )


def _serve(*responses: tuple[int, Dataset | None]):
    """Return a C-FIND handler that sends `responses` whatever the request."""

    def on_find(event) -> Iterator[tuple[int, Dataset | None]]:
        yield from responses

    return on_find


@pytest.mark.parametrize("status", [0xA700, 0xA900, 0xC000, 0xC311, 0x0122])
def test_failure_status_raises(status):
    with fake_worklist_scp(_serve((status, None))) as port, pytest.raises(WorklistError) as raised:
        query_worklist(_endpoint(port), WorklistQuery())

    error = raised.value
    assert error.status == status
    assert str(error).startswith("worklist query failed: ")
    assert str(error).endswith(f"(status 0x{status:04X})")
    assert error.action


def test_failure_after_matches_raises():
    # Matches that arrive before a failure must not pass for a complete worklist.
    responses = ((PENDING, _item("Alpha^A")), (PENDING, _item("Beta^B")), (0xC001, None))
    with fake_worklist_scp(_serve(*responses)) as port, pytest.raises(WorklistError) as raised:
        query_worklist(_endpoint(port), WorklistQuery())

    assert raised.value.status == 0xC001


def test_error_comment_in_message():
    status = Dataset()
    status.Status = 0xA700
    status.ErrorComment = "worklist database offline"
    with fake_worklist_scp(_serve((status, None))) as port, pytest.raises(WorklistError) as raised:
        query_worklist(_endpoint(port), WorklistQuery())

    assert "worklist database offline" in str(raised.value)
    assert raised.value.comment == "worklist database offline"


def test_unrequested_cancel_status_raises():
    responses = ((PENDING, _item()), (0xFE00, None))
    with fake_worklist_scp(_serve(*responses)) as port, pytest.raises(WorklistError) as raised:
        query_worklist(_endpoint(port), WorklistQuery())

    assert raised.value.status == 0xFE00


def test_both_pending_statuses_carry_items():
    responses = ((PENDING, _item("Alpha^A")), (0xFF01, _item("Beta^B")), (SUCCESS, None))
    with fake_worklist_scp(_serve(*responses)) as port:
        result = query_worklist(_endpoint(port), WorklistQuery())

    assert [item.patient_name for item in result.items] == ["Alpha^A", "Beta^B"]


def test_warning_final_status_recorded():
    with fake_worklist_scp(_serve((PENDING, _item()), (0xB000, None))) as port:
        result = query_worklist(_endpoint(port), WorklistQuery())

    assert len(result.items) == 1
    assert any("0xB000" in warning for warning in result.warnings)


@pytest.mark.parametrize("sent", ["ISO-IR 100", "ISO_IR100", "iso_ir 100", "ISO 8859-1"])
def test_misspelled_latin1_charset_decoded(sent):
    item = _item("Müller^Zoë", character_set="ISO_IR 100")
    with fake_worklist_scp(_serve((PENDING, raw_identifier(item, sent)), (SUCCESS, None))) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(), fallback_character_set="ISO_IR 192")

    assert [found.patient_name for found in result.items] == ["Müller^Zoë"]
    assert len(result.warnings) == 1
    assert repr(sent) in result.warnings[0]
    assert "'ISO_IR 100'" in result.warnings[0]


@pytest.mark.parametrize("sent", ["UTF-8", "utf8", "ISO_IR192", "iso-ir 192"])
def test_misspelled_utf8_charset_decoded(sent):
    item = _item("Wang^XiaoDong=王^小东", character_set="ISO_IR 192")
    with fake_worklist_scp(_serve((PENDING, raw_identifier(item, sent)), (SUCCESS, None))) as port:
        result = query_worklist(_endpoint(port), WorklistQuery())

    assert [found.patient_name for found in result.items] == ["Wang^XiaoDong=王^小东"]
    assert len(result.warnings) == 1
    assert "'ISO_IR 192'" in result.warnings[0]


def test_unknown_charset_uses_fallback_with_warning():
    item = _item("Müller^Zoë", character_set="ISO_IR 100")
    with fake_worklist_scp(_serve((PENDING, raw_identifier(item, "WESTERN")), (SUCCESS, None))) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(), fallback_character_set="ISO_IR 100")

    assert [found.patient_name for found in result.items] == ["Müller^Zoë"]
    assert "'WESTERN'" in result.warnings[0]
    assert "fallback 'ISO_IR 100'" in result.warnings[0]


def test_missing_charset_uses_fallback_silently():
    item = _item("Wang^XiaoDong=王^小东", character_set="ISO_IR 192")
    with fake_worklist_scp(_serve((PENDING, raw_identifier(item, None)), (SUCCESS, None))) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(), fallback_character_set="ISO_IR 192")

    assert [found.patient_name for found in result.items] == ["Wang^XiaoDong=王^小东"]
    assert result.warnings == []


def test_warning_recorded_once_per_value():
    items = [_item(name, character_set="ISO_IR 100") for name in ("Müller^Zoë", "Gérard^Ñuñez")]
    responses = [(PENDING, raw_identifier(item, "ISO-IR 100")) for item in items] + [(SUCCESS, None)]
    with fake_worklist_scp(_serve(*responses)) as port:
        result = query_worklist(_endpoint(port), WorklistQuery())

    assert sorted(found.patient_name for found in result.items) == ["Gérard^Ñuñez", "Müller^Zoë"]
    assert len(result.warnings) == 1


def _two_step_item(name: str, first: tuple[str, str], second: tuple[str, str]) -> Dataset:
    item = _item(name, modality=first[0], date=first[1])
    extra = Dataset()
    extra.Modality = second[0]
    extra.ScheduledProcedureStepStartDate = second[1]
    extra.ScheduledProcedureStepStartTime = "120000"
    item.ScheduledProcedureStepSequence.append(extra)
    return item


def test_local_filter_checks_every_step():
    # This SCP ignores the matching keys, like servers that match only part of the query.
    responses = (
        (PENDING, _item("Ct^Only", modality="CT")),
        (PENDING, _two_step_item("Ct^ThenUs", ("CT", "20240510"), ("US", "20240510"))),
        (PENDING, _item("Us^OtherDay", modality="US", date="20240601")),
        (PENDING, _item("Us^SameDay", modality="US", date="20240510")),
        (SUCCESS, None),
    )
    with fake_worklist_scp(_serve(*responses)) as port:
        ultrasound = query_worklist(_endpoint(port), WorklistQuery(modality="US"))
        same_day = query_worklist(_endpoint(port), WorklistQuery(modality="US", scheduled_date="20240510"))
        any_modality = query_worklist(_endpoint(port), WorklistQuery(modality=None))

    assert sorted(item.patient_name for item in ultrasound.items) == ["Ct^ThenUs", "Us^OtherDay", "Us^SameDay"]
    assert sorted(item.patient_name for item in same_day.items) == ["Ct^ThenUs", "Us^SameDay"]
    assert len(any_modality.items) == 4


def test_local_filter_needs_one_step_matching_both():
    responses = (
        (PENDING, _two_step_item("Split^Keys", ("US", "20240601"), ("CT", "20240510"))),
        (SUCCESS, None),
    )
    with fake_worklist_scp(_serve(*responses)) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(modality="US", scheduled_date="20240510"))

    assert result.items == []


def test_cancel_sent_past_max_items():
    cancelled = threading.Event()

    def on_find(event) -> Iterator[tuple[int, Dataset | None]]:
        for index in range(3):
            yield PENDING, _item(f"Patient^{index}", scheduled_time=f"0{index}0000")
        # Wait (bounded) for the C-CANCEL, as a server with a long worklist would still be sending.
        for _ in range(200):
            if event.is_cancelled:
                cancelled.set()
                yield 0xFE00, None
                return
            threading.Event().wait(0.05)
        yield SUCCESS, None

    with fake_worklist_scp(on_find) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(), max_items=2)

    assert cancelled.is_set()
    assert result.truncated is True
    assert [item.patient_name for item in result.items] == ["Patient^0", "Patient^1"]


def test_dimse_timeout_raises_network_error():
    release = threading.Event()

    def on_find(event) -> Iterator[tuple[int, Dataset | None]]:
        release.wait(10)
        yield SUCCESS, None

    with fake_worklist_scp(on_find) as port:
        try:
            with pytest.raises(DicomNetworkError) as raised:
                query_worklist(_endpoint(port, dimse_timeout=1), WorklistQuery())
        finally:
            release.set()

    assert raised.value.failure.kind == FailureKind.DIMSE_TIMEOUT
    assert "1 s" in raised.value.failure.summary


def test_peer_abort_raises_network_error():
    def on_find(event) -> Iterator[tuple[int, Dataset | None]]:
        yield PENDING, _item()
        event.assoc.abort()
        yield SUCCESS, None

    with fake_worklist_scp(on_find) as port, pytest.raises(DicomNetworkError) as raised:
        query_worklist(_endpoint(port), WorklistQuery())

    assert raised.value.failure.kind == FailureKind.ABORTED
    assert raised.value.failure.summary == "The SCP aborted the association."


def test_scp_without_worklist_service():
    ae = AE(ae_title="FAKEMWL")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        with pytest.raises(DicomNetworkError) as raised:
            query_worklist(_endpoint(server.server_address[1]), WorklistQuery())
    finally:
        server.shutdown()

    assert raised.value.failure.kind == FailureKind.NO_PRESENTATION_CONTEXT


def _station_step(modality: str, station_ae_title: str, station_name: str) -> Dataset:
    step = Dataset()
    step.Modality = modality
    step.ScheduledProcedureStepStartDate = "20240510"
    step.ScheduledStationAETitle = station_ae_title
    step.ScheduledStationName = station_name
    step.ScheduledProcedureStepLocation = f"{station_name} room"
    return step


def test_local_filter_station_keys_any_step():
    item = _item("Ct^ThenUs")
    item.ScheduledProcedureStepSequence = [
        _station_step("CT", "CT_ROOM_1", "CT1"),
        _station_step("US", "PB_US1", "ECHO1"),
    ]
    responses = ((PENDING, item), (SUCCESS, None))
    queries = {
        "us_station": WorklistQuery(scheduled_station_ae_title="PB_US1"),
        "us_station_name": WorklistQuery(scheduled_station_name="ECHO*"),
        "us_location": WorklistQuery(scheduled_procedure_step_location="ECHO1 room"),
        "us_on_ct_station": WorklistQuery(scheduled_station_ae_title="CT_ROOM_1"),
        "us_on_ct_name": WorklistQuery(scheduled_station_name="CT1"),
    }
    with fake_worklist_scp(_serve(*responses)) as port:
        counts = {name: len(query_worklist(_endpoint(port), query).items) for name, query in queries.items()}

    assert counts == {
        "us_station": 1,
        "us_station_name": 1,
        "us_location": 1,
        "us_on_ct_station": 0,
        "us_on_ct_name": 0,
    }


def test_keep_responses_lists_removed_items():
    responses = (
        (PENDING, _item("Ct^Only", modality="CT")),
        (PENDING, _item("Us^Kept", modality="US")),
        (SUCCESS, None),
    )
    with fake_worklist_scp(_serve(*responses)) as port:
        result = query_worklist(_endpoint(port), WorklistQuery(), keep_responses=True)
        quiet = query_worklist(_endpoint(port), WorklistQuery())

    assert [response.kept for response in result.responses] == [False, True]
    assert str(result.responses[0].identifier.PatientName) == "Ct^Only"
    assert [item.patient_name for item in result.items] == ["Us^Kept"]
    assert quiet.responses == []
