"""Re-encode the text of a header in the Specific Character Set a PACS expects.

`encode_text` decodes every text value with the character set of the source
(nested sets in sequence items included), declares the connection's set at the
top level and checks that every value survives the trip. A value the set cannot
hold fails the instance: nothing is ever written with "?" in place of a character.

Values in ISO 2022 sets with code extensions are encoded here, not by pydicom,
and stored as bytes that pydicom writes as they are. pydicom 3.0.2 writes
ISO 2022 IR 58 text without its escape sequence, does not designate
ISO 2022 IR 149 again after a line break, and writes Latin-1 bytes for text that
is outside the default repertoire.

The rules followed here are those of the DICOM standard for code extensions
(PS3.5). The initial designations of value 1 of Specific Character Set apply
again at the start of each value and after each delimiter (CR, LF, TAB, FF,
and ^ and = in a person name). A G0 set that was switched is switched back
before each delimiter and at the end of the value.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from pacsbridge.connections.charset import check_character_set
from pacsbridge.prepare.errors import PreparationError

SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
# VRs whose values use the Specific Character Set.
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# VRs restricted to the default character repertoire (ASCII).
DEFAULT_REPERTOIRE_VRS = frozenset({"CS", "AE", "DA", "TM", "DT", "UI", "AS", "IS", "DS", "UR"})

ESC = "\x1b"
_TEXT_DELIMITERS = frozenset("\r\n\t\f")
_PERSON_NAME_DELIMITERS = _TEXT_DELIMITERS | {"^", "="}
# pydicom 3.0.2 decodes ISO 2022 IR 58 with the GB 2312 codec but keeps the
# designation escape in the decoded text. The characters after it are right.
_IR_58_RESIDUE = "\x1b$)A"


@dataclass
class CharsetReport:
    """Outcome of `encode_text` for one header."""

    source: str  # Specific Character Set of the source at the top level, "" when absent
    target: str
    text_elements: int = 0  # text elements checked, nested ones included
    changed: bool = False  # Specific Character Set changed or nested sets removed
    flags: list[str] = field(default_factory=list)


# --- Code elements of the character sets -----------------------------------


@dataclass(frozen=True)
class _CodeElement:
    """One graphic character set that ISO 2022 designates to G0 or G1."""

    name: str
    escape: bytes
    g1: bool
    encode_character: Callable[[str], bytes | None]


def _ascii(character: str) -> bytes | None:
    if ord(character) < 0x80 and character != ESC:
        return character.encode("ascii")
    return None


def _jis_roman(character: str) -> bytes | None:
    # JIS X 0201 Romaji differs from ASCII at 0x5C (yen sign) and 0x7E (overline).
    if character in "\\~":
        return None
    return _ascii(character)


def _right_half(codec: str) -> Callable[[str], bytes | None]:
    def encode(character: str) -> bytes | None:
        try:
            encoded = character.encode(codec)
        except UnicodeEncodeError:
            return None
        return encoded if len(encoded) == 1 and encoded[0] >= 0xA0 else None

    return encode


def _katakana(character: str) -> bytes | None:
    try:
        encoded = character.encode("shift_jis")
    except UnicodeEncodeError:
        return None
    return encoded if len(encoded) == 1 and 0xA1 <= encoded[0] <= 0xDF else None


def _double_byte_gr(codec: str) -> Callable[[str], bytes | None]:
    """Encode in a 94x94 set used in G1 (GR bytes), as KS X 1001 and GB 2312 are in DICOM."""

    def encode(character: str) -> bytes | None:
        try:
            encoded = character.encode(codec)
        except UnicodeEncodeError:
            return None
        # euc_kr falls back to 8-byte KS X 1001:1998 sequences, which DICOM does not allow.
        if len(encoded) == 2 and encoded[0] >= 0xA1 and encoded[1] >= 0xA1:
            return encoded
        return None

    return encode


def _double_byte_gl(codec: str, escape: bytes) -> Callable[[str], bytes | None]:
    """Encode in a 94x94 set used in G0 (GL bytes): JIS X 0208 and JIS X 0212."""

    def encode(character: str) -> bytes | None:
        try:
            encoded = codecs.getincrementalencoder(codec)().encode(character)
        except UnicodeEncodeError:
            return None
        if encoded.startswith(escape) and len(encoded) == len(escape) + 2:
            return encoded[len(escape) :]
        return None

    return encode


_IR_6 = _CodeElement("ISO-IR 6", b"\x1b(B", False, _ascii)
_IR_14 = _CodeElement("ISO-IR 14", b"\x1b(J", False, _jis_roman)
_IR_13 = _CodeElement("ISO-IR 13", b"\x1b)I", True, _katakana)
_IR_87 = _CodeElement("ISO-IR 87", b"\x1b$B", False, _double_byte_gl("iso2022_jp", b"\x1b$B"))
_IR_159 = _CodeElement("ISO-IR 159", b"\x1b$(D", False, _double_byte_gl("iso2022_jp_2", b"\x1b$(D"))
_IR_149 = _CodeElement("ISO-IR 149", b"\x1b$)C", True, _double_byte_gr("euc_kr"))
_IR_58 = _CodeElement("ISO-IR 58", b"\x1b$)A", True, _double_byte_gr("gb2312"))

# ISO 8859 right halves: registration number -> (Python codec, final byte of ESC - F).
_ISO_8859_SETS = {
    "100": ("latin_1", b"A"),
    "101": ("iso8859_2", b"B"),
    "109": ("iso8859_3", b"C"),
    "110": ("iso8859_4", b"D"),
    "144": ("iso8859_5", b"L"),
    "127": ("iso8859_6", b"G"),
    "126": ("iso8859_7", b"F"),
    "138": ("iso8859_8", b"H"),
    "148": ("iso8859_9", b"M"),
    "203": ("iso8859_15", b"b"),
    "166": ("tis_620", b"T"),
}
_MULTI_BYTE_SETS = {"87": _IR_87, "159": _IR_159, "149": _IR_149, "58": _IR_58}
_UNEXTENDED_CODECS = {"ISO_IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk"}


def _code_elements(term: str) -> list[_CodeElement]:
    """Return the code elements a defined term designates, G0 first."""
    number = term.rsplit(" ", 1)[-1] if term else "6"
    if number == "6":
        return [_IR_6]
    if number == "13":
        return [_IR_14, _IR_13]
    if number in _MULTI_BYTE_SETS:
        return [_MULTI_BYTE_SETS[number]]
    codec, final = _ISO_8859_SETS[number]
    return [
        _IR_6,
        _CodeElement(f"ISO-IR {number}", b"\x1b-" + final, True, _right_half(codec)),
    ]


@dataclass(frozen=True)
class _Target:
    """The connection's Specific Character Set, parsed once."""

    term: str
    values: list[str]
    encodings: list[str]  # pydicom's Python encodings for the values
    uses_code_extensions: bool
    elements: list[_CodeElement]  # in the order of the values, value 1 first
    initial_g0: _CodeElement
    initial_g1: _CodeElement | None


def _parse_target(term: str) -> _Target:
    problems = check_character_set("charset", term)
    if problems:
        raise PreparationError(
            f"Specific Character Set '{term}' of the connection is not a defined term",
            "Set the connection's --charset to a defined term, for example ISO_IR 100 or ISO_IR 192.",
        )
    values = [value.strip() for value in term.split("\\")]
    uses_code_extensions = len(values) > 1 or values[0].startswith("ISO 2022")
    elements: list[_CodeElement] = []
    if values[0] not in _UNEXTENDED_CODECS:
        for value in values:
            elements.extend(element for element in _code_elements(value) if element not in elements)
    # Multi-byte sets are designated explicitly in every value, even as value 1,
    # so the initial state is the single-byte set of value 1 or the default.
    first = [] if values[0] in _UNEXTENDED_CODECS else _code_elements(values[0])
    initial_g0 = first[0] if first and first[0] in (_IR_6, _IR_14) else _IR_6
    initial_g1 = first[1] if len(first) > 1 else None
    return _Target(
        term=term,
        values=values,
        encodings=convert_encodings(values),
        uses_code_extensions=uses_code_extensions,
        elements=elements,
        initial_g0=initial_g0,
        initial_g1=initial_g1,
    )


# --- Encoding -------------------------------------------------------------------


class _Unencodable(Exception):
    def __init__(self, character: str) -> None:
        super().__init__(character)
        self.character = character


def _encode_iso_2022(text: str, target: _Target, delimiters: frozenset[str]) -> bytes:
    """Encode one value with ISO 2022 code extensions, designating sets as the module docstring describes."""
    encoded = bytearray()
    g0, g1 = target.initial_g0, target.initial_g1
    for character in text:
        if character in delimiters:
            if g0 is not target.initial_g0:
                encoded += target.initial_g0.escape
            encoded += character.encode("ascii")
            g0, g1 = target.initial_g0, target.initial_g1
            continue

        # Prefer the sets already designated, then the values in their order.
        candidates = [element for element in (g0, g1) if element is not None]
        candidates += [element for element in target.elements if element not in candidates]
        for element in candidates:
            character_bytes = element.encode_character(character)
            if character_bytes is None:
                continue
            if element.g1 and element is not g1:
                encoded += element.escape
                g1 = element
            elif not element.g1 and element is not g0:
                encoded += element.escape
                g0 = element
            encoded += character_bytes
            break
        else:
            raise _Unencodable(character)

    if g0 is not target.initial_g0:
        encoded += target.initial_g0.escape
    return bytes(encoded)


def _check_repertoire(text: str, target: _Target) -> None:
    """Raise _Unencodable for the first character of `text` outside a set without code extensions."""
    value = target.values[0]
    for character in text:
        if value in _UNEXTENDED_CODECS:
            try:
                character.encode(_UNEXTENDED_CODECS[value])
            except UnicodeEncodeError:
                raise _Unencodable(character) from None
            continue
        if not any(element.encode_character(character) for element in target.elements):
            raise _Unencodable(character)


def _decode_back(encoded: bytes, target: _Target, is_person_name: bool) -> str:
    """Decode bytes with pydicom, as a receiving toolkit would, to compare with the source text."""
    if is_person_name:
        decoded = str(PersonName(encoded, encodings=target.encodings))
    else:
        delimiters = {ord(character) for character in _TEXT_DELIMITERS}
        decoded = decode_bytes(encoded, target.encodings, delimiters)
    return decoded.replace(_IR_58_RESIDUE, "")


def _wire_bytes(text: str, target: _Target, is_person_name: bool) -> bytes:
    """Return the bytes of one value as they will be written in `target`."""
    if target.uses_code_extensions:
        delimiters = _PERSON_NAME_DELIMITERS if is_person_name else frozenset(_TEXT_DELIMITERS)
        return _encode_iso_2022(text, target, delimiters)
    _check_repertoire(text, target)
    if is_person_name:
        return PersonName(text).encode(target.encodings)
    return encode_string(text, target.encodings)


# --- Walking the dataset --------------------------------------------------------


def _walk(
    dataset: Dataset, encodings: list[str] | None = None, path: str = ""
) -> Iterator[tuple[DataElement, str, list[str]]]:
    """Yield every element with a readable location and the encodings its text uses.

    An item without its own Specific Character Set uses that of the enclosing
    dataset, and a dataset without one the default repertoire.
    """
    declared = dataset.get("SpecificCharacterSet")
    if declared or encodings is None:
        encodings = convert_encodings(declared or ["ISO_IR 6"])
    for element in dataset:
        location = f"{path}{element.keyword or element.tag}"
        yield element, location, encodings
        if element.VR == "SQ" and element.value is not None:
            for index, item in enumerate(element.value):
                yield from _walk(item, encodings, f"{location}[{index}].")


def _element_name(element: DataElement, location: str) -> str:
    return f"{location} {element.tag}"


def _values(element: DataElement, encodings: list[str] | None = None) -> list[str]:
    """Return the values of `element` as text, decoding bytes set in memory with `encodings`."""
    if element.value is None or element.value == "":
        return []
    values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
    return [_text_of(value, encodings or [], element.VR == "PN") for value in values]


def _text_of(value: object, encodings: list[str], is_person_name: bool) -> str:
    if isinstance(value, PersonName):
        # A name built from bytes in memory carries pydicom's default encoding,
        # not the dataset's, so its bytes are decoded again.
        if value.original_string is not None and encodings and value.encodings != encodings:
            return str(PersonName(value.original_string, encodings=encodings))
        return str(value)
    if isinstance(value, bytes):
        if is_person_name:
            return str(PersonName(value, encodings=encodings))
        return decode_bytes(value, encodings, {ord(character) for character in _TEXT_DELIMITERS})
    return str(value)


def _term_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "\\".join(str(part) for part in value)


def _decode_all(dataset: Dataset, report: CharsetReport) -> list[tuple[DataElement, str, list[str]]]:
    """Decode every text value with its source character set and check the default repertoire."""
    text_elements = []
    undeclared_non_ascii = False
    for element, location, encodings in _walk(dataset):
        if element.VR in DEFAULT_REPERTOIRE_VRS:
            _check_default_repertoire(element, location)
            continue
        if element.VR not in TEXT_VRS:
            continue
        values = _values(element, encodings)
        for index, value in enumerate(values):
            if _IR_58_RESIDUE in value:
                values[index] = value = value.replace(_IR_58_RESIDUE, "")
            if ESC in value or "\ufffd" in value:
                raise PreparationError(
                    f"{_element_name(element, location)} cannot be decoded with the source's "
                    f"Specific Character Set '{report.source}'",
                    "Correct the value or the Specific Character Set (0008,0005) at the source.",
                )
            if not report.source and not value.isascii():
                undeclared_non_ascii = True
        text_elements.append((element, location, values))

    if undeclared_non_ascii:
        report.flags.append(
            "SpecificCharacterSet is absent but text is not ASCII: text was decoded as ISO_IR 100 (Latin-1)"
        )
    return text_elements


def _check_default_repertoire(element: DataElement, location: str) -> None:
    for value in _values(element):
        for character in value:
            if ord(character) >= 0x80:
                raise PreparationError(
                    f"{_element_name(element, location)} (VR {element.VR}) contains U+{ord(character):04X}, "
                    "which is outside the default character repertoire (ASCII) that this VR allows",
                    f"Correct the value at the source: {element.VR} values may contain only ASCII characters.",
                )


def _remove_nested_character_sets(dataset: Dataset, report: CharsetReport) -> None:
    for element, location, _encodings in list(_walk(dataset)):
        if element.VR != "SQ" or element.value is None:
            continue
        for index, item in enumerate(element.value):
            if SPECIFIC_CHARACTER_SET in item:
                del item[SPECIFIC_CHARACTER_SET]
                report.changed = True
                report.flags.append(f"SpecificCharacterSet removed from {location}[{index}]")


def _suggest_character_set(character: str) -> str:
    """Name defined terms that hold `character`, narrowest first, ISO_IR 192 always last."""
    for number in _ISO_8859_SETS:
        if _right_half(_ISO_8859_SETS[number][0])(character):
            return f"ISO_IR {number} or ISO_IR 192 (UTF-8)"
    if _katakana(character):
        return "ISO_IR 13 or ISO_IR 192 (UTF-8)"
    for number, element in _MULTI_BYTE_SETS.items():
        if element.encode_character(character):
            return f"'\\ISO 2022 IR {number}' or ISO_IR 192 (UTF-8)"
    return "ISO_IR 192 (UTF-8)"


def encode_text(ds: Dataset, term: str) -> CharsetReport:
    """Re-encode every text value of header `ds` in Specific Character Set `term`, in place.

    Raises PreparationError naming the element, the character set and the
    code point of the first character that `term` cannot hold. It also raises
    for any non-ASCII value of a VR restricted to the default repertoire (CS,
    AE, DA, TM, DT, UI, AS, IS, DS, UR). Private elements of VR UN are left as bytes.
    With code extensions, text values become bytes in `term` (see the module
    docstring), so read text from the source, not from `ds`, after this call.
    """
    target = _parse_target(term)
    source = _term_text(ds.get("SpecificCharacterSet"))
    report = CharsetReport(source=source, target=term)
    text_elements = _decode_all(ds, report)
    if _plain_ascii(ds, source, text_elements) and "\\" not in term and "13" not in term:
        # ASCII is part of every single-valued defined term except ISO_IR 13, so the
        # header already reads the same in `term` and is left byte for byte as it is.
        report.text_elements = len(text_elements)
        return report

    ds.SpecificCharacterSet = target.values if len(target.values) > 1 else target.values[0]
    report.changed = source.strip() != term.strip()
    _remove_nested_character_sets(ds, report)

    for element, location, values in text_elements:
        is_person_name = element.VR == "PN"
        encoded_values = []
        for value in values:
            try:
                encoded = _wire_bytes(value, target, is_person_name)
            except _Unencodable as error:
                raise _error_for(element, location, term, error.character) from None
            decoded = _decode_back(encoded, target, is_person_name)
            if decoded != value:
                first = next(
                    (a for a, b in zip(value, decoded, strict=False) if a != b),
                    value[-1:] or "?",
                )
                raise _error_for(element, location, term, first)
            encoded_values.append(encoded)
        report.text_elements += 1
        if target.uses_code_extensions and encoded_values:
            _store_bytes(element, encoded_values, target)
        elif values:
            # Plain text replaces PersonName objects that still hold the source bytes.
            element.value = values if len(values) > 1 else values[0]
    return report


def _plain_ascii(ds: Dataset, source: str, text_elements: list[tuple[DataElement, str, list[str]]]) -> bool:
    """Tell whether `ds` declares no character set (or ISO_IR 6), nests none, and has only ASCII text."""
    if source.strip() not in ("", "ISO_IR 6"):
        return False
    if any(
        element.VR == "SQ" and any(SPECIFIC_CHARACTER_SET in item for item in element.value or [])
        for element, _, _ in _walk(ds)
    ):
        return False
    return all(value.isascii() for _, _, values in text_elements for value in values)


def _store_bytes(element: DataElement, encoded_values: list[bytes], target: _Target) -> None:
    """Replace the value by bytes in the target set, which pydicom writes unchanged."""
    if element.VR == "PN":
        names = [PersonName(value, encodings=target.encodings) for value in encoded_values]
        element.value = names if len(names) > 1 else names[0]
    else:
        element.value = b"\\".join(encoded_values)


def _error_for(element: DataElement, location: str, term: str, character: str) -> PreparationError:
    return PreparationError(
        f"{_element_name(element, location)} contains U+{ord(character):04X}, "
        f"which Specific Character Set '{term}' cannot hold",
        f"Set the character set (--charset) to one that holds it, for example {_suggest_character_set(character)}.",
    )
