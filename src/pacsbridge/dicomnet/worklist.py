"""Modality Worklist C-FIND: build the query identifier, run the query, decode the matches.

The query uses the Modality Worklist Information Model - FIND SOP class
(1.2.840.10008.5.1.4.31, PS3.4 Annex K). Matches come back as `WorklistItem`
objects with plain Python values, sorted by scheduled start date and time.

Patient data (names, IDs, birth dates) is returned to the caller but never
logged: log lines carry AE titles, status codes and counts only.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from pynetdicom.status import (
    STATUS_CANCEL,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_WARNING,
    code_to_category,
)

from pacsbridge.connections import Severity
from pacsbridge.connections.aetitle import check_ae_title
from pacsbridge.connections.charset import (
    ISO_2022_TERMS,
    SINGLE_BYTE_TERMS,
    UNEXTENDED_MULTI_BYTE_TERMS,
    check_character_set,
)
from pacsbridge.dicomnet.association import Endpoint, association
from pacsbridge.dicomnet.failures import (
    DicomNetworkError,
    Failure,
    FailureKind,
    decode_abort,
)

LOGGER = logging.getLogger(__name__)

MODALITY_WORKLIST_FIND = ModalityWorklistInformationFind
DEFAULT_CHARACTER_SET = "ISO_IR 100"
DEFAULT_MAX_ITEMS = 1000
_MESSAGE_ID = 1
# After a C-CANCEL the SCP may still send the pending responses it had queued.
# Past this many, the association is aborted instead of waiting for the end.
_MAX_RESPONSES_AFTER_CANCEL = 1000

_PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
)
_REQUEST_KEYS = (
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
)
_STEP_KEYS = (
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)

# A Code String (CS) has at most 16 upper-case letters, digits, spaces and
# underscores. A matching key may also use the * and ? wildcards of PS3.4 C.2.2.2.4.
_CS_PATTERN = re.compile(r"^[A-Z0-9 _*?]{1,16}$")
_DATE_FORMAT = "%Y%m%d"
# A Person Name has up to three component groups of 64 characters joined by "=".
# PS3.5 Table 6.2-1: a Person Name has at most three component groups (alphabetic,
# ideographic, phonetic) separated by "=", each of at most 64 characters.
_PN_GROUP_MAX_LENGTH = 64
_PN_MAX_GROUPS = 3
_PN_MAX_LENGTH = _PN_MAX_GROUPS * _PN_GROUP_MAX_LENGTH + _PN_MAX_GROUPS - 1
_LO_MAX_LENGTH = 64
_SH_MAX_LENGTH = 16
_DATE_FORMS = "YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD"

DateValue = str | datetime.date
DateInput = DateValue | tuple[DateValue | None, DateValue | None] | None


class WorklistError(Exception):
    """Raised when the worklist SCP ends a C-FIND with a failure or cancel status."""

    def __init__(self, status: int, reason: str, comment: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.comment = comment
        detail = f"{reason}: {comment}" if comment else reason
        self.summary = f"worklist query failed: {detail} (status 0x{status:04X})"
        self.action = _status_action(status)
        super().__init__(self.summary)


@dataclass(frozen=True)
class WorklistQuery:
    """Matching keys of a worklist query. None or an empty string matches any value.

    `scheduled_date` is one date or an inclusive range: a `date`, a string in
    the form YYYYMMDD or YYYYMMDD-YYYYMMDD (either end may be left open), or a
    (start, end) tuple whose ends are dates, such strings or None.
    `patient_name` and `patient_id` accept the DICOM wildcards * and ?.
    `character_set` is the Specific Character Set sent with the identifier when
    a key is not plain ASCII.
    """

    modality: str | None = "US"
    scheduled_date: DateInput = None
    patient_name: str | None = None
    patient_id: str | None = None
    scheduled_station_ae_title: str | None = None
    character_set: str = DEFAULT_CHARACTER_SET
    scheduled_station_name: str | None = None
    scheduled_procedure_step_location: str | None = None


@dataclass(frozen=True)
class ScheduledStep:
    """One item of the Scheduled Procedure Step Sequence (0040,0100)."""

    start_date: str | None
    start_time: str | None
    modality: str | None
    station_ae_title: str | None
    step_id: str | None
    description: str | None
    station_name: str | None = None
    location: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "start_date": self.start_date,
            "start_time": self.start_time,
            "modality": self.modality,
            "station_ae_title": self.station_ae_title,
            "station_name": self.station_name,
            "location": self.location,
            "step_id": self.step_id,
            "description": self.description,
        }


@dataclass
class WorklistItem:
    """One worklist match, decoded into plain text; missing or empty values are None.

    Dates and times are the DA and TM text the SCP sent, normally YYYYMMDD and
    HHMMSS[.FFFFFF]. `patient_name` is the whole Person Name with its ^ and =
    separators, so ideographic and phonetic groups are kept, and it is "" when
    the SCP sent none. `raw` is the decoded response identifier, kept for
    building the study later and left out of `as_dict()`.
    """

    patient_name: str
    patient_name_components: dict[str, str | None]
    patient_id: str | None
    issuer_of_patient_id: str | None
    birth_date: str | None
    sex: str | None
    accession_number: str | None
    accession_number_issuer: str | None
    requested_procedure_id: str | None
    requested_procedure_description: str | None
    study_instance_uid: str | None
    referring_physician_name: str | None
    scheduled_steps: list[ScheduledStep]
    raw: Dataset = field(repr=False, compare=False)

    @property
    def first_step(self) -> ScheduledStep | None:
        """The step with the earliest scheduled start, where steps without a date come last."""
        if not self.scheduled_steps:
            return None
        return min(self.scheduled_steps, key=_step_sort_key)

    def as_dict(self) -> dict[str, object]:
        return {
            "patient_name": self.patient_name,
            "patient_name_components": dict(self.patient_name_components),
            "patient_id": self.patient_id,
            "issuer_of_patient_id": self.issuer_of_patient_id,
            "birth_date": self.birth_date,
            "sex": self.sex,
            "accession_number": self.accession_number,
            "accession_number_issuer": self.accession_number_issuer,
            "requested_procedure_id": self.requested_procedure_id,
            "requested_procedure_description": self.requested_procedure_description,
            "study_instance_uid": self.study_instance_uid,
            "referring_physician_name": self.referring_physician_name,
            "scheduled_steps": [step.as_dict() for step in self.scheduled_steps],
        }


@dataclass(frozen=True)
class WorklistResponse:
    """One pending response identifier as decoded, and whether the local step filter kept its item."""

    identifier: Dataset = field(repr=False)
    kept: bool


@dataclass
class WorklistResult:
    """The items of a completed query, the warnings met, and the identifier that was sent.

    `truncated` is true when more than `max_items` items matched. The query was
    then cancelled, and `items` contains the first `max_items` matches in the
    order the SCP sent them, which need not be the earliest scheduled ones.
    `responses` contains every decoded response in arrival order, including
    those the local filter removed, when `query_worklist` was asked to keep them.
    """

    items: list[WorklistItem]
    warnings: list[str]
    truncated: bool
    identifier: Dataset = field(repr=False)
    responses: list[WorklistResponse] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": True,
            "items": [item.as_dict() for item in self.items],
            "warnings": list(self.warnings),
            "truncated": self.truncated,
        }


# --- Query identifier -------------------------------------------------------


def parse_date_range(value: DateInput) -> tuple[datetime.date | None, datetime.date | None] | None:
    """Parse a scheduled date or date range into (start, end), or None for any date.

    Raises ValueError naming the value and the accepted forms when it is not a
    calendar date, or when the range ends before it starts.
    """
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"scheduled date range {value!r} is invalid: use a (start, end) pair.")
        start, end = (_parse_date_end(part, value) for part in value)
    elif isinstance(value, datetime.date):
        start = end = _as_date(value)
    elif isinstance(value, str):
        start, end = _parse_date_text(value)
    else:
        raise ValueError(f"scheduled date {value!r} is invalid: use a date or a string of the form {_DATE_FORMS}.")
    if start is None and end is None:
        raise ValueError(f"scheduled date range {value!r} is invalid: give at least one end.")
    if start is not None and end is not None and start > end:
        raise ValueError(f"scheduled date range {value!r} is invalid: the start is after the end.")
    return start, end


def _as_date(value: datetime.date) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    return value


def _parse_date_end(part: DateValue | None, whole: object) -> datetime.date | None:
    if part is None or part == "":
        return None
    if isinstance(part, datetime.date):
        return _as_date(part)
    if isinstance(part, str):
        return _parse_one_date(part.strip(), whole)
    raise ValueError(f"scheduled date range {whole!r} is invalid: each end must be a date, a YYYYMMDD string or None.")


def _parse_date_text(text: str) -> tuple[datetime.date | None, datetime.date | None]:
    stripped = text.strip()
    if stripped.count("-") > 1:
        raise ValueError(f"scheduled date {text!r} is invalid: use the form {_DATE_FORMS}.")
    if "-" not in stripped:
        day = _parse_one_date(stripped, text)
        return day, day
    start_text, end_text = stripped.split("-")
    start = _parse_one_date(start_text, text) if start_text else None
    end = _parse_one_date(end_text, text) if end_text else None
    return start, end


def _parse_one_date(text: str, whole: object) -> datetime.date:
    if not re.fullmatch(r"\d{8}", text):
        raise ValueError(f"scheduled date {whole!r} is invalid: use the form {_DATE_FORMS}.")
    try:
        return datetime.datetime.strptime(text, _DATE_FORMAT).date()
    except ValueError:
        raise ValueError(
            f"scheduled date {whole!r} is invalid: {text} is not a calendar date. Use the form {_DATE_FORMS}."
        ) from None


def format_date_range(date_range: tuple[datetime.date | None, datetime.date | None] | None) -> str:
    """Format (start, end) as a DICOM DA matching value: YYYYMMDD, a range, or "" for any date."""
    if date_range is None:
        return ""
    start, end = date_range
    if start is not None and start == end:
        return start.strftime(_DATE_FORMAT)
    start_text = start.strftime(_DATE_FORMAT) if start else ""
    end_text = end.strftime(_DATE_FORMAT) if end else ""
    return f"{start_text}-{end_text}"


def build_identifier(query: WorklistQuery) -> Dataset:
    """Build the C-FIND request identifier for `query`, with every return key a study needs.

    Raises ValueError naming the key and value when a matching key is invalid
    or cannot be encoded in `query.character_set`.
    """
    modality = _normalize_modality(query.modality)
    date_text = format_date_range(parse_date_range(query.scheduled_date))
    text_keys = {
        "patient_name": _check_person_name_key(query.patient_name),
        "patient_id": _check_text_key("patient_id", query.patient_id, max_length=_LO_MAX_LENGTH),
        "scheduled_station_name": _check_text_key(
            "scheduled_station_name", query.scheduled_station_name, max_length=_SH_MAX_LENGTH
        ),
        "scheduled_procedure_step_location": _check_text_key(
            "scheduled_procedure_step_location", query.scheduled_procedure_step_location, max_length=_SH_MAX_LENGTH
        ),
    }
    station = _check_station(query.scheduled_station_ae_title)

    identifier = Dataset()
    if not all(value.isascii() for value in text_keys.values()):
        identifier.SpecificCharacterSet = _query_character_set(query.character_set, text_keys)
    for keyword in _PATIENT_KEYS + _REQUEST_KEYS:
        setattr(identifier, keyword, "")
    identifier.PatientName = text_keys["patient_name"]
    identifier.PatientID = text_keys["patient_id"]
    identifier.IssuerOfAccessionNumberSequence = []
    # Requested so that an upload can copy it into the instances (General Study module).
    identifier.ReferencedStudySequence = []

    step = Dataset()
    for keyword in _STEP_KEYS:
        setattr(step, keyword, "")
    step.Modality = modality
    step.ScheduledProcedureStepStartDate = date_text
    step.ScheduledStationAETitle = station
    step.ScheduledStationName = text_keys["scheduled_station_name"]
    step.ScheduledProcedureStepLocation = text_keys["scheduled_procedure_step_location"]
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def _normalize_modality(value: str | None) -> str:
    if value is None or not value.strip():
        return ""
    modality = value.strip().upper()
    if not _CS_PATTERN.match(modality):
        raise ValueError(
            f"modality {value!r} is invalid: use a DICOM modality code such as US, CT or MR "
            "(letters, digits and underscore, at most 16 characters)."
        )
    return modality


def _check_text_key(name: str, value: str | None, *, max_length: int) -> str:
    if value is None:
        return ""
    text = value.strip()
    if "\\" in text:
        raise ValueError(f"{name} pattern contains a backslash, which DICOM reserves as a value separator: remove it.")
    if any(ord(character) < 0x20 for character in text):
        raise ValueError(f"{name} pattern contains a control character: remove it.")
    if len(text) > max_length:
        raise ValueError(f"{name} pattern has {len(text)} characters, more than {max_length}: shorten it.")
    return text


def _check_person_name_key(value: str | None) -> str:
    """Check a patient name pattern: the text rules of every key, then the Person Name group limits."""
    text = _check_text_key("patient_name", value, max_length=_PN_MAX_LENGTH)
    groups = text.split("=")
    if len(groups) > _PN_MAX_GROUPS:
        raise ValueError(
            f"patient_name pattern has {len(groups)} component groups separated by '=', more than "
            f"{_PN_MAX_GROUPS} (alphabetic, ideographic, phonetic): remove the extra '='."
        )
    for number, group in enumerate(groups, start=1):
        if len(group) > _PN_GROUP_MAX_LENGTH:
            raise ValueError(
                f"patient_name pattern group {number} has {len(group)} characters, more than "
                f"{_PN_GROUP_MAX_LENGTH} per component group: shorten it."
            )
    return text


def _check_station(value: str | None) -> str:
    if value is None or not value.strip():
        return ""
    problems = check_ae_title("scheduled_station_ae_title", value)
    errors = [problem for problem in problems if problem.severity == Severity.ERROR]
    if errors:
        raise ValueError(errors[0].message)
    return value.strip()


def _query_character_set(character_set: str, texts: dict[str, str]) -> str | list[str]:
    errors = check_character_set("character_set", character_set)
    if errors:
        raise ValueError(errors[0].message)
    terms = [term.strip() for term in character_set.split("\\")]
    # pydicom maps the default repertoire to Latin-1, which would let
    # non-ASCII text pass under ISO_IR 6, so only the extended terms count.
    extended = [term for term in terms if term not in ("", "ISO_IR 6", "ISO 2022 IR 6")]
    encodings = convert_encodings(extended) if extended else []
    for name, text in texts.items():
        missing = [character for character in text if not _is_encodable(character, encodings)]
        if missing:
            listed_characters = ", ".join(
                f"{character!r} (U+{ord(character):04X})" for character in dict.fromkeys(missing)
            )
            raise ValueError(
                f"{name} pattern contains {listed_characters}, which character set {character_set!r} cannot encode: "
                "use ISO_IR 192 (UTF-8) or the character set the worklist server expects."
            )
    return terms if len(terms) > 1 else terms[0]


def _is_encodable(character: str, encodings: Sequence[str]) -> bool:
    if character.isascii():
        return True
    for encoding in encodings:
        try:
            character.encode(encoding)
        except (UnicodeError, LookupError):
            continue
        return True
    return False


# --- Character sets in responses --------------------------------------------

_DEFINED_TERMS = SINGLE_BYTE_TERMS | UNEXTENDED_MULTI_BYTE_TERMS | ISO_2022_TERMS
_ISO_IR = re.compile(r"^ISO[\s_-]*IR[\s_-]*(\d+)$")
_ISO_2022 = re.compile(r"^ISO[\s_-]*2022[\s_-]*IR[\s_-]*(\d+)$")
_ISO_8859 = re.compile(r"^(?:ISO[\s_-]*)?8859[\s_-]*(\d+)$")
# ISO 8859 part number -> the ISO-IR registration DICOM uses for it (PS3.3 C.12.1.1.2).
_ISO_8859_PARTS = {1: 100, 2: 101, 3: 109, 4: 110, 5: 144, 6: 127, 7: 126, 8: 138, 9: 148, 11: 166, 15: 203}
_ALIASES = {
    "UTF8": "ISO_IR 192",
    "UTF-8": "ISO_IR 192",
    "UTF_8": "ISO_IR 192",
    "LATIN1": "ISO_IR 100",
    "LATIN-1": "ISO_IR 100",
    "LATIN_1": "ISO_IR 100",
    "ASCII": "ISO_IR 6",
    "US-ASCII": "ISO_IR 6",
}


def normalize_character_set_term(term: str) -> str | None:
    """Map one Specific Character Set value onto its defined term, or None when unrecognised.

    Tolerates the spellings some servers send: other separators or case
    ("ISO-IR 100", "ISO_IR100", "iso_ir 100"), Python or IANA codec names
    ("UTF-8", "latin1", "ISO-8859-1"), and ISO_IR in place of ISO 2022 IR for
    the multi-byte sets that exist only with code extensions ("ISO_IR 87").
    """
    text = term.strip()
    if text == "" or text in _DEFINED_TERMS:
        return text
    upper = text.upper()
    if upper in _DEFINED_TERMS:
        return upper
    if upper in _ALIASES:
        return _ALIASES[upper]
    number = _match_number(_ISO_IR, upper)
    if number is not None:
        for candidate in (f"ISO_IR {number}", f"ISO 2022 IR {number}"):
            if candidate in _DEFINED_TERMS:
                return candidate
        return None
    number = _match_number(_ISO_2022, upper)
    if number is not None:
        candidate = f"ISO 2022 IR {number}"
        return candidate if candidate in _DEFINED_TERMS else None
    number = _match_number(_ISO_8859, upper)
    if number is not None and number in _ISO_8859_PARTS:
        return f"ISO_IR {_ISO_8859_PARTS[number]}"
    return None


def _match_number(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.match(text)
    return int(match.group(1)) if match else None


def _fallback_terms(fallback_character_set: str) -> list[str]:
    terms = [normalize_character_set_term(term) for term in fallback_character_set.split("\\")]
    if any(term is None for term in terms) or not any(terms):
        raise ValueError(
            f"fallback character set {fallback_character_set!r} is not a Specific Character Set defined term: "
            "use for example ISO_IR 100 (Latin-1) or ISO_IR 192 (UTF-8)."
        )
    return [term for term in terms if term is not None]


def _response_terms(identifier: Dataset, fallback: list[str], warnings: list[str]) -> list[str]:
    """Return the defined terms to decode `identifier` with, adding a warning for each correction."""
    element = identifier.get((0x0008, 0x0005))
    values = [] if element is None or element.value is None else element.value
    sent = [str(value) for value in ([values] if isinstance(values, str) else values)]
    if not any(value.strip() for value in sent):
        return _terms_without_declaration(identifier, fallback, warnings)

    terms = [normalize_character_set_term(value) for value in sent]
    sent_text = _join_terms(sent)
    if any(term is None for term in terms):
        _add_warning(
            warnings,
            f"The worklist SCP sent Specific Character Set {sent_text!r}, which is not a defined term, "
            f"so its text was decoded with the fallback {_join_terms(fallback)!r}.",
        )
        return fallback
    corrected = [term for term in terms if term is not None]
    if corrected != [value.strip() for value in sent]:
        _add_warning(
            warnings,
            f"The worklist SCP sent Specific Character Set {sent_text!r}, which is not a defined term, "
            f"so its text was decoded as {_join_terms(corrected)!r}.",
        )
    return corrected


# Code extensions that cover every ISO 2022 escape sequence DICOM defines for
# the multi-byte sets (Japanese, Korean, Chinese), for responses that use escape
# sequences without declaring a Specific Character Set.
_ISO_2022_ALL = ["ISO 2022 IR 6", "ISO 2022 IR 13", "ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"]
# Top-level text only: raw sequence bytes also hold item tags and lengths,
# which are not text and would hide valid UTF-8.
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def _raw_text(identifier: Dataset) -> bytes:
    """Return the still-undecoded bytes of the top-level text elements of `identifier`."""
    chunks = []
    for tag, element in identifier._dict.items():
        # Implicit VR responses carry no VR in the raw element, so the VR comes from the dictionary.
        vr = getattr(element, "VR", None) or _dictionary_vr(tag)
        value = getattr(element, "value", None)
        if vr in _TEXT_VRS and isinstance(value, (bytes, bytearray)):
            chunks.append(bytes(value))
    return b"".join(chunks)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _terms_without_declaration(identifier: Dataset, fallback: list[str], warnings: list[str]) -> list[str]:
    """Choose how to decode a response that declares no Specific Character Set.

    Plain ASCII needs no choice. Escape sequences mean ISO 2022 code
    extensions, and valid multi-byte UTF-8 almost never occurs by chance in a
    single-byte set, so both are decoded as what they are, with a warning,
    instead of being garbled by the fallback. Other text is decoded with the
    fallback, the connection's character set.
    """
    raw = _raw_text(identifier)
    if raw.isascii() and b"\x1b" not in raw:
        return fallback
    advice = (
        "Ask the worklist admin to make the server send Specific Character Set (0008,0005) "
        "(DCMTK wlmscpfs: option --keep-char-set), or set the connection's --charset to the server's set."
    )
    if b"\x1b" in raw:
        _add_warning(
            warnings,
            "The worklist SCP sent no Specific Character Set, but its text contains ISO 2022 escape sequences, "
            f"so it was decoded with ISO 2022 code extensions. {advice}",
        )
        return _ISO_2022_ALL
    try:
        raw.decode("utf-8")
        looks_utf8 = fallback != ["ISO_IR 192"]
    except UnicodeDecodeError:
        looks_utf8 = False
    if looks_utf8:
        _add_warning(
            warnings,
            "The worklist SCP sent no Specific Character Set, but its non-ASCII text is valid UTF-8, "
            f"so it was decoded as ISO_IR 192 (UTF-8). {advice}",
        )
        return ["ISO_IR 192"]
    # Otherwise the connection's character set is the admin's statement of
    # what the server uses, and nothing in the bytes contradicts it.
    return fallback


def _join_terms(terms: Sequence[str]) -> str:
    return "\\".join(terms)


def _apply_character_set(identifier: Dataset, terms: list[str]) -> None:
    """Make pydicom decode the still-raw text of `identifier` (and its sequences) with `terms`.

    pydicom chooses the text encoding of a received dataset when it reads it,
    so the read encoding is replaced here before any text element is accessed.
    """
    encodings = convert_encodings(terms)
    is_implicit_vr, is_little_endian = identifier.original_encoding
    identifier.set_original_encoding(is_implicit_vr, is_little_endian, encodings)
    identifier.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]


def _add_warning(warnings: list[str], message: str) -> None:
    if message not in warnings:
        LOGGER.warning("%s", message)
        warnings.append(message)


# --- Converting responses ---------------------------------------------------


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(part) for part in value)
    else:
        text = str(value)
    text = text.strip()
    return text or None


def _name_components(value: object) -> dict[str, str | None]:
    groups: Sequence[str] = value.components if isinstance(value, PersonName) else ()
    padded = list(groups) + [""] * (3 - len(groups))
    return {
        "alphabetic": padded[0] or None,
        "ideographic": padded[1] or None,
        "phonetic": padded[2] or None,
    }


def _convert_step(step: Dataset) -> ScheduledStep:
    return ScheduledStep(
        start_date=_text(step, "ScheduledProcedureStepStartDate"),
        start_time=_text(step, "ScheduledProcedureStepStartTime"),
        modality=_text(step, "Modality"),
        station_ae_title=_text(step, "ScheduledStationAETitle"),
        station_name=_text(step, "ScheduledStationName"),
        location=_text(step, "ScheduledProcedureStepLocation"),
        step_id=_text(step, "ScheduledProcedureStepID"),
        description=_text(step, "ScheduledProcedureStepDescription"),
    )


def convert_identifier(identifier: Dataset) -> WorklistItem:
    """Convert a decoded response identifier into a `WorklistItem`. Missing keys become None."""
    steps = identifier.get("ScheduledProcedureStepSequence") or []
    issuers = identifier.get("IssuerOfAccessionNumberSequence") or []
    return WorklistItem(
        patient_name=_text(identifier, "PatientName") or "",
        patient_name_components=_name_components(identifier.get("PatientName")),
        patient_id=_text(identifier, "PatientID"),
        issuer_of_patient_id=_text(identifier, "IssuerOfPatientID"),
        birth_date=_text(identifier, "PatientBirthDate"),
        sex=_text(identifier, "PatientSex"),
        accession_number=_text(identifier, "AccessionNumber"),
        accession_number_issuer=_text(issuers[0], "LocalNamespaceEntityID") if issuers else None,
        requested_procedure_id=_text(identifier, "RequestedProcedureID"),
        requested_procedure_description=_text(identifier, "RequestedProcedureDescription"),
        study_instance_uid=_text(identifier, "StudyInstanceUID"),
        referring_physician_name=_text(identifier, "ReferringPhysicianName"),
        scheduled_steps=[_convert_step(step) for step in steps],
        raw=identifier,
    )


# --- Filtering and sorting on our side --------------------------------------


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    """Compile a DICOM wildcard pattern, where * matches any text and ? one character."""
    parts = []
    for character in pattern:
        if character == "*":
            parts.append(".*")
        elif character == "?":
            parts.append(".")
        else:
            parts.append(re.escape(character))
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True)
class StepFilter:
    """The step-level keys re-checked locally, since some SCPs match only the first step.

    Each text key is a pattern with the DICOM wildcards, and "" matches any value.
    """

    modality: str = ""
    date_range: tuple[datetime.date | None, datetime.date | None] | None = None
    station_ae_title: str = ""
    station_name: str = ""
    location: str = ""

    @classmethod
    def from_query(cls, query: WorklistQuery) -> StepFilter:
        return cls(
            modality=_normalize_modality(query.modality),
            date_range=parse_date_range(query.scheduled_date),
            station_ae_title=(query.scheduled_station_ae_title or "").strip(),
            station_name=(query.scheduled_station_name or "").strip(),
            location=(query.scheduled_procedure_step_location or "").strip(),
        )

    def matches(self, item: WorklistItem) -> bool:
        """Return whether any scheduled step matches. An item without steps is kept."""
        if not self.matching_keys and self.date_range is None:
            return True
        if not item.scheduled_steps:
            return True
        return any(self.step_matches(step) for step in item.scheduled_steps)

    @property
    def matching_keys(self) -> list[tuple[str, str]]:
        """Return (ScheduledStep attribute, pattern) for each text key that restricts the match."""
        keys = (
            ("modality", self.modality),
            ("station_ae_title", self.station_ae_title),
            ("station_name", self.station_name),
            ("location", self.location),
        )
        return [(attribute, pattern) for attribute, pattern in keys if pattern]

    def step_matches(self, step: ScheduledStep) -> bool:
        """Return whether one step matches every key.

        A step that lacks a key's value cannot contradict the SCP's match, so
        it counts as matching on that key.
        """
        for attribute, pattern in self.matching_keys:
            value = getattr(step, attribute)
            if value is None:
                continue
            # Code strings (modality) are upper case, so a lower-case value is compared as upper case.
            candidate = value.upper() if attribute == "modality" else value
            if not _wildcard_regex(pattern).fullmatch(candidate):
                return False
        if self.date_range is not None and step.start_date is not None:
            return _date_in_range(step.start_date, self.date_range)
        return True


def _date_in_range(text: str, date_range: tuple[datetime.date | None, datetime.date | None]) -> bool:
    try:
        day = datetime.datetime.strptime(text.replace("-", "").replace(".", "")[:8], _DATE_FORMAT).date()
    except ValueError:
        # An unreadable date cannot be checked, so the SCP's match is kept.
        return True
    start, end = date_range
    return (start is None or day >= start) and (end is None or day <= end)


def _step_sort_key(step: ScheduledStep) -> tuple[str, str]:
    date_key = (step.start_date or "").replace("-", "").replace(".", "") or "99999999"
    time_digits = (step.start_time or "").replace(":", "").split(".")[0]
    time_key = time_digits.ljust(6, "0") if time_digits else "999999"
    return date_key, time_key


def _item_sort_key(item: WorklistItem) -> tuple[str, str]:
    step = item.first_step
    return _step_sort_key(step) if step is not None else ("99999999", "999999")


# --- Running the query ------------------------------------------------------

_FAILURE_REASONS = {
    0x0122: "the SCP does not support the Modality Worklist SOP class",
    0xA700: "the SCP is out of resources",
    0xA900: "the identifier does not match the SOP class",
    0xFE00: "the SCP cancelled the matching",
}


def _status_reason(status: int) -> str:
    if status in _FAILURE_REASONS:
        return _FAILURE_REASONS[status]
    if 0xC000 <= status <= 0xCFFF:
        return "the SCP was unable to process the query"
    return "the SCP returned an unexpected status"


def _status_action(status: int) -> str:
    if status == 0xA700:
        return "Try again later, or narrow the query (date, modality) so that fewer items match."
    if status in (0xA900, 0x0122):
        return "Check that the called AE title belongs to a Modality Worklist service, and check the SCP's log."
    return "Check the worklist SCP's log for the cause, and try again."


@dataclass
class _FindOutcome:
    items: list[WorklistItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False
    skipped: int = 0
    error: WorklistError | None = None
    responses: list[WorklistResponse] = field(default_factory=list)


class _FindRun:
    """Send one C-FIND on an established association and collect its responses."""

    def __init__(
        self,
        assoc: Association,
        endpoint: Endpoint,
        step_filter: StepFilter,
        fallback_terms: list[str],
        max_items: int,
        keep_responses: bool = False,
    ) -> None:
        self.assoc = assoc
        self.endpoint = endpoint
        self.step_filter = step_filter
        self.fallback_terms = fallback_terms
        self.max_items = max_items
        self.keep_responses = keep_responses
        self.outcome = _FindOutcome()
        self.cancelled = False
        self.responses_after_cancel = 0
        self.wait_started = time.monotonic()

    def run(self, identifier: Dataset) -> _FindOutcome:
        responses = self.assoc.send_c_find(identifier, MODALITY_WORKLIST_FIND, msg_id=_MESSAGE_ID)
        for status, response in self._timed(responses):
            code = status.get("Status")
            if code is None:
                raise DicomNetworkError(self._lost_failure())
            if code_to_category(code) == STATUS_PENDING:
                if not self._on_pending(response):
                    break
                continue
            self._on_final(int(code), status)
            break
        return self.outcome

    def _timed(
        self, responses: Iterator[tuple[Dataset, Dataset | None]]
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        while True:
            self.wait_started = time.monotonic()
            try:
                yield next(responses)
            except StopIteration:
                return

    def _on_pending(self, response: Dataset | None) -> bool:
        """Handle one pending response. Return False when the association had to be aborted."""
        if self.cancelled:
            self.responses_after_cancel += 1
            if self.responses_after_cancel > _MAX_RESPONSES_AFTER_CANCEL:
                _add_warning(
                    self.outcome.warnings,
                    f"The worklist SCP kept sending matches after the C-CANCEL, so the association was aborted "
                    f"after {_MAX_RESPONSES_AFTER_CANCEL} more.",
                )
                self.assoc.abort()
                return False
            return True
        if response is None:
            _add_warning(
                self.outcome.warnings,
                "A match from the worklist SCP could not be decoded and was skipped.",
            )
            return True
        item = self._convert(response)
        kept = self.step_filter.matches(item)
        if self.keep_responses:
            self.outcome.responses.append(WorklistResponse(response, kept))
        if not kept:
            self.outcome.skipped += 1
            return True
        if len(self.outcome.items) >= self.max_items:
            self._cancel()
            return True
        self.outcome.items.append(item)
        return True

    def _convert(self, response: Dataset) -> WorklistItem:
        terms = _response_terms(response, self.fallback_terms, self.outcome.warnings)
        _apply_character_set(response, terms)
        return convert_identifier(response)

    def _cancel(self) -> None:
        LOGGER.info(
            "worklist query to %s reached %d items; sending C-CANCEL", self.endpoint.address, self.max_items
        )
        self.outcome.truncated = True
        self.cancelled = True
        self.assoc.send_c_cancel(_MESSAGE_ID, query_model=MODALITY_WORKLIST_FIND)

    def _on_final(self, code: int, status: Dataset) -> None:
        category = code_to_category(code)
        if category == STATUS_SUCCESS or (category == STATUS_CANCEL and self.cancelled):
            return
        if category == STATUS_WARNING:
            _add_warning(self.outcome.warnings, f"The worklist SCP ended the query with warning status 0x{code:04X}.")
            return
        comment = _text(status, "ErrorComment")
        error = WorklistError(code, _status_reason(code), comment)
        if self.cancelled:
            # The items up to the limit arrived before the failure, so they are kept.
            _add_warning(self.outcome.warnings, f"The SCP ended the cancelled query with a failure: {error.summary}.")
            return
        self.outcome.error = error

    def _lost_failure(self) -> Failure:
        # pynetdicom pauses its reactor during C-FIND, so an abort from the
        # peer is still the next primitive in the queue when no response came.
        primitive = self.assoc.dul.peek_next_pdu()
        if isinstance(primitive, A_P_ABORT):
            return decode_abort(None, primitive.provider_reason)
        if isinstance(primitive, A_ABORT):
            # pynetdicom's A-ABORT primitive keeps the source but not the reason.
            try:
                source = primitive.abort_source
            except ValueError:
                source = None
            return decode_abort(source, None)
        waited = time.monotonic() - self.wait_started
        if waited >= self.endpoint.dimse_timeout:
            return Failure(
                FailureKind.DIMSE_TIMEOUT,
                f"The worklist SCP sent no C-FIND response within {self.endpoint.dimse_timeout:g} s.",
                "Try again later, narrow the query, or raise the DIMSE timeout if the SCP is known to be slow.",
                transient=True,
            )
        return Failure(
            FailureKind.CONNECTION_LOST,
            "The worklist query ended without a final status: the SCP closed the connection or sent "
            "an invalid response, and the association was aborted.",
            "Check the worklist SCP's log, and try again.",
            transient=True,
        )


def query_worklist(
    endpoint: Endpoint,
    query: WorklistQuery,
    *,
    fallback_character_set: str = DEFAULT_CHARACTER_SET,
    max_items: int = DEFAULT_MAX_ITEMS,
    keep_responses: bool = False,
) -> WorklistResult:
    """Run a Modality Worklist C-FIND and return the matching items sorted by scheduled start.

    Items are re-filtered on the step keys (modality, scheduled date, station
    AE title, station name, location) against every scheduled step, and an
    item is kept when one step matches them all. Response text is decoded
    with the response's Specific Character Set, or with
    `fallback_character_set` when it has none. Past `max_items` items the
    query is cancelled and the result marked truncated. `keep_responses`
    keeps every decoded response in `WorklistResult.responses` for debugging.

    Raises ValueError for an invalid query, `DicomNetworkError` when the
    association fails or breaks off, and `WorklistError` when the SCP ends the
    query with a failure or cancel status.
    """
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items {max_items!r} is invalid: use a whole number of at least 1.")
    identifier = build_identifier(query)
    step_filter = StepFilter.from_query(query)
    fallback = _fallback_terms(fallback_character_set)

    LOGGER.info("worklist query to %s started", endpoint.address)
    with association(endpoint, [build_context(MODALITY_WORKLIST_FIND)]) as assoc:
        outcome = _FindRun(assoc, endpoint, step_filter, fallback, max_items, keep_responses).run(identifier)
    if outcome.error is not None:
        LOGGER.warning(
            "worklist query to %s failed with status 0x%04X", endpoint.address, outcome.error.status
        )
        raise outcome.error

    outcome.items.sort(key=_item_sort_key)
    LOGGER.info(
        "worklist query to %s returned %d items (%d removed by the local filter, truncated=%s)",
        endpoint.address,
        len(outcome.items),
        outcome.skipped,
        outcome.truncated,
    )
    return WorklistResult(outcome.items, outcome.warnings, outcome.truncated, identifier, outcome.responses)
