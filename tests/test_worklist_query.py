"""Worklist query building, date validation and character set handling, without a network."""

from __future__ import annotations

import datetime

import pytest
from pydicom.dataset import Dataset

from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.worklist import (
    WorklistError,
    WorklistQuery,
    build_identifier,
    convert_identifier,
    format_date_range,
    normalize_character_set_term,
    parse_date_range,
    query_worklist,
)

MAY_10 = datetime.date(2024, 5, 10)
MAY_12 = datetime.date(2024, 5, 12)

RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "ReferringPhysicianName",
)
STEP_KEYS = (
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("20240510", (MAY_10, MAY_10)),
        (" 20240510 ", (MAY_10, MAY_10)),
        ("20240510-20240512", (MAY_10, MAY_12)),
        ("20240510-", (MAY_10, None)),
        ("-20240512", (None, MAY_12)),
        (MAY_10, (MAY_10, MAY_10)),
        (datetime.datetime(2024, 5, 10, 14, 30), (MAY_10, MAY_10)),
        ((MAY_10, MAY_12), (MAY_10, MAY_12)),
        (("20240510", "20240512"), (MAY_10, MAY_12)),
        ((MAY_10, None), (MAY_10, None)),
    ],
)
def test_parse_date_range_accepted_forms(value, expected):
    assert parse_date_range(value) == expected


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("2024-05-10", "YYYYMMDD"),
        ("10.05.2024", "YYYYMMDD"),
        ("20240230", "not a calendar date"),
        ("2024051", "YYYYMMDD"),
        ("20240512-20240510", "start is after the end"),
        ("20240510-20240511-20240512", "YYYYMMDD"),
        ("-", "at least one end"),
        ((None, None), "at least one end"),
        ((MAY_10,), "(start, end) pair"),
        (20240510, "YYYYMMDD"),
    ],
)
def test_parse_date_range_invalid_forms(value, hint):
    with pytest.raises(ValueError) as raised:
        parse_date_range(value)
    message = str(raised.value)
    assert repr(value) in message
    assert hint in message


def test_format_date_range_forms():
    assert format_date_range(None) == ""
    assert format_date_range((MAY_10, MAY_10)) == "20240510"
    assert format_date_range((MAY_10, MAY_12)) == "20240510-20240512"
    assert format_date_range((MAY_10, None)) == "20240510-"
    assert format_date_range((None, MAY_12)) == "-20240512"


def test_identifier_requests_every_return_key():
    identifier = build_identifier(WorklistQuery())

    for keyword in RETURN_KEYS:
        assert keyword in identifier, keyword
    step = identifier.ScheduledProcedureStepSequence[0]
    for keyword in STEP_KEYS:
        assert keyword in step, keyword
    assert step.Modality == "US"
    assert step.ScheduledProcedureStepStartDate == ""
    assert "SpecificCharacterSet" not in identifier


def test_identifier_carries_matching_keys():
    query = WorklistQuery(
        modality="ct",
        scheduled_date="20240510-20240512",
        patient_name="SMITH*",
        patient_id="12?4",
        scheduled_station_ae_title="US_ROOM_1",
    )

    identifier = build_identifier(query)

    step = identifier.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT"
    assert step.ScheduledProcedureStepStartDate == "20240510-20240512"
    assert step.ScheduledStationAETitle == "US_ROOM_1"
    assert str(identifier.PatientName) == "SMITH*"
    assert identifier.PatientID == "12?4"


def test_identifier_any_modality_is_universal():
    identifier = build_identifier(WorklistQuery(modality=None))

    assert identifier.ScheduledProcedureStepSequence[0].Modality == ""


def test_identifier_charset_only_for_non_ascii():
    assert "SpecificCharacterSet" not in build_identifier(WorklistQuery(patient_name="MULLER*"))

    latin = build_identifier(WorklistQuery(patient_name="Müller*"))
    assert latin.SpecificCharacterSet == "ISO_IR 100"

    utf8 = build_identifier(WorklistQuery(patient_name="王*", character_set="ISO_IR 192"))
    assert utf8.SpecificCharacterSet == "ISO_IR 192"

    japanese = build_identifier(WorklistQuery(patient_name="山田*", character_set="\\ISO 2022 IR 87"))
    assert list(japanese.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]


def test_identifier_default_repertoire_rejects_accents():
    with pytest.raises(ValueError, match="'ISO_IR 6' cannot encode"):
        build_identifier(WorklistQuery(patient_name="Zoë*", character_set="ISO_IR 6"))


def test_identifier_rejects_unencodable_pattern():
    with pytest.raises(ValueError) as raised:
        build_identifier(WorklistQuery(patient_name="山田*"))

    message = str(raised.value)
    assert "U+5C71" in message
    assert "ISO_IR 100" in message
    assert "ISO_IR 192" in message


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        (WorklistQuery(scheduled_date="2024-05-10"), "'2024-05-10'"),
        (WorklistQuery(modality="U/S"), "'U/S'"),
        (WorklistQuery(modality="ULTRASOUND_MODALITY"), "'ULTRASOUND_MODALITY'"),
        (WorklistQuery(patient_name="A\\B"), "backslash"),
        (WorklistQuery(patient_id="X" * 65), "more than 64"),
        (WorklistQuery(patient_name="D" * 65 + "*"), "group 1 has 66 characters, more than 64"),
        (WorklistQuery(patient_name="Doe^J*=" + "Y" * 70), "group 2 has 70 characters"),
        (WorklistQuery(patient_name="A=B=C=D"), "4 component groups"),
        (WorklistQuery(scheduled_station_ae_title="STATION_NAME_TOO_LONG"), "more than 16"),
        (WorklistQuery(patient_name="Müller", character_set="LATIN1"), "'LATIN1'"),
    ],
)
def test_identifier_invalid_keys_raise(query, fragment):
    """Each invalid key raises, naming the value or the limit it breaks."""
    with pytest.raises(ValueError) as raised:
        build_identifier(query)

    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("ISO_IR 100", "ISO_IR 100"),
        ("ISO-IR 100", "ISO_IR 100"),
        ("ISO_IR100", "ISO_IR 100"),
        ("iso_ir 100", "ISO_IR 100"),
        (" ISO IR 192 ", "ISO_IR 192"),
        ("UTF-8", "ISO_IR 192"),
        ("utf8", "ISO_IR 192"),
        ("ISO-8859-1", "ISO_IR 100"),
        ("latin1", "ISO_IR 100"),
        ("ISO8859-15", "ISO_IR 203"),
        ("ISO_IR 87", "ISO 2022 IR 87"),
        ("ISO 2022 IR 87", "ISO 2022 IR 87"),
        ("ISO2022 IR 87", "ISO 2022 IR 87"),
        ("ISO_2022_IR_149", "ISO 2022 IR 149"),
        ("gb18030", "GB18030"),
        ("", ""),
        ("ISO_IR 999", None),
        ("KOI8-R", None),
        ("FOO", None),
    ],
)
def test_normalize_character_set_term(sent, expected):
    assert normalize_character_set_term(sent) == expected


def test_convert_identifier_tolerates_missing_keys():
    identifier = Dataset()
    identifier.PatientName = ""
    identifier.PatientID = "ID-1"
    step = Dataset()
    step.Modality = "US"
    identifier.ScheduledProcedureStepSequence = [step]

    item = convert_identifier(identifier)

    assert item.patient_name == ""
    assert item.patient_id == "ID-1"
    assert item.birth_date is None
    assert item.accession_number is None
    assert item.accession_number_issuer is None
    assert item.scheduled_steps[0].modality == "US"
    assert item.scheduled_steps[0].start_date is None
    assert item.raw is identifier
    assert "raw" not in item.as_dict()


def test_convert_identifier_reads_name_groups():
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.PatientName = "Wang^XiaoDong=王^小东"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "HOSP-A"
    identifier.IssuerOfAccessionNumberSequence = [issuer]

    item = convert_identifier(identifier)

    assert item.patient_name == "Wang^XiaoDong=王^小东"
    assert item.patient_name_components == {
        "alphabetic": "Wang^XiaoDong",
        "ideographic": "王^小东",
        "phonetic": None,
    }
    assert item.accession_number_issuer == "HOSP-A"
    assert item.scheduled_steps == []
    assert item.first_step is None


def test_query_worklist_validates_before_connecting():
    # Port 9 on loopback: nothing is contacted, because validation comes first.
    endpoint = Endpoint("127.0.0.1", 9, "PB", "MWL", 1, 1, 1)

    with pytest.raises(ValueError, match="max_items 0"):
        query_worklist(endpoint, WorklistQuery(), max_items=0)
    with pytest.raises(ValueError, match="fallback character set 'LATIN-9000'"):
        query_worklist(endpoint, WorklistQuery(), fallback_character_set="LATIN-9000")
    with pytest.raises(ValueError, match="'20241301'"):
        query_worklist(endpoint, WorklistQuery(scheduled_date="20241301"))


def test_worklist_error_message_names_status():
    error = WorklistError(0xA700, "the SCP is out of resources", "database busy")

    assert str(error) == "worklist query failed: the SCP is out of resources: database busy (status 0xA700)"
    assert error.status == 0xA700
    assert error.action
