"""Stored worklist filters: validation messages, the date window in the SCP's time zone, the identifier built."""

from __future__ import annotations

import datetime
import re

import pytest
from pydicom.dataset import Dataset

from pacsbridge.connections import ConnectionKind, ConnectionSettings, InvalidSettingsError
from pacsbridge.dicomnet.worklist import build_identifier
from pacsbridge.dicomnet.worklist_filters import (
    MAX_WINDOW_DAYS,
    WorklistFilters,
    build_stored_query,
    check_worklist_filters,
    parse_worklist_filters,
    scheduled_window,
)

CALLING_AE = "PB_US1"
# 23:30 UTC on 10 May 2024: already 11 May in Auckland, still 10 May in Los Angeles.
LATE_EVENING_UTC = datetime.datetime(2024, 5, 10, 23, 30, tzinfo=datetime.UTC)


def _settings(filters: dict, *, timezone: str = "UTC", character_set: str = "ISO_IR 100") -> ConnectionSettings:
    return ConnectionSettings(
        name="Hospital MWL",
        kind=ConnectionKind.MWL,
        host="127.0.0.1",
        port=11112,
        calling_ae_title=CALLING_AE,
        called_ae_title="PB_MWL",
        timezone=timezone,
        character_set=character_set,
        worklist_filters=filters,
    )


def _parse(filters: object, character_set: str = "ISO_IR 100") -> WorklistFilters:
    return parse_worklist_filters(filters, CALLING_AE, character_set)


def test_filters_defaults():
    filters = _parse({})

    assert filters.modality == "US"
    assert filters.scheduled_station_ae_title == CALLING_AE
    assert filters.days_back == 0
    assert filters.days_forward == 0
    assert filters.scheduled_station_name is None
    assert filters.scheduled_procedure_step_location is None


@pytest.mark.parametrize("value", [False, "", None])
def test_filters_station_left_out(value):
    assert _parse({"scheduled_station_ae_title": value}).scheduled_station_ae_title is None


@pytest.mark.parametrize("value", ["*", "", None])
def test_filters_any_modality(value):
    assert _parse({"modality": value}).modality is None


def test_filters_all_keys():
    filters = _parse(
        {
            "modality": "ct",
            "scheduled_station_ae_title": "CT_ROOM_1",
            "days_back": 2,
            "days_forward": 7,
            "scheduled_station_name": "Zürich*",
            "scheduled_procedure_step_location": "ER",
        }
    )

    assert filters == WorklistFilters("CT", "CT_ROOM_1", 2, 7, "Zürich*", "ER")


@pytest.mark.parametrize(
    ("filters", "fragments"),
    [
        ([], ["worklist_filters", "is not a JSON object"]),
        ({"modalty": "US"}, ["worklist_filters.modalty", "is not a worklist filter", "days_back"]),
        ({"modality": "ultra sound!"}, ["worklist_filters.modality", "not a DICOM modality code"]),
        ({"modality": 5}, ["worklist_filters.modality", "is not a modality code"]),
        ({"days_back": -1}, ["worklist_filters.days_back", f"outside 0 to {MAX_WINDOW_DAYS}"]),
        ({"days_forward": MAX_WINDOW_DAYS + 1}, ["worklist_filters.days_forward", "outside"]),
        ({"days_back": True}, ["worklist_filters.days_back", "whole number"]),
        ({"days_back": 1.5}, ["worklist_filters.days_back", "whole number"]),
        ({"scheduled_station_ae_title": "A" * 17}, ["worklist_filters.scheduled_station_ae_title"]),
        ({"scheduled_station_ae_title": 7}, ["worklist_filters.scheduled_station_ae_title", "AE title"]),
        ({"scheduled_station_name": "X" * 17}, ["worklist_filters.scheduled_station_name", "more than the 16"]),
        ({"scheduled_procedure_step_location": "A\\B"}, ["scheduled_procedure_step_location", "backslash"]),
    ],
)
def test_filters_invalid_messages(filters, fragments):
    problems = check_worklist_filters(filters, CALLING_AE, "ISO_IR 100")

    assert problems
    message = " ".join(problem.message for problem in problems)
    for fragment in fragments:
        assert fragment in message


def test_filters_every_problem_reported():
    with pytest.raises(InvalidSettingsError) as raised:
        _parse({"days_back": -1, "days_forward": "x", "modality": "?!"})

    fields = {problem.field for problem in raised.value.problems}
    assert fields == {"worklist_filters.days_back", "worklist_filters.days_forward", "worklist_filters.modality"}


def test_filters_pattern_must_fit_charset():
    assert _parse({"scheduled_station_name": "Zürich"}).scheduled_station_name == "Zürich"
    problems = check_worklist_filters({"scheduled_station_name": "東京"}, CALLING_AE, "ISO_IR 100")

    assert len(problems) == 1
    assert "cannot encode" in problems[0].message
    assert check_worklist_filters({"scheduled_station_name": "東京"}, CALLING_AE, "ISO_IR 192") == []


@pytest.mark.parametrize(
    ("timezone", "expected_today"),
    [
        ("Pacific/Auckland", datetime.date(2024, 5, 11)),
        ("America/Los_Angeles", datetime.date(2024, 5, 10)),
        ("UTC", datetime.date(2024, 5, 10)),
    ],
)
def test_window_today_in_scp_timezone(timezone, expected_today):
    assert scheduled_window(WorklistFilters(), timezone, LATE_EVENING_UTC) == (expected_today, expected_today)


def test_window_days_back_and_forward():
    filters = WorklistFilters(days_back=2, days_forward=1)

    start, end = scheduled_window(filters, "Pacific/Auckland", LATE_EVENING_UTC)

    assert start == datetime.date(2024, 5, 9)
    assert end == datetime.date(2024, 5, 12)


def test_window_rejects_unknown_timezone():
    with pytest.raises(ValueError, match="not an IANA time zone"):
        scheduled_window(WorklistFilters(), "Mars/Olympus", LATE_EVENING_UTC)


def _all_elements(dataset: Dataset) -> list:
    elements = []
    for element in dataset:
        elements.append(element)
        if element.VR == "SQ":
            for item in element.value:
                elements += _all_elements(item)
    return elements


@pytest.mark.parametrize("filters", [{}, {"days_back": 31, "days_forward": 31}, {"days_forward": 3}])
def test_stored_identifier_dates_valid(filters):
    settings = _settings(filters, timezone="Pacific/Auckland")
    query = build_stored_query(settings, _parse(filters), now=LATE_EVENING_UTC)

    identifier = build_identifier(query)

    for element in _all_elements(identifier):
        assert element.tag != 0x00080201, "Timezone Offset From UTC must not be a matching key"
        if element.VR == "DA" and element.value:
            assert re.fullmatch(r"\d{8}(-\d{8})?", element.value), element
            for part in element.value.split("-"):
                datetime.datetime.strptime(part, "%Y%m%d")
        if element.VR == "TM":
            assert element.value in ("", None), element


def test_stored_identifier_matching_keys():
    filters = {"scheduled_station_name": "Zürich*", "scheduled_procedure_step_location": "ER", "days_back": 1}
    settings = _settings(filters)
    query = build_stored_query(settings, _parse(filters), patient_name="Müller*", now=LATE_EVENING_UTC)

    identifier = build_identifier(query)

    step = identifier.ScheduledProcedureStepSequence[0]
    assert identifier.SpecificCharacterSet == "ISO_IR 100"
    assert identifier.PatientName == "Müller*"
    assert step.Modality == "US"
    assert step.ScheduledStationAETitle == CALLING_AE
    assert step.ScheduledStationName == "Zürich*"
    assert step.ScheduledProcedureStepLocation == "ER"
    assert step.ScheduledProcedureStepStartDate == "20240509-20240510"
    assert "ReferencedStudySequence" in identifier


def test_stored_identifier_ascii_has_no_charset():
    settings = _settings({})
    identifier = build_identifier(build_stored_query(settings, _parse({}), patient_id="PB-1*"))

    assert "SpecificCharacterSet" not in identifier


def test_unknown_modality_code_is_a_warning():
    from pacsbridge.connections.problems import Severity
    from pacsbridge.dicomnet.worklist_filters import check_worklist_filters, parse_worklist_filters

    problems = check_worklist_filters({"modality": "ULTRASOUND"}, "POCUS", "ISO_IR 100")
    assert [problem.severity for problem in problems] == [Severity.WARNING]
    assert "not a defined term of Modality (0008,0060)" in problems[0].reason
    assert parse_worklist_filters({"modality": "ULTRASOUND"}, "POCUS", "ISO_IR 100").modality == "ULTRASOUND"
    assert check_worklist_filters({"modality": "us"}, "POCUS", "ISO_IR 100") == []
