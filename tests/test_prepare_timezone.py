"""Time zone conversion of event dates and times (pacsbridge.prepare.timezone)."""

from __future__ import annotations

import datetime

import pydicom
import pytest
from conftest import SAMPLES
from pydicom.dataset import Dataset

from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.timezone import convert_timezone, format_offset, parse_offset


def header(offset: str | None = "-0500", **values: str) -> Dataset:
    ds = Dataset()
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    ds.StudyDate = "20260115"
    ds.StudyTime = "203000"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_midnight_crossing_changes_date() -> None:
    ds = header(SeriesDate="20260115", SeriesTime="235959.123")
    report = convert_timezone(ds, "Europe/Berlin")
    assert report.changed
    assert report.new_offset == "+0100"
    assert (ds.StudyDate, ds.StudyTime) == ("20260116", "023000")
    assert (ds.SeriesDate, ds.SeriesTime) == ("20260116", "055959.123")
    assert ds.TimezoneOffsetFromUTC == "+0100"


def test_year_boundary() -> None:
    ds = header("+0000", StudyDate="20251231")
    ds.StudyTime = "2330"
    convert_timezone(ds, "Asia/Tokyo")
    assert (ds.StudyDate, ds.StudyTime) == ("20260101", "0830")
    assert ds.TimezoneOffsetFromUTC == "+0900"


def test_daylight_saving_offset_of_instant() -> None:
    # Central European Summer Time starts on 2026-03-29 at 01:00 UTC.
    before = header("+0000", StudyDate="20260329", StudyTime="005900")
    after = header("+0000", StudyDate="20260329", StudyTime="013000")
    convert_timezone(before, "Europe/Berlin")
    convert_timezone(after, "Europe/Berlin")
    assert (before.StudyTime, before.TimezoneOffsetFromUTC) == ("015900", "+0100")
    assert (after.StudyTime, after.TimezoneOffsetFromUTC) == ("033000", "+0200")


def test_one_offset_per_header() -> None:
    # The content time falls after the switch to summer time, but the header
    # has one offset, taken at the study time, so both pairs use +0100.
    ds = header(
        "+0000",
        StudyDate="20260329",
        StudyTime="005900",
        ContentDate="20260329",
        ContentTime="013000",
    )
    convert_timezone(ds, "Europe/Berlin")
    assert ds.TimezoneOffsetFromUTC == "+0100"
    assert ds.ContentTime == "023000"


def test_instances_of_study_convert_alike() -> None:
    first = header(ContentDate="20260115", ContentTime="203100")
    second = header(ContentDate="20260115", ContentTime="203200")
    convert_timezone(first, "America/Los_Angeles")
    convert_timezone(second, "America/Los_Angeles")
    assert (first.StudyDate, first.StudyTime) == (second.StudyDate, second.StudyTime) == ("20260115", "173000")
    assert first.TimezoneOffsetFromUTC == second.TimezoneOffsetFromUTC == "-0800"


def test_precision_and_fraction_kept() -> None:
    ds = header(
        "+0100",
        StudyTime="1230",
        SeriesDate="20260115",
        SeriesTime="12",
        AcquisitionDate="20260115",
        AcquisitionTime="123000.000001",
    )
    convert_timezone(ds, "Asia/Kolkata")
    assert ds.StudyTime == "1700"
    # An HH-only time gains minutes because the shift is 4 hours 30 minutes.
    assert ds.SeriesTime == "1630"
    assert ds.AcquisitionTime == "170000.000001"
    assert ds.TimezoneOffsetFromUTC == "+0530"


def test_hour_only_time_stays_hour_only() -> None:
    ds = header("+0100", SeriesDate="20260115", SeriesTime="12")
    convert_timezone(ds, "Europe/Helsinki")
    assert ds.SeriesTime == "13"


def test_datetime_with_own_offset_unchanged() -> None:
    ds = header(
        AcquisitionDateTime="20260101120000+0100",
        FrameReferenceDateTime="20260115203000.5",
    )
    convert_timezone(ds, "UTC")
    assert ds.AcquisitionDateTime == "20260101120000+0100"
    assert ds.FrameReferenceDateTime == "20260116013000.5"
    assert ds.TimezoneOffsetFromUTC == "+0000"


def test_birth_and_non_event_dates_unchanged() -> None:
    ds = header(
        PatientBirthDate="19800101",
        PatientBirthTime="233000",
        LastMenstrualDate="20251201",
        DateOfLastCalibration="20260110",
        TimeOfLastCalibration="230000",
        DateOfLastDetectorCalibration="20260110",
    )
    convert_timezone(ds, "Asia/Tokyo")
    assert ds.StudyDate == "20260116"
    assert (ds.PatientBirthDate, ds.PatientBirthTime) == ("19800101", "233000")
    assert ds.LastMenstrualDate == "20251201"
    assert (ds.DateOfLastCalibration, ds.TimeOfLastCalibration) == (
        "20260110",
        "230000",
    )
    assert ds.DateOfLastDetectorCalibration == "20260110"


def test_date_without_time_flagged() -> None:
    ds = header(SeriesDate="20260115")
    report = convert_timezone(ds, "Asia/Tokyo")
    assert ds.SeriesDate == "20260115"
    assert "SeriesDate has no SeriesTime: left as received" in report.flags


def test_invalid_and_empty_pairs_flagged() -> None:
    ds = header(
        AcquisitionDate="20260115",
        AcquisitionTime="25:61",
        ContentDate="",
        ContentTime="",
    )
    report = convert_timezone(ds, "Asia/Tokyo")
    assert ds.AcquisitionTime == "25:61"
    assert "AcquisitionDate/AcquisitionTime invalid: left as received" in report.flags
    assert "ContentDate/ContentTime empty: left as received" in report.flags
    assert not any("25:61" in flag for flag in report.flags)


def test_unknown_instant_changes_nothing() -> None:
    ds = header(offset=None)
    report = convert_timezone(ds, "Asia/Tokyo")
    assert not report.changed
    assert report.new_offset is None
    assert report.flags == ["TimezoneOffsetFromUTC is absent: times left as received"]
    assert (ds.StudyDate, ds.StudyTime) == ("20260115", "203000")
    assert "TimezoneOffsetFromUTC" not in ds


def test_invalid_offset_changes_nothing() -> None:
    ds = header(offset="0500")
    report = convert_timezone(ds, "Asia/Tokyo")
    assert not report.changed
    assert ds.StudyTime == "203000"
    assert report.flags == ["TimezoneOffsetFromUTC is invalid: times left as received"]


def test_known_offset_from_caller() -> None:
    ds = header(offset=None)
    report = convert_timezone(ds, "Europe/London", instant_known_offset=datetime.timedelta(hours=1))
    assert report.changed
    assert (ds.StudyDate, ds.StudyTime) == ("20260115", "193000")
    assert ds.TimezoneOffsetFromUTC == "+0000"


def test_same_offset_changes_nothing() -> None:
    ds = header("+0100")
    report = convert_timezone(ds, "Europe/Berlin")
    assert not report.changed
    assert report.new_offset == "+0100"
    assert ds.StudyTime == "203000"


def test_sequence_items_converted() -> None:
    step = Dataset()
    step.ScheduledProcedureStepStartDate = "20260115"
    step.ScheduledProcedureStepStartTime = "2300"
    ds = header()
    ds.RequestAttributesSequence = [step]
    convert_timezone(ds, "Europe/Berlin")
    item = ds.RequestAttributesSequence[0]
    assert (
        item.ScheduledProcedureStepStartDate,
        item.ScheduledProcedureStepStartTime,
    ) == ("20260116", "0500")


def test_unknown_zone_raises() -> None:
    with pytest.raises(PreparationError) as caught:
        convert_timezone(header(), "Mars/Olympus_Mons")
    assert "Mars/Olympus_Mons" in caught.value.reason
    assert "IANA" in caught.value.action


def test_offset_text_round_trip() -> None:
    for text in ("+0000", "-0430", "+1400", "+0545"):
        offset = parse_offset(text)
        assert offset is not None
        assert format_offset(offset) == text
    assert parse_offset("+2500") is None
    assert parse_offset("0100") is None


def test_sample_with_offset() -> None:
    # A header written by another toolkit: offset -0400, empty Study Date/Time.
    ds = pydicom.dcmread(SAMPLES / "chrX1.dcm", stop_before_pixels=True)
    report = convert_timezone(ds, "UTC")
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20070405", "122251")
    assert ds.TimezoneOffsetFromUTC == "+0000"
    assert report.flags == ["StudyDate/StudyTime empty: left as received"]
