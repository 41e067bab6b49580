"""AE title checks following the AE value representation (PS3.5 section 6.2).

An AE title is 1 to 16 characters of the default character repertoire (ASCII)
without backslash or control characters, and not all spaces. Leading and
trailing spaces are not significant. The case the admin typed is kept as is:
some PACS match AE titles case-sensitively.
"""

from __future__ import annotations

from pacsbridge.connections.problems import Problem

AE_TITLE_MAX_LENGTH = 16

_FIX = "Use 1 to 16 ASCII letters, digits, spaces or _ - . characters, as configured on the other side."


def check_ae_title(field: str, value: object) -> list[Problem]:
    """Return errors for what the standard forbids and warnings for what PACS often mishandle."""
    if not isinstance(value, str) or not value.strip(" "):
        return [Problem.error(field, value, "is empty or only spaces", _FIX)]
    if len(value) > AE_TITLE_MAX_LENGTH:
        return [Problem.error(field, value, f"has {len(value)} characters, more than 16", _FIX)]
    if "\\" in value:
        return [Problem.error(field, value, "contains a backslash, which DICOM forbids in AE titles", _FIX)]
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return [Problem.error(field, value, "contains a control character", _FIX)]
    if not value.isascii():
        return [
            Problem.error(field, value, "contains a non-ASCII character, which DICOM forbids in AE titles", _FIX)
        ]

    warnings = []
    if value != value.upper():
        warnings.append(
            Problem.warning(
                field,
                value,
                "contains lower-case letters, which many PACS do not expect",
                "Keep it only if the other side is configured with exactly this case.",
            )
        )
    if " " in value.strip(" "):
        warnings.append(
            Problem.warning(
                field,
                value,
                "contains embedded spaces, which many PACS do not expect",
                "Keep it only if the other side is configured with exactly these spaces.",
            )
        )
    if value != value.strip(" "):
        warnings.append(
            Problem.warning(
                field,
                value,
                "has leading or trailing spaces, which DICOM ignores",
                "Remove them unless the other side expects them.",
            )
        )
    return warnings
