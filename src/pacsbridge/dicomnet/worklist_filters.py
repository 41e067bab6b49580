"""Filters of a stored Modality Worklist connection, and the query they produce.

The filters are the connection's `worklist_filters` JSON object. Every key is
optional:

- ``modality``: modality code of the scheduled step, "US" by default. "*",
  "" or null match any modality.
- ``scheduled_station_ae_title``: Scheduled Station AE Title to match. By
  default it is the connection's calling AE title, because the worklist
  server usually schedules steps for the AE title of the device that
  performs them. "", null or false leave the key out, and so match any station.
- ``days_back`` and ``days_forward``: the scheduled date window, in whole days
  before and after today. Both are 0 by default, which means today only.
  "Today" is the current date in the connection's time zone, the SCP's.
- ``scheduled_station_name`` and ``scheduled_procedure_step_location``:
  optional patterns for Scheduled Station Name (0040,0010) and Scheduled
  Procedure Step Location (0040,0011).

The text patterns accept the DICOM wildcards * and ?. The user adds a patient
name or patient ID pattern at query time.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass

from pacsbridge.connections import (
    ConnectionSettings,
    InvalidSettingsError,
    Problem,
    Severity,
)
from pacsbridge.connections.aetitle import check_ae_title
from pacsbridge.dicomnet.worklist import WorklistQuery, build_identifier

FIELD = "worklist_filters"
DEFAULT_MODALITY = "US"
# A longer window makes the worklist server return (and the user scroll
# through) a month of appointments, which no point-of-care pick needs.
MAX_WINDOW_DAYS = 31
# Short String (SH) values have at most 16 characters (PS3.5, table 6.2-1).
_SH_MAX_LENGTH = 16
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_ANY_MODALITY = ("", "*")
# Defined terms of Modality (0008,0060), PS3.3 C.7.3.1.1.1, current and retired ones that
# worklist servers still use. A code outside them is valid but usually matches nothing.
KNOWN_MODALITIES = frozenset(
    """
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX
    REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN
    TEXTUREMAP TG US VA XA XAPROTOCOL XC
    CD CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
    """.split()
)

FILTER_KEYS = (
    "modality",
    "scheduled_station_ae_title",
    "days_back",
    "days_forward",
    "scheduled_station_name",
    "scheduled_procedure_step_location",
)


@dataclass(frozen=True)
class WorklistFilters:
    """Validated filters of a stored worklist connection. None leaves a key out of the query."""

    modality: str | None = DEFAULT_MODALITY
    scheduled_station_ae_title: str | None = None
    days_back: int = 0
    days_forward: int = 0
    scheduled_station_name: str | None = None
    scheduled_procedure_step_location: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "modality": self.modality,
            "scheduled_station_ae_title": self.scheduled_station_ae_title,
            "days_back": self.days_back,
            "days_forward": self.days_forward,
            "scheduled_station_name": self.scheduled_station_name,
            "scheduled_procedure_step_location": self.scheduled_procedure_step_location,
        }


def check_worklist_filters(filters: object, calling_ae_title: str, character_set: str) -> list[Problem]:
    """Return the problems of a `worklist_filters` value, or [] when it is valid.

    `calling_ae_title` is the default Scheduled Station AE Title, and
    `character_set` must be able to encode any non-ASCII pattern.
    """
    problems, _ = _parse(filters, calling_ae_title, character_set)
    return problems


def parse_worklist_filters(filters: object, calling_ae_title: str, character_set: str) -> WorklistFilters:
    """Return the validated filters. Raises InvalidSettingsError with one problem per invalid key."""
    problems, parsed = _parse(filters, calling_ae_title, character_set)
    errors = [problem for problem in problems if problem.severity == Severity.ERROR]
    if errors or parsed is None:
        raise InvalidSettingsError(errors)
    return parsed


def scheduled_window(
    filters: WorklistFilters, timezone: str, now: datetime.datetime | None = None
) -> tuple[datetime.date, datetime.date]:
    """Return the first and last scheduled date to query, counted from today in `timezone`.

    `now` must be timezone-aware, and defaults to the current time.
    Raises ValueError when `timezone` is not an IANA time zone name.
    """
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"time zone {timezone!r} of the worklist connection is not an IANA time zone name: "
            "correct it with 'pacsbridge connections edit NAME --timezone ZONE', for example Europe/Berlin."
        ) from None
    moment = now if now is not None else datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    today = moment.astimezone(zone).date()
    return today - datetime.timedelta(days=filters.days_back), today + datetime.timedelta(days=filters.days_forward)


def build_stored_query(
    settings: ConnectionSettings,
    filters: WorklistFilters,
    *,
    patient_name: str | None = None,
    patient_id: str | None = None,
    now: datetime.datetime | None = None,
) -> WorklistQuery:
    """Build the query of a stored worklist connection: its filters plus the user's patient patterns."""
    return WorklistQuery(
        modality=filters.modality,
        scheduled_date=scheduled_window(filters, settings.timezone, now),
        patient_name=patient_name,
        patient_id=patient_id,
        scheduled_station_ae_title=filters.scheduled_station_ae_title,
        character_set=settings.character_set,
        scheduled_station_name=filters.scheduled_station_name,
        scheduled_procedure_step_location=filters.scheduled_procedure_step_location,
    )


# --- Parsing ----------------------------------------------------------------


def _parse(
    filters: object, calling_ae_title: str, character_set: str
) -> tuple[list[Problem], WorklistFilters | None]:
    edit_hint = "Correct it with 'pacsbridge connections edit NAME --worklist-filters JSON'."
    if filters is None:
        filters = {}
    if not isinstance(filters, Mapping):
        return [Problem.error(FIELD, filters, "is not a JSON object", edit_hint)], None

    problems: list[Problem] = []
    unknown = [key for key in filters if key not in FILTER_KEYS]
    for key in unknown:
        problems.append(
            Problem.error(
                f"{FIELD}.{key}",
                filters[key],
                "is not a worklist filter",
                "Use only these keys: " + ", ".join(FILTER_KEYS) + ".",
            )
        )

    modality = _parse_modality(filters.get("modality", DEFAULT_MODALITY), problems)
    station = _parse_station_ae_title(filters.get("scheduled_station_ae_title", True), calling_ae_title, problems)
    days_back = _parse_days("days_back", filters.get("days_back", 0), problems)
    days_forward = _parse_days("days_forward", filters.get("days_forward", 0), problems)
    station_name = _parse_short_string("scheduled_station_name", filters.get("scheduled_station_name"), problems)
    location = _parse_short_string(
        "scheduled_procedure_step_location", filters.get("scheduled_procedure_step_location"), problems
    )
    if any(problem.severity == Severity.ERROR for problem in problems):
        return problems, None

    parsed = WorklistFilters(
        modality=modality,
        scheduled_station_ae_title=station,
        days_back=days_back,
        days_forward=days_forward,
        scheduled_station_name=station_name,
        scheduled_procedure_step_location=location,
    )
    problems += _check_encodable(parsed, character_set)
    errors = [problem for problem in problems if problem.severity == Severity.ERROR]
    return problems, parsed if not errors else None


def _parse_modality(value: object, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(_type_problem("modality", value, 'a modality code such as "US", or "*" for any modality'))
        return None
    text = value.strip().upper()
    if text in _ANY_MODALITY:
        return None
    if not _MODALITY.match(text):
        problems.append(
            Problem.error(
                f"{FIELD}.modality",
                value,
                "is not a DICOM modality code",
                'Use a code such as "US", "CT" or "MR" (letters, digits and underscore, at most 16), '
                'or "*" for any modality.',
            )
        )
        return None
    if text not in KNOWN_MODALITIES:
        problems.append(
            Problem.warning(
                f"{FIELD}.modality",
                value,
                "is not a defined term of Modality (0008,0060), so most worklist servers match no items with it",
                'Use "US" for ultrasound, or another code from the standard, such as "CT" or "MR".',
            )
        )
    return text


def _parse_station_ae_title(value: object, calling_ae_title: str, problems: list[Problem]) -> str | None:
    if value is True:
        return calling_ae_title.strip() or None
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        problems.append(
            _type_problem("scheduled_station_ae_title", value, "an AE title, or false to match any station")
        )
        return None
    errors = [
        problem
        for problem in check_ae_title(f"{FIELD}.scheduled_station_ae_title", value)
        if problem.severity == Severity.ERROR
    ]
    problems += errors
    return None if errors else value.strip()


def _parse_days(key: str, value: object, problems: list[Problem]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(_type_problem(key, value, f"a whole number of days from 0 to {MAX_WINDOW_DAYS}"))
        return 0
    if not 0 <= value <= MAX_WINDOW_DAYS:
        problems.append(
            Problem.error(
                f"{FIELD}.{key}",
                value,
                f"is outside 0 to {MAX_WINDOW_DAYS} days",
                f"Use a whole number of days from 0 to {MAX_WINDOW_DAYS}.",
            )
        )
        return 0
    return value


def _parse_short_string(key: str, value: object, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(_type_problem(key, value, "a text pattern of at most 16 characters"))
        return None
    text = value.strip()
    if "\\" in text or any(ord(character) < 0x20 for character in text):
        problems.append(
            Problem.error(
                f"{FIELD}.{key}",
                value,
                "contains a backslash or a control character",
                "Remove it: DICOM reserves the backslash as a value separator.",
            )
        )
        return None
    if len(text) > _SH_MAX_LENGTH:
        problems.append(
            Problem.error(
                f"{FIELD}.{key}",
                value,
                f"has {len(text)} characters, more than the {_SH_MAX_LENGTH} of a DICOM Short String",
                "Shorten it, or end it with the wildcard *.",
            )
        )
        return None
    return text or None


def _check_encodable(filters: WorklistFilters, character_set: str) -> list[Problem]:
    """Check that the connection's character set can encode the text patterns of `filters`."""
    query = WorklistQuery(
        modality=None,
        character_set=character_set,
        scheduled_station_name=filters.scheduled_station_name,
        scheduled_procedure_step_location=filters.scheduled_procedure_step_location,
    )
    try:
        build_identifier(query)
    except ValueError as exc:
        return [
            Problem.error(
                FIELD,
                filters.as_dict(),
                f"cannot be sent ({exc})",
                "Change the pattern, or the connection's character set with --charset.",
            )
        ]
    return []


def _type_problem(key: str, value: object, expected: str) -> Problem:
    return Problem.error(f"{FIELD}.{key}", value, f"is not {expected}", f"Give {expected}.")
