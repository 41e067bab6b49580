"""Attach a worklist item to uploaded instances: find the item, then write its identifiers into each file.

The user names the item by its Accession Number or by a Scheduled Procedure
Step ID, and exactly one item of the worklist result must carry it. The
item's values then replace the patient and order identification of every
instance: patient, accession number, Study Instance UID and Referenced Study
Sequence. A Request Attributes Sequence (0040,0275) is added, which names the
requested procedure and the scheduled steps that this study performs.

Requested Procedure ID and Description go into the Request Attributes
Sequence only. At the top level they are not part of the image IODs, and
dciodvfy (dicom3tools) then reports a Standard Extended SOP Class.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.charset import convert_encodings
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pacsbridge.dicomnet.worklist import (
    ScheduledStep,
    StepFilter,
    WorklistItem,
    WorklistQuery,
    WorklistResult,
)

LOGGER = logging.getLogger(__name__)

# Used when the file's character set cannot encode the item's text. UTF-8 encodes every name.
UNICODE_CHARACTER_SET = "ISO_IR 192"
# An accession number is SH and a step ID is SH: at most 16 characters, no wildcards.
_ITEM_ID = re.compile(r"^[^*?\\\x00-\x1f]{1,16}$")

# Patient module attributes of Type 2 (present, possibly empty) in every image IOD.
_PATIENT_TYPE_2 = (
    ("PatientName", "patient_name"),
    ("PatientID", "patient_id"),
    ("PatientBirthDate", "birth_date"),
    ("PatientSex", "sex"),
)


class WorklistItemError(ValueError):
    """Raised when the worklist item named for an upload is not found, is ambiguous, or cannot be applied."""


@dataclass(frozen=True)
class WorklistPick:
    """The worklist item chosen for an upload, and the scheduled steps that the uploaded study performs."""

    item: WorklistItem
    steps: tuple[ScheduledStep, ...]
    item_id: str

    def study_attributes(self) -> dict[str, object]:
        """Return the JSON stored in `Study.worklist_attributes`: the item's values and the performed step IDs."""
        attributes = self.item.as_dict()
        attributes["performed_step_ids"] = [step.step_id for step in self.steps]
        attributes["item_id"] = self.item_id
        return attributes


def check_item_id(item_id: str) -> str:
    """Return the stripped ID. Raises WorklistItemError for an empty ID, a wildcard or a backslash."""
    text = item_id.strip()
    if not _ITEM_ID.match(text):
        raise WorklistItemError(
            f"worklist item ID {item_id!r} is invalid: give the accession number or scheduled procedure step ID "
            "exactly, at most 16 characters without the wildcards * and ? or a backslash"
        )
    return text


def select_worklist_item(result: WorklistResult, query: WorklistQuery, item_id: str) -> WorklistPick:
    """Return the one item of `result` whose Accession Number or a Scheduled Procedure Step ID is `item_id`.

    A match by step ID performs the steps with that ID. A match by accession
    number performs the steps that match the query's step keys, or every
    step when none does. Raises WorklistItemError when no item or several
    items match. For a truncated result without a match, the message adds
    that the item may be among those not returned.
    """
    item_id = check_item_id(item_id)
    matches = [item for item in result.items if _carries_id(item, item_id)]
    if not matches:
        hint = (
            f" The worklist returned more than {len(result.items)} items, so the item may be among those not "
            "returned: narrow the connection's worklist filters."
            if result.truncated
            else " Check the ID with 'pacsbridge worklist --connection NAME', which lists what the filters match."
        )
        raise WorklistItemError(
            f"no worklist item has accession number or scheduled procedure step ID {item_id!r} among the "
            f"{len(result.items)} items that the connection's worklist filters match.{hint} Nothing was stored."
        )
    if len(matches) > 1:
        described = "; ".join(_describe_match(item) for item in matches)
        raise WorklistItemError(
            f"{len(matches)} worklist items carry the ID {item_id!r} ({described}): "
            "give an ID that names one item, such as its scheduled procedure step ID. Nothing was stored."
        )
    item = matches[0]
    return WorklistPick(item=item, steps=tuple(_performed_steps(item, query, item_id)), item_id=item_id)


def _carries_id(item: WorklistItem, item_id: str) -> bool:
    return item.accession_number == item_id or any(step.step_id == item_id for step in item.scheduled_steps)


def _performed_steps(item: WorklistItem, query: WorklistQuery, item_id: str) -> list[ScheduledStep]:
    by_step_id = [step for step in item.scheduled_steps if step.step_id == item_id]
    if by_step_id:
        return by_step_id
    step_filter = StepFilter.from_query(query)
    matching = [step for step in item.scheduled_steps if step_filter.step_matches(step)]
    return matching or list(item.scheduled_steps)


# --- Writing the item into instances -----------------------------------------


def study_instance_uids(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Return the Study Instance UID of each readable file, grouped. Unreadable files are left out.

    The upload rejects unreadable files later, with their reason.
    """
    studies: dict[str, list[Path]] = {}
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError):
            continue
        uid = str(header.get("StudyInstanceUID", "") or "").strip()
        if uid:
            studies.setdefault(uid, []).append(path)
    return studies


def apply_worklist_item(ds: Dataset, pick: WorklistPick) -> None:
    """Replace the patient and order identification of `ds` with the worklist item's.

    Type 2 attributes that the item lacks become empty, and Type 3 attributes
    that it lacks are removed, so no identifier of the file's former patient
    or order remains. The Study Instance UID stays when the item has none.
    Specific Character Set changes to ISO_IR 192 when the file's set cannot
    encode the item's text, and every text element is then re-encoded.
    """
    item = pick.item
    raw = item.raw
    _prepare_character_set(ds, _item_texts(pick))

    for keyword, attribute in _PATIENT_TYPE_2:
        setattr(ds, keyword, getattr(item, attribute) or "")
    _set_or_remove(ds, "IssuerOfPatientID", item.issuer_of_patient_id)

    ds.AccessionNumber = item.accession_number or ""
    _copy_sequence(raw, ds, "IssuerOfAccessionNumberSequence")
    if item.study_instance_uid:
        ds.StudyInstanceUID = item.study_instance_uid
    _copy_sequence(raw, ds, "ReferencedStudySequence")
    ds.RequestAttributesSequence = _request_attributes(pick)


def write_with_worklist_item(source: Path, target: Path, pick: WorklistPick) -> None:
    """Write `source` with the worklist item applied to `target`, in the same transfer syntax.

    The pixel data and file meta information are kept as they are. Raises
    WorklistItemError when the file cannot be read or the result cannot be written.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(source)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise WorklistItemError(f"not readable as DICOM ({exc}): upload it again once it is completely written") from None
    apply_worklist_item(ds, pick)
    # NOTE: the SOP Instance UID stays. The file is the same instance with its patient
    # and order identification corrected before pacsbridge ever sent it, so no PACS has
    # a copy under the old identification that a new UID would have to replace.
    try:
        ds.save_as(target, enforce_file_format=True)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise WorklistItemError(f"cannot be written with the worklist item's attributes ({exc})") from None


def _describe_match(item: WorklistItem) -> str:
    """Name one worklist item by its identifiers and scheduled time, never by patient data."""
    step = item.first_step
    parts = [f"accession number {item.accession_number or '(none)'!r}"]
    if step is not None:
        parts.append(f"step ID {step.step_id or '(none)'!r}")
        when = " ".join(value for value in (step.start_date, step.start_time) if value)
        if when:
            parts.append(f"scheduled {when}")
    return ", ".join(parts)


def _item_texts(pick: WorklistPick) -> list[str]:
    item = pick.item
    texts = [
        item.patient_name,
        item.patient_id,
        item.issuer_of_patient_id,
        item.accession_number,
        item.requested_procedure_id,
        item.requested_procedure_description,
    ]
    texts += [step.step_id for step in pick.steps] + [step.description for step in pick.steps]
    for keyword in ("IssuerOfAccessionNumberSequence", "ReferencedStudySequence"):
        for nested in item.raw.get(keyword) or []:
            texts += [str(element.value) for element in nested.iterall() if isinstance(element.value, str)]
    return [text for text in texts if text]


def _prepare_character_set(ds: Dataset, texts: Sequence[str]) -> None:
    """Switch `ds` to ISO_IR 192 when its Specific Character Set cannot encode `texts`."""
    current = ds.get("SpecificCharacterSet")
    if current is None:
        terms = []
    elif isinstance(current, str):
        terms = [current]
    else:
        terms = list(current)
    if _encodable(texts, terms):
        return
    # Decode every text element with the old character set while it is still in
    # place, so that writing encodes them all with the new one.
    for _ in ds.iterall():
        pass
    ds.SpecificCharacterSet = UNICODE_CHARACTER_SET
    LOGGER.info("Specific Character Set of instance %s changed to %s", ds.get("SOPInstanceUID"), UNICODE_CHARACTER_SET)


def _encodable(texts: Sequence[str], terms: Sequence[str]) -> bool:
    non_ascii = [text for text in texts if not text.isascii()]
    if not non_ascii:
        return True
    # Code extensions (several terms) switch sets inside a value. Rather than
    # check each value against them, such files also move to ISO_IR 192.
    extended = [str(term).strip() for term in terms if str(term).strip() not in ("", "ISO_IR 6")]
    if len(extended) != 1 or len(terms) != 1:
        return False
    try:
        encoding = convert_encodings(extended)[0]
    except (LookupError, ValueError):
        return False
    for text in non_ascii:
        try:
            text.encode(encoding)
        except (UnicodeError, LookupError):
            return False
    return True


def _set_or_remove(ds: Dataset, keyword: str, value: str | None) -> None:
    if value:
        setattr(ds, keyword, value)
    elif keyword in ds:
        delattr(ds, keyword)


def _copy_sequence(source: Dataset, target: Dataset, keyword: str) -> None:
    """Copy a sequence from the item into `target`, or remove it from `target` when the item has no items."""
    items = source.get(keyword) or []
    if items:
        setattr(target, keyword, [_plain_copy(item) for item in items])
    elif keyword in target:
        delattr(target, keyword)


def _plain_copy(item: Dataset) -> Dataset:
    """Return a copy of a sequence item without empty elements, which a response may carry for absent keys."""
    copied = Dataset()
    for element in item:
        value = element.value
        if value is None or value == "" or (isinstance(value, (MultiValue, list)) and len(value) == 0):
            continue
        copied.add(copy.deepcopy(element))
    return copied


def _request_attributes(pick: WorklistPick) -> list[Dataset]:
    """Build the Request Attributes Sequence: one item per performed step, or one without step keys."""
    item = pick.item
    steps: Sequence[ScheduledStep | None] = pick.steps or (None,)
    sequence = []
    for step in steps:
        request = Dataset()
        # Requested Procedure ID is Type 1C here, so it is left out rather than sent empty.
        if item.requested_procedure_id:
            request.RequestedProcedureID = item.requested_procedure_id
        if item.requested_procedure_description:
            request.RequestedProcedureDescription = item.requested_procedure_description
        if step is not None and step.step_id:
            request.ScheduledProcedureStepID = step.step_id
        if step is not None and step.description:
            request.ScheduledProcedureStepDescription = step.description
        if item.accession_number:
            request.AccessionNumber = item.accession_number
        _copy_sequence(item.raw, request, "IssuerOfAccessionNumberSequence")
        if item.study_instance_uid:
            request.StudyInstanceUID = item.study_instance_uid
        sequence.append(request)
    return sequence
