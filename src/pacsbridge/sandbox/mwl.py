"""A small Modality Worklist SCP for `pacsbridge demo` and for tests.

`SandboxWorklistServer` serves a fixed list of worklist items over C-FIND on
the Modality Worklist Information Model - FIND SOP class and responds to C-ECHO.
It matches Patient Name (wildcards, case-insensitive), Patient ID and
Accession Number (wildcards), and in the Scheduled Procedure Step Sequence
Modality, Scheduled Station AE Title (wildcards) and the start date (single
date or range). Other keys are returned but not matched.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

LOGGER = logging.getLogger(__name__)

# Keep pynetdicom from writing identifiers, which contain patient names, to the log.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STATUS_PENDING = 0xFF00
STATUS_SUCCESS = 0x0000
STATUS_CANCEL = 0xFE00
STATUS_UNABLE_TO_PROCESS = 0xC000

# Top-level keys matched with wildcards. Patient Name also ignores case, which
# PS3.4 C.2.2.2.4 allows for the PN value representation only.
_MATCHED_KEYS = ("PatientName", "PatientID", "AccessionNumber")
_MATCHED_STEP_KEYS = ("Modality", "ScheduledStationAETitle")


def make_worklist_item(
    *,
    patient_name: str,
    patient_id: str,
    scheduled_date: str | datetime.date,
    scheduled_time: str = "090000",
    modality: str = "US",
    station_ae_title: str = "PB-US-1",
    birth_date: str | datetime.date | None = None,
    sex: str | None = None,
    issuer_of_patient_id: str | None = None,
    accession_number: str | None = None,
    study_instance_uid: str | None = None,
    requested_procedure_id: str | None = None,
    requested_procedure_description: str = "Point-of-care ultrasound",
    step_id: str | None = None,
    step_description: str = "POCUS examination",
    referring_physician_name: str | None = None,
    character_set: str | Sequence[str] | None = "ISO_IR 100",
) -> Dataset:
    """Build one worklist item with one scheduled procedure step.

    Text stays as Python strings, and pydicom encodes it with `character_set`
    when the item is written or sent. `character_set` is a Specific Character
    Set value (backslash-separated or a list for ISO 2022 code extensions), or
    None for the default repertoire. A missing Study Instance UID is generated.
    DCMTK 3.6.7 wlmscpfs serves such an item with its default check for
    incomplete worklist files (--enable-file-reject) turned on.
    """
    item = Dataset()
    if character_set is not None:
        terms = character_set.split("\\") if isinstance(character_set, str) else list(character_set)
        item.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    item.PatientName = patient_name
    item.PatientID = patient_id
    if issuer_of_patient_id is not None:
        item.IssuerOfPatientID = issuer_of_patient_id
    item.PatientBirthDate = _date_text(birth_date)
    item.PatientSex = sex or ""
    item.AccessionNumber = accession_number or ""
    item.ReferringPhysicianName = referring_physician_name or ""
    item.StudyInstanceUID = study_instance_uid or generate_uid()
    item.RequestedProcedureID = requested_procedure_id or patient_id[:16]
    item.RequestedProcedureDescription = requested_procedure_description
    item.RequestedProcedurePriority = ""
    item.ReferencedStudySequence = []
    item.ReferencedPatientSequence = []

    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station_ae_title
    step.ScheduledProcedureStepStartDate = _date_text(scheduled_date)
    step.ScheduledProcedureStepStartTime = scheduled_time
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = step_description
    step.ScheduledProcedureStepID = step_id or (accession_number or patient_id)[:16]
    step.ScheduledStationName = ""
    step.ScheduledProcedureStepLocation = ""
    item.ScheduledProcedureStepSequence = [step]
    return item


def _date_text(value: str | datetime.date | None) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime.date):
        return value.strftime("%Y%m%d")
    return value


class SandboxWorklistServer:
    """A pynetdicom worklist SCP on a loopback port, serving `items`.

    With port 0 the system picks a free port, and `port` contains the bound
    port once `start()` has returned. The server rejects associations whose called AE
    title differs from `ae_title`, as hospital worklist servers do.
    """

    def __init__(
        self,
        items: list[Dataset],
        ae_title: str = "PB-SANDBOX-MWL",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.items = list(items)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Start serving in background threads and return once the port is bound."""
        if self._server is not None:
            raise RuntimeError(f"the sandbox worklist server is already running on port {self.port}")
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(ModalityWorklistInformationFind)
        ae.add_supported_context(Verification)
        # With block=False, start_server always returns the running server.
        server = cast(
            ThreadedAssociationServer,
            ae.start_server((self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._on_find)]),
        )
        self._server = server
        self.port = int(server.server_address[1])
        LOGGER.info("sandbox worklist server %s listening on %s port %d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        LOGGER.info("sandbox worklist server %s on port %d stopped", self.ae_title, self.port)

    def __enter__(self) -> SandboxWorklistServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        request = event.identifier
        try:
            matcher = _Matcher(request)
        except ValueError as exc:
            LOGGER.warning("sandbox worklist server rejected a query: %s", exc)
            yield STATUS_UNABLE_TO_PROCESS, None
            return
        sent = 0
        for item in list(self.items):
            if event.is_cancelled:
                LOGGER.info("sandbox worklist query cancelled after %d matches", sent)
                yield STATUS_CANCEL, None
                return
            if matcher.matches(item):
                sent += 1
                yield STATUS_PENDING, _response(request, item)
        LOGGER.info("sandbox worklist query returned %d of %d items", sent, len(self.items))
        yield STATUS_SUCCESS, None


class _Matcher:
    """The matching keys of one C-FIND request identifier."""

    def __init__(self, request: Dataset) -> None:
        self.patterns = {keyword: _value(request, keyword) for keyword in _MATCHED_KEYS}
        steps = request.get("ScheduledProcedureStepSequence") or []
        step = steps[0] if steps else Dataset()
        self.step_patterns = {keyword: _value(step, keyword) for keyword in _MATCHED_STEP_KEYS}
        self.date_range = _parse_range(_value(step, "ScheduledProcedureStepStartDate"))

    def matches(self, item: Dataset) -> bool:
        for keyword, pattern in self.patterns.items():
            if pattern and not self._key_matches(keyword, pattern, item):
                return False
        if not any(self.step_patterns.values()) and self.date_range is None:
            return True
        steps = item.get("ScheduledProcedureStepSequence") or []
        return any(self._step_matches(step) for step in steps)

    @staticmethod
    def _key_matches(keyword: str, pattern: str, item: Dataset) -> bool:
        value = _value(item, keyword)
        if keyword != "PatientName":
            return _wildcard_match(pattern, value)
        # A name pattern may target the whole Person Name or one component
        # group (alphabetic, ideographic or phonetic).
        candidates = [value, *value.split("=")]
        return any(_wildcard_match(pattern, candidate, ignore_case=True) for candidate in candidates)

    def _step_matches(self, step: Dataset) -> bool:
        for keyword, pattern in self.step_patterns.items():
            values = _values(step, keyword)
            if pattern and not any(_wildcard_match(pattern, value) for value in values):
                return False
        if self.date_range is None:
            return True
        start, end = self.date_range
        date = _value(step, "ScheduledProcedureStepStartDate")
        return bool(date) and (not start or date >= start) and (not end or date <= end)


def _value(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(part) for part in value)
    return str(value).strip()


def _values(dataset: Dataset, keyword: str) -> list[str]:
    value = dataset.get(keyword)
    if value is None:
        return [""]
    if isinstance(value, MultiValue):
        return [str(part).strip() for part in value]
    return [str(value).strip()]


def _wildcard_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    parts = []
    for character in pattern:
        if character == "*":
            parts.append(".*")
        elif character == "?":
            parts.append(".")
        else:
            parts.append(re.escape(character))
    flags = re.DOTALL | re.IGNORECASE if ignore_case else re.DOTALL
    return re.fullmatch("".join(parts), value, flags) is not None


_DATE_RANGE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")


def _parse_range(text: str) -> tuple[str, str] | None:
    """Parse a DA matching value into (start, end) YYYYMMDD strings, either possibly empty."""
    if not text:
        return None
    match = _DATE_RANGE.match(text)
    if match is None or not (match.group(1) or match.group(3)):
        raise ValueError(f"scheduled date {text!r} is not a DA value or range")
    start, dash, end = match.group(1) or "", match.group(2), match.group(3) or ""
    if not dash:
        return start, start
    return start, end


def _response(request: Dataset, item: Dataset) -> Dataset:
    """Copy from `item` the keys the request asked for, with the item's character set."""
    response = Dataset()
    if "SpecificCharacterSet" in item:
        response.SpecificCharacterSet = item.SpecificCharacterSet
    for element in request:
        if element.keyword in ("SpecificCharacterSet", ""):
            continue
        if element.VR == "SQ":
            setattr(response, element.keyword, _response_sequence(element.value, item.get(element.keyword)))
        elif element.keyword in item:
            response[element.tag] = item[element.tag]
        else:
            setattr(response, element.keyword, None)
    return response


def _response_sequence(requested: Sequence[Dataset], stored: Sequence[Dataset] | None) -> list[Dataset]:
    """Return the stored sequence items, cut down to the requested keys when the request names any."""
    if not stored:
        return []
    keys = list(requested[0].keys()) if requested and len(requested[0]) else None
    result = []
    for stored_item in stored:
        copy = Dataset()
        for tag in keys or stored_item.keys():
            if tag in stored_item:
                copy[tag] = stored_item[tag]
            else:
                copy.add_new(tag, requested[0][tag].VR, None)
        result.append(copy)
    return result
