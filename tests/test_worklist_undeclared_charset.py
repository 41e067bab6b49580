"""Worklist responses that declare no Specific Character Set but carry non-ASCII text."""

import io

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

from pacsbridge.dicomnet.worklist import _apply_character_set, _response_terms


def undeclared_answer(name: str, character_set) -> Dataset:
    """Encode `name` in `character_set`, then drop (0008,0005) as some servers do."""
    ds = Dataset()
    ds.SpecificCharacterSet = character_set
    ds.PatientName = name
    ds.PatientID = "PID1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False)
    buffer.seek(0)
    answer = dcmread(buffer, force=True)
    del answer[(0x0008, 0x0005)]
    return answer


def decode(answer: Dataset) -> tuple[str, list[str]]:
    warnings: list[str] = []
    terms = _response_terms(answer, ["ISO_IR 100"], warnings)
    _apply_character_set(answer, terms)
    return str(answer.PatientName), warnings


@pytest.mark.parametrize(
    ("name", "character_set", "warning"),
    [
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["", "ISO 2022 IR 87"], "ISO 2022 escape sequences"),
        ("Wang^XiaoDong=王^小东", "ISO_IR 192", "valid UTF-8"),
    ],
)
def test_undeclared_text_decoded_and_warned(name, character_set, warning):
    decoded, warnings = decode(undeclared_answer(name, character_set))
    assert decoded == name
    assert len(warnings) == 1
    assert warning in warnings[0]
    assert "--keep-char-set" in warnings[0]


@pytest.mark.parametrize("name", ["Smith^John", "Müller^Zoë"])
def test_undeclared_fallback_text_needs_no_warning(name):
    decoded, warnings = decode(undeclared_answer(name, "ISO_IR 100"))
    assert decoded == name
    assert warnings == []
