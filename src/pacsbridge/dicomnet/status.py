"""DIMSE status codes: category and meaning, per PS3.7 Annex C and PS3.4 Annex B.

The ranges of PS3.7 C.1 decide the category of a code. 0x0000 is success.
0x0001, 0x0107, 0x0116 and 0xBxxx are warnings, 0xFE00 is cancel, and 0xFF00
and 0xFF01 are pending. Everything else, including codes not listed, is a
failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StatusCategory(enum.StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


@dataclass(frozen=True)
class StatusMeaning:
    code: int
    category: StatusCategory
    meaning: str

    @property
    def is_stored(self) -> bool:
        """True for a C-STORE response after which the SCP has stored the instance."""
        return self.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)

    def as_dict(self) -> dict[str, object]:
        return {"status": self.code, "status_hex": f"0x{self.code:04X}", "category": self.category.value,
                "meaning": self.meaning}


# General statuses of PS3.7 Annex C, shared by all services.
_GENERAL = {
    0x0000: "success",
    0x0001: "requested optional attributes are not supported",
    0x0105: "no such attribute",
    0x0106: "invalid attribute value",
    0x0107: "attribute list error: the SCP ignored some attributes",
    0x0110: "processing failure on the SCP",
    0x0111: "duplicate SOP instance: the SCP already has an instance with this UID",
    0x0112: "no such SOP instance",
    0x0116: "attribute value out of range: the SCP kept the instance",
    0x0117: "invalid object instance",
    0x0118: "no such SOP class",
    0x0119: "class-instance conflict",
    0x0120: "missing attribute",
    0x0121: "missing attribute value",
    0x0122: "SOP class not supported by the SCP",
    0x0124: "not authorized: the SCP refuses this operation from our AE title",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation on the SCP",
    0xFE00: "cancelled",
    0xFF00: "pending",
    0xFF01: "pending: some optional keys were not supported",
}

# Storage Service Class statuses of PS3.4 B.2.3, by code or by the high byte
# of a range (0xA7xx, 0xA9xx, 0xCxxx).
_STORAGE = {
    0xB000: "coercion of data elements: the SCP changed some attribute values",
    0xB006: "elements discarded: the SCP dropped some attributes",
    0xB007: "data set does not match the SOP class: the SCP kept it anyway",
}
_STORAGE_RANGES = [
    (0xA700, 0xA7FF, "out of resources on the SCP"),
    (0xA900, 0xA9FF, "data set does not match the SOP class"),
    (0xC000, 0xCFFF, "the SCP cannot understand the data set"),
]
# Modality Worklist and other C-FIND statuses of PS3.4 K.4.1.1.4.
_FIND = {
    0xA700: "out of resources on the SCP",
    0xA900: "identifier does not match the SOP class",
}
_FIND_RANGES = [(0xC000, 0xCFFF, "the SCP is unable to process the query")]

_WARNING_CODES = {0x0001, 0x0107, 0x0116}


def categorize(code: int) -> StatusCategory:
    if code == 0x0000:
        return StatusCategory.SUCCESS
    if code in _WARNING_CODES or 0xB000 <= code <= 0xBFFF:
        return StatusCategory.WARNING
    if code == 0xFE00:
        return StatusCategory.CANCEL
    if code in (0xFF00, 0xFF01):
        return StatusCategory.PENDING
    return StatusCategory.FAILURE


def describe_status(code: int, *, service: str = "storage") -> StatusMeaning:
    """Return the category and meaning of a DIMSE status `code` for `service`.

    `service` is "storage", "find" or "verification"; it picks the
    service-specific meanings of the 0xA7xx, 0xA9xx, 0xBxxx and 0xCxxx ranges.
    """
    if service == "storage":
        table, ranges = _STORAGE, _STORAGE_RANGES
    elif service == "find":
        table, ranges = _FIND, _FIND_RANGES
    else:
        table, ranges = {}, []
    meaning = table.get(code) or _GENERAL.get(code)
    if meaning is None:
        meaning = next((text for low, high, text in ranges if low <= code <= high), None)
    if meaning is None:
        meaning = f"status 0x{code:04X} is not defined by the standard for this service"
    return StatusMeaning(code, categorize(code), meaning)
