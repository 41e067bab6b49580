"""Re-encoding header text in a connection's Specific Character Set (pacsbridge.prepare.charset)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, require_tool
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pacsbridge.prepare.charset import encode_text
from pacsbridge.prepare.errors import PreparationError

PATIENT_NAME = b"\x10\x00\x10\x00PN"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def header(character_set: str | None = "ISO_IR 192", **values: object) -> Dataset:
    ds = Dataset()
    if character_set is not None:
        ds.SpecificCharacterSet = character_set
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = "2.25.1"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def written(ds: Dataset) -> bytes:
    """Write `ds` with pydicom as Explicit VR Little Endian and return the bytes."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def value_bytes(data: bytes, tag_and_vr: bytes = PATIENT_NAME) -> bytes:
    """Return the value of the first element with this tag and VR, without its padding space."""
    start = data.index(tag_and_vr) + len(tag_and_vr)
    length = int.from_bytes(data[start : start + 2], "little")
    value = data[start + 2 : start + 2 + length]
    return value[:-1] if value.endswith(b" ") else value


def read_back(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


# --- Golden tests: person name examples of PS3.5 Annexes H, I and J -------------
# The bytes of the first Japanese example, the Korean example and the Chinese
# examples in UTF-8, GB18030 and ISO 2022 IR 58 equal the Patient Name bytes of
# the chrH31, chrI2, chrX1, chrX2 and chrGB2312 samples, copies of David
# Clunie's character set test files. pydicom drops an empty trailing component
# group, so the "=" that ends the Chinese examples is not written.
# NOTE: no sample contains the second Japanese example (ISO 2022 IR 13 with
# IR 87) or a GBK name, so those two rows are not checked against a file.
GOLDEN = [
    (
        "\\ISO 2022 IR 87",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
    ),
    (
        "ISO 2022 IR 13\\ISO 2022 IR 87",
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J",
    ),
    (
        "\\ISO 2022 IR 149",
        "Hong^Gildong=洪^吉洞=홍^길동",
        b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
    ),
    (
        "ISO_IR 192",
        "Wang^XiaoDong=王^小東=",
        b"Wang^XiaoDong=\xe7\x8e\x8b^\xe5\xb0\x8f\xe6\x9d\xb1",
    ),
    ("GB18030", "Wang^XiaoDong=王^小东=", b"Wang^XiaoDong=\xcd\xf5^\xd0\xa1\xb6\xab"),
    ("GBK", "Wang^XiaoDong=王^小东=", b"Wang^XiaoDong=\xcd\xf5^\xd0\xa1\xb6\xab"),
    (
        "\\ISO 2022 IR 58",
        "Zhang^XiaoDong=张^小东=",
        b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab",
    ),
]


@pytest.mark.parametrize(("term", "name", "expected"), GOLDEN, ids=[term for term, _, _ in GOLDEN])
def test_golden_person_names(term: str, name: str, expected: bytes) -> None:
    ds = header(PatientName=name)
    encode_text(ds, term)
    data = written(ds)
    assert value_bytes(data) == expected
    assert str(read_back(data).PatientName).replace("\x1b$)A", "") == name.rstrip("=")


@pytest.mark.parametrize(
    ("sample", "term"),
    [
        ("chrH31.dcm", "\\ISO 2022 IR 87"),
        ("chrI2.dcm", "\\ISO 2022 IR 149"),
        ("chrX1.dcm", "ISO_IR 192"),
    ],
)
def test_golden_matches_sample_bytes(sample: str, term: str) -> None:
    expected = value_bytes((SAMPLES / sample).read_bytes())
    name = next(name for golden_term, name, _ in GOLDEN if golden_term == term)
    ds = header(PatientName=name)
    encode_text(ds, term)
    assert value_bytes(written(ds)) == expected.rstrip(b"=")


# --- Samples converted to UTF-8 and back --------------------------------------

SAMPLE_NAMES = {
    "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
    "chrX1.dcm": "Wang^XiaoDong=王^小東",
    "chrX2.dcm": "Wang^XiaoDong=王^小东",
    "chrGB2312.dcm": "Zhang^XiaoDong=张^小东",
    "chrRuss.dcm": "Люкceмбypг",
    "chrGreek.dcm": "Διονυσιος",
    "chrJapMulti.dcm": "やまだ^たろう",
}


@pytest.mark.parametrize("sample", sorted(SAMPLE_NAMES))
def test_sample_to_utf8_and_back(sample: str) -> None:
    source = pydicom.dcmread(SAMPLES / sample, stop_before_pixels=True)
    declared = source.SpecificCharacterSet
    original_term = declared if isinstance(declared, str) else "\\".join(declared)
    source_bytes = value_bytes((SAMPLES / sample).read_bytes())

    report = encode_text(source, "ISO_IR 192")
    assert report.source == original_term
    utf8 = read_back(written(source))
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    assert str(utf8.PatientName) == SAMPLE_NAMES[sample]

    encode_text(utf8, original_term)
    again = written(utf8)
    assert value_bytes(again) == source_bytes.rstrip(b"=")


def test_japanese_multi_valued_sample() -> None:
    ds = pydicom.dcmread(SAMPLES / "chrJapMulti.dcm", stop_before_pixels=True)
    encode_text(ds, "ISO_IR 192")
    utf8 = read_back(written(ds))
    assert [str(name) for name in utf8.OtherPatientNames] == [
        "やまだ^たろう",
        "やまだ^たろう",
    ]
    assert utf8.AdditionalPatientHistory == "たろう"


def test_nested_character_set_removed() -> None:
    ds = pydicom.dcmread(SAMPLES / "chrSQEncoding.dcm")
    report = encode_text(ds, "ISO_IR 192")
    assert "SpecificCharacterSet" not in ds.RequestedProcedureCodeSequence[0]
    assert report.changed
    assert report.flags == ["SpecificCharacterSet removed from RequestedProcedureCodeSequence[0]"]
    item = read_back(written(ds)).RequestedProcedureCodeSequence[0]
    assert str(item.PatientName) == "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"


# --- Single-byte sets -----------------------------------------------------------

SINGLE_BYTE = [
    ("ISO_IR 100", "Müller^Zoë", "Müller^Zoë".encode("latin_1")),
    ("ISO_IR 126", "Διονυσιος", "Διονυσιος".encode("iso8859_7")),
    ("ISO_IR 144", "Иванов^Пётр", "Иванов^Пётр".encode("iso8859_5")),
    ("ISO_IR 138", "כהן^דוד", "כהן^דוד".encode("iso8859_8")),
    ("ISO_IR 127", "قباني^نزار", "قباني^نزار".encode("iso8859_6")),
    ("ISO_IR 166", "สมชาย", "สมชาย".encode("tis_620")),
]


@pytest.mark.parametrize(("term", "name", "expected"), SINGLE_BYTE, ids=[term for term, _, _ in SINGLE_BYTE])
def test_single_byte_sets(term: str, name: str, expected: bytes) -> None:
    ds = header(PatientName=name)
    encode_text(ds, term)
    data = written(ds)
    assert value_bytes(data) == expected
    assert str(read_back(data).PatientName) == name


def test_latin1_to_utf8() -> None:
    ds = header("ISO_IR 100")
    ds.add_new(0x00100010, "PN", "Müller^Zoë".encode("latin_1"))
    ds.add_new(0x00081030, "LO", "Échographie".encode("latin_1"))
    report = encode_text(ds, "ISO_IR 192")
    assert report.source == "ISO_IR 100"
    assert report.text_elements == 2
    data = written(ds)
    assert value_bytes(data) == "Müller^Zoë".encode()
    assert value_bytes(data, b"\x08\x00\x30\x10LO") == "Échographie".encode()


def test_utf8_to_latin1_japanese_fails() -> None:
    ds = header(PatientName="Yamada^Tarou=山田^太郎")
    with pytest.raises(PreparationError) as caught:
        encode_text(ds, "ISO_IR 100")
    error = caught.value
    assert "PatientName (0010,0010)" in error.reason
    assert "U+5C71" in error.reason
    assert "'ISO_IR 100'" in error.reason
    assert "Yamada" not in error.reason + error.action
    assert "ISO_IR 192" in error.action
    assert "ISO 2022 IR 87" in error.action


def test_nested_value_named_in_error() -> None:
    item = Dataset()
    item.CodeMeaning = "Échographie"
    ds = header(ProcedureCodeSequence=[item])
    with pytest.raises(PreparationError) as caught:
        encode_text(ds, "ISO_IR 6")
    assert "ProcedureCodeSequence[0].CodeMeaning (0008,0104)" in caught.value.reason
    assert "U+00C9" in caught.value.reason
    assert "ISO_IR 100" in caught.value.action


# --- Nothing is ever written with "?" -------------------------------------------

UNFIT = [
    ("ISO_IR 6", "Zoë"),  # pydicom 3.0 would write a Latin-1 byte here.
    ("\\ISO 2022 IR 87", "Zoë"),
    ("\\ISO 2022 IR 149", "สมชาย"),
    ("\\ISO 2022 IR 58", "홍^길동"),
    ("ISO_IR 100", "Ωmega"),
    ("ISO_IR 126", "Müller"),
    ("ISO 2022 IR 13\\ISO 2022 IR 87", "Tilde~"),
    ("GBK", "홍길동"),
    ("ISO_IR 192", "\ud800"),
]


@pytest.mark.parametrize(("term", "name"), UNFIT, ids=[f"{term}-{name}" for term, name in UNFIT])
def test_unfit_character_raises(term: str, name: str) -> None:
    ds = header(PatientName=name)
    with pytest.raises(PreparationError, match="cannot hold"):
        encode_text(ds, term)


@pytest.mark.parametrize(("term", "name", "expected"), GOLDEN + SINGLE_BYTE)
def test_read_back_without_question_mark(term: str, name: str, expected: bytes) -> None:
    ds = header(PatientName=name)
    encode_text(ds, term)
    # pydicom 3.0.2 keeps the ISO 2022 IR 58 escape in decoded text.
    name_read = str(read_back(written(ds)).PatientName).replace("\x1b$)A", "")
    assert "?" not in name_read
    assert name_read == name.rstrip("=")


def test_ascii_only_target_accepts_ascii() -> None:
    ds = header(PatientName="Doe^John")
    encode_text(ds, "ISO_IR 6")
    assert value_bytes(written(ds)) == b"Doe^John"


# --- ISO 2022 rules beyond the annex examples -----------------------------------


def test_korean_designated_after_line_break() -> None:
    ds = header(AdditionalPatientHistory="홍 abc\r\n길동")
    encode_text(ds, "\\ISO 2022 IR 149")
    value = value_bytes(written(ds), b"\x10\x00\xb0\x21LT")
    assert value == b"\x1b$)C\xc8\xab abc\r\n\x1b$)C\xb1\xe6\xb5\xbf"


def test_kanji_mixed_with_ascii() -> None:
    ds = header(StudyDescription="山田 Taro")
    encode_text(ds, "\\ISO 2022 IR 87")
    assert value_bytes(written(ds), b"\x08\x00\x30\x10LO") == b"\x1b$B;3ED\x1b(B Taro"


def test_iso_2022_latin1_extension() -> None:
    ds = header(PatientName="Müller^山田")
    encode_text(ds, "ISO 2022 IR 100\\ISO 2022 IR 87")
    assert value_bytes(written(ds)) == b"M\xfcller^\x1b$B;3ED\x1b(B"


def test_multi_valued_lo_resets_per_value() -> None:
    ds = header(OtherPatientIDs=["홍", "길동"])
    encode_text(ds, "\\ISO 2022 IR 149")
    value = value_bytes(written(ds), b"\x10\x00\x00\x10LO")
    assert value == b"\x1b$)C\xc8\xab\\\x1b$)C\xb1\xe6\xb5\xbf"


# --- Default repertoire, decoding failures, bad terms --------------------------


def test_non_ascii_code_string_raises() -> None:
    ds = header(PatientName="Doe", BodyPartExamined="ABDÖMEN")
    with pytest.raises(PreparationError) as caught:
        encode_text(ds, "ISO_IR 192")
    assert "BodyPartExamined (0018,0015) (VR CS)" in caught.value.reason
    assert "U+00D6" in caught.value.reason
    assert "ABD" not in caught.value.reason


def test_undecodable_source_raises() -> None:
    ds = header("ISO_IR 192")
    ds.add_new(0x00100010, "PN", b"Doe^\xff\xfe")
    with pytest.raises(PreparationError, match="cannot be decoded"):
        encode_text(ds, "ISO_IR 192")


def test_undeclared_non_ascii_flagged() -> None:
    ds = header(None)
    ds.add_new(0x00100010, "PN", "Zoë".encode("latin_1"))
    report = encode_text(ds, "ISO_IR 192")
    assert report.source == ""
    assert report.flags == [
        "SpecificCharacterSet is absent but text is not ASCII: text was decoded as ISO_IR 100 (Latin-1)"
    ]
    assert value_bytes(written(ds)) == "Zoë".encode()


def test_undefined_term_raises() -> None:
    with pytest.raises(PreparationError, match="not a defined term"):
        encode_text(header(PatientName="Doe"), "UTF-8")


# --- DCMTK reads what pydicom wrote ---------------------------------------------

DCMTK_CASES = [
    ("\\ISO 2022 IR 149", "Hong^Gildong=洪^吉洞=홍^길동"),
    ("\\ISO 2022 IR 58", "Zhang^XiaoDong=张^小东"),
    ("GB18030", "Wang^XiaoDong=王^小东"),
    ("GBK", "Wang^XiaoDong=王^小东"),
    ("ISO_IR 126", "Διονυσιος"),
    ("ISO_IR 144", "Иванов^Пётр"),
    ("ISO_IR 166", "สมชาย"),
]


@pytest.mark.parametrize(("term", "name"), DCMTK_CASES, ids=[term for term, _ in DCMTK_CASES])
def test_dcmdump_shows_characters(tmp_path: Path, term: str, name: str) -> None:
    # NOTE: the Japanese sets are not here because DCMTK built with the GNU C
    # library's iconv rejects ISO 2022 IR 87 ("not supported by the utilized
    # character set conversion library").
    dcmdump = require_tool("dcmdump")
    ds = header(PatientName=name)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    encode_text(ds, term)
    path = tmp_path / "name.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        [dcmdump, "+U8", "+P", "PatientName", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert f"[{name}]" in result.stdout
    assert "E:" not in result.stderr
