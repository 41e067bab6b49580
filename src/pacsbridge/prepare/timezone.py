"""Convert the event dates and times of a header to the time zone of a PACS.

Only pairs whose instant is known are converted: the header carries Timezone
Offset From UTC (0008,0201), or the caller passes the offset of a study that
pacsbridge created. The whole header gets one new offset: the zone's offset at
the reference instant, which is Study Date/Time or else the first event pair
found. So every converted pair agrees with the single Timezone Offset From UTC,
and all instances of a study convert alike.

Converted: the event pairs in EVENT_PAIRS and the DT elements in EVENT_DATETIMES,
at any depth. Never converted: Patient's Birth Date and Time, dates that are not
event times (Last Menstrual Date, calibration dates and the like), and DT values
that carry their own offset.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacsbridge.prepare.errors import PreparationError

# (date keyword, time keyword) of event times, in the order the reference
# instant is chosen. Admission, scheduling and reading times are events too.
EVENT_PAIRS: tuple[tuple[str, str], ...] = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
    ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"),
    ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"),
    ("ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime"),
    ("OverlayDate", "OverlayTime"),
    ("CurveDate", "CurveTime"),
    ("StudyVerifiedDate", "StudyVerifiedTime"),
    ("StudyReadDate", "StudyReadTime"),
    ("ScheduledStudyStartDate", "ScheduledStudyStartTime"),
    ("ScheduledStudyStopDate", "ScheduledStudyStopTime"),
    ("StudyArrivalDate", "StudyArrivalTime"),
    ("StudyCompletionDate", "StudyCompletionTime"),
    ("ScheduledAdmissionDate", "ScheduledAdmissionTime"),
    ("ScheduledDischargeDate", "ScheduledDischargeTime"),
    ("AdmittingDate", "AdmittingTime"),
    ("DischargeDate", "DischargeTime"),
    ("IssueDateOfImagingServiceRequest", "IssueTimeOfImagingServiceRequest"),
    ("StructureSetDate", "StructureSetTime"),
    ("RTPlanDate", "RTPlanTime"),
    ("TreatmentDate", "TreatmentTime"),
    ("InterpretationRecordedDate", "InterpretationRecordedTime"),
    ("InterpretationTranscriptionDate", "InterpretationTranscriptionTime"),
    ("InterpretationApprovalDate", "InterpretationApprovalTime"),
)
# DT elements that are event times. A value with its own offset is never changed.
EVENT_DATETIMES: tuple[str, ...] = (
    "AcquisitionDateTime",
    "FrameAcquisitionDateTime",
    "FrameReferenceDateTime",
    "StartAcquisitionDateTime",
    "EndAcquisitionDateTime",
    "ObservationDateTime",
    "VerificationDateTime",
    "InstanceCoercionDateTime",
    "ScheduledProcedureStepStartDateTime",
    "ScheduledProcedureStepExpirationDateTime",
    "ExpectedCompletionDateTime",
    "ProcedureStepCancellationDateTime",
)

_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# TM: HH, HHMM, HHMMSS or HHMMSS.F to HHMMSS.FFFFFF.
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
# DT: YYYY[MM[DD[HH[MM[SS[.F]]]]]] then an optional &ZZXX offset.
_DATETIME = re.compile(r"^(\d{4}(?:\d{2}(?:\d{2})?)?)(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")


@dataclass
class TimezoneReport:
    """Outcome of `convert_timezone` for one header. Flags name elements, never values."""

    changed: bool = False
    new_offset: str | None = None  # +HHMM or -HHMM written to TimezoneOffsetFromUTC
    flags: list[str] = field(default_factory=list)


def format_offset(offset: datetime.timedelta) -> str:
    """Format a UTC offset as Timezone Offset From UTC writes it: +HHMM or -HHMM."""
    sign = "-" if offset < datetime.timedelta(0) else "+"
    minutes = abs(offset) // datetime.timedelta(minutes=1)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def parse_offset(text: str) -> datetime.timedelta | None:
    """Parse +HHMM or -HHMM, or return None when `text` is not such an offset."""
    match = _OFFSET.match(text.strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) > 59:
        return None
    offset = datetime.timedelta(hours=int(hours), minutes=int(minutes))
    return -offset if sign == "-" else offset


# --- Parsing and formatting DA, TM and DT -----------------------------------------


@dataclass(frozen=True)
class _LocalTime:
    """A DA + TM pair: the local date and time and how precise the TM was."""

    moment: datetime.datetime
    components: int  # 1 = HH, 2 = HHMM, 3 = HHMMSS
    fraction: str  # ".FFFFFF" as written, or ""


def _parse_pair(date_text: str, time_text: str) -> _LocalTime | None:
    date_match = _DATE.match(date_text)
    time_match = _TIME.match(time_text)
    if date_match is None or time_match is None:
        return None
    hours, minutes, seconds, fraction = time_match.groups()
    if minutes is None and seconds is not None:
        return None
    try:
        moment = datetime.datetime(
            *(int(part) for part in date_match.groups()),
            int(hours),
            int(minutes or 0),
            int(seconds or 0),
        )
    except ValueError:
        return None
    components = 1 + (minutes is not None) + (seconds is not None)
    return _LocalTime(moment, components, fraction or "")


def _format_pair(local: _LocalTime, moment: datetime.datetime) -> tuple[str, str]:
    # A shift by a whole number of minutes never changes seconds or fractions,
    # but an HH-only time needs its minutes when the shift has some.
    components = local.components
    if components == 1 and moment.minute != 0:
        components = 2
    time_text = moment.strftime("%H%M%S")[: 2 * components]
    if components == 3:
        time_text += local.fraction
    return moment.strftime("%Y%m%d"), time_text


# --- Walking the dataset --------------------------------------------------------


def _datasets(dataset: Dataset) -> Iterator[Dataset]:
    """Yield `dataset` and every sequence item in it, depth first."""
    yield dataset
    for element in dataset:
        if element.VR == "SQ" and element.value is not None:
            for item in element.value:
                yield from _datasets(item)


def _single_text(dataset: Dataset, keyword: str) -> str | None:
    """Return the value of `keyword` as text, None when absent, "" when empty or multi-valued."""
    if keyword not in dataset:
        return None
    value = dataset[keyword].value
    if value is None or isinstance(value, (list, MultiValue)):
        return ""
    return str(value).strip()


def _reference_instant(dataset: Dataset, source_offset: datetime.timedelta) -> datetime.datetime | None:
    """Return the UTC instant of the first valid event pair, or None."""
    for item in _datasets(dataset):
        for date_keyword, time_keyword in EVENT_PAIRS:
            date_text = _single_text(item, date_keyword)
            time_text = _single_text(item, time_keyword)
            if date_text and time_text:
                local = _parse_pair(date_text, time_text)
                if local is not None:
                    return (local.moment - source_offset).replace(tzinfo=datetime.UTC)
    return None


def _target_offset(zone: ZoneInfo, instant: datetime.datetime) -> datetime.timedelta:
    offset = instant.astimezone(zone).utcoffset()
    if offset is None or offset % datetime.timedelta(minutes=1):
        raise PreparationError(
            f"time zone {zone.key} has an offset that is not a whole number of minutes at the study time",
            "Choose a time zone for the connection whose offset is in whole minutes.",
        )
    return offset


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PreparationError(
            f"time zone {name!r} of the connection is not an IANA time zone name",
            "Set the connection's --timezone to an IANA name such as Europe/Berlin or America/New_York.",
        ) from None


def convert_timezone(
    ds: Dataset,
    zone: str,
    *,
    instant_known_offset: datetime.timedelta | None = None,
) -> TimezoneReport:
    """Convert the event dates and times of header `ds` to `zone` (IANA name), in place.

    The source offset is Timezone Offset From UTC (0008,0201) when the header
    has a valid one, else `instant_known_offset`. Without either, nothing
    changes and the report flags that the times were left as received.
    """
    target_zone = _zone(zone)
    report = TimezoneReport()
    source_offset = _source_offset(ds, instant_known_offset, report)
    if source_offset is None:
        return report

    instant = _reference_instant(ds, source_offset)
    if instant is None:
        report.flags.append("no event date and time with a valid value: times left as received")
        return report
    new_offset = _target_offset(target_zone, instant)
    report.new_offset = format_offset(new_offset)
    shift = new_offset - source_offset

    for item in _datasets(ds):
        _convert_pairs(item, shift, report)
        _convert_datetimes(item, shift, report)

    if _single_text(ds, "TimezoneOffsetFromUTC") != report.new_offset:
        ds.TimezoneOffsetFromUTC = report.new_offset
        report.changed = True
    return report


def _source_offset(
    ds: Dataset, known_offset: datetime.timedelta | None, report: TimezoneReport
) -> datetime.timedelta | None:
    text = _single_text(ds, "TimezoneOffsetFromUTC")
    if text:
        offset = parse_offset(text)
        if offset is not None:
            return offset
        report.flags.append("TimezoneOffsetFromUTC is invalid: times left as received")
        return None
    if known_offset is not None:
        return known_offset
    report.flags.append("TimezoneOffsetFromUTC is absent: times left as received")
    return None


def _convert_pairs(item: Dataset, shift: datetime.timedelta, report: TimezoneReport) -> None:
    for date_keyword, time_keyword in EVENT_PAIRS:
        date_text = _single_text(item, date_keyword)
        time_text = _single_text(item, time_keyword)
        if date_text is None and time_text is None:
            continue
        if not date_text or not time_text:
            present = date_keyword if date_text else time_keyword
            if date_text or time_text:
                missing = time_keyword if date_text else date_keyword
                report.flags.append(f"{present} has no {missing}: left as received")
            else:
                report.flags.append(f"{date_keyword}/{time_keyword} empty: left as received")
            continue
        local = _parse_pair(date_text, time_text)
        if local is None:
            report.flags.append(f"{date_keyword}/{time_keyword} invalid: left as received")
            continue
        if not shift:
            continue
        new_date, new_time = _format_pair(local, local.moment + shift)
        item[date_keyword].value = new_date
        item[time_keyword].value = new_time
        report.changed = True


def _convert_datetimes(item: Dataset, shift: datetime.timedelta, report: TimezoneReport) -> None:
    for keyword in EVENT_DATETIMES:
        text = _single_text(item, keyword)
        if text is None:
            continue
        match = _DATETIME.match(text) if text else None
        if match is None:
            report.flags.append(f"{keyword} empty or invalid: left as received")
            continue
        date_text, time_text, own_offset = match.groups()
        if own_offset is not None:
            continue
        if time_text is None or len(date_text) < 8:
            report.flags.append(f"{keyword} has no time: left as received")
            continue
        local = _parse_pair(date_text, time_text)
        if local is None:
            report.flags.append(f"{keyword} invalid: left as received")
            continue
        if not shift:
            continue
        new_date, new_time = _format_pair(local, local.moment + shift)
        item[keyword].value = new_date + new_time
        report.changed = True
