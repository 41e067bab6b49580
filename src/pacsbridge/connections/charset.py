"""Specific Character Set (0008,0005) defined terms from PS3.3 C.12.1.1.2."""

from __future__ import annotations

from pacsbridge.connections.problems import Problem

SINGLE_BYTE_TERMS = frozenset(
    {
        "ISO_IR 6",
        "ISO_IR 100",
        "ISO_IR 101",
        "ISO_IR 109",
        "ISO_IR 110",
        "ISO_IR 144",
        "ISO_IR 127",
        "ISO_IR 126",
        "ISO_IR 138",
        "ISO_IR 148",
        "ISO_IR 203",
        "ISO_IR 13",
        "ISO_IR 166",
    }
)
# Multi-byte sets without code extensions: a single value, never combined.
UNEXTENDED_MULTI_BYTE_TERMS = frozenset({"ISO_IR 192", "GB18030", "GBK"})
ISO_2022_TERMS = frozenset(
    {
        "ISO 2022 IR 6",
        "ISO 2022 IR 100",
        "ISO 2022 IR 101",
        "ISO 2022 IR 109",
        "ISO 2022 IR 110",
        "ISO 2022 IR 144",
        "ISO 2022 IR 127",
        "ISO 2022 IR 126",
        "ISO 2022 IR 138",
        "ISO 2022 IR 148",
        "ISO 2022 IR 203",
        "ISO 2022 IR 13",
        "ISO 2022 IR 166",
        "ISO 2022 IR 87",
        "ISO 2022 IR 159",
        "ISO 2022 IR 149",
        "ISO 2022 IR 58",
    }
)

_FIX = (
    "Use a defined term such as ISO_IR 100 (Latin-1), ISO_IR 192 (UTF-8), GB18030, "
    "or ISO 2022 terms separated by backslashes, for example '\\ISO 2022 IR 87'."
)


def check_character_set(field: str, value: object) -> list[Problem]:
    """Check a Specific Character Set value, single or multi-valued (backslash separated)."""
    if not isinstance(value, str):
        return [Problem.error(field, value, "is not text", _FIX)]
    terms = [term.strip() for term in value.split("\\")]
    if len(terms) == 1:
        term = terms[0]
        if term in SINGLE_BYTE_TERMS | UNEXTENDED_MULTI_BYTE_TERMS | ISO_2022_TERMS:
            return []
        return [Problem.error(field, value, "is not a defined term of the standard", _FIX)]

    # Code extensions: the first value may be empty (default repertoire).
    if terms[0] == "":
        terms = terms[1:]
    unknown = [term for term in terms if term not in ISO_2022_TERMS]
    if unknown:
        return [
            Problem.error(
                field,
                value,
                f"combines values that are not ISO 2022 defined terms ({', '.join(map(repr, unknown))})",
                _FIX,
            )
        ]
    return []
