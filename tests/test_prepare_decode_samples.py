"""Decode every sample with pixel data using the installed permissive codec plugins.

The plugins are python-gdcm (JPEG family, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000)
and pylibjpeg-rle or pydicom (RLE). A few decodes are cross-checked against DCMTK.
"""

from __future__ import annotations

import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, ULTRASOUND_SAMPLES, require_tool
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import iter_pixels

from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.repair import pixel_data_facts, repair_file

DECODABLE = [
    *ULTRASOUND_SAMPLES,
    "GH364.dcm",
    "YBR_422.dcm",
    "chrGB2312.dcm",
    "chrGreek.dcm",
    "chrH31.dcm",
    "chrI2.dcm",
    "chrRuss.dcm",
    "chrX1.dcm",
    "chrX2.dcm",
    # The last 8 bytes (the Sequence Delimitation Item) are cut off, but every
    # fragment is whole: iter_pixels decodes it, while dcmread returns no elements.
    "emri_small_jpeg_2k_lossless_too_short.dcm",
]


def read_header(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def decode(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack(list(iter_pixels(path)))


@pytest.mark.parametrize("name", DECODABLE)
def test_sample_decodes(name: str) -> None:
    header = read_header(SAMPLES / name)
    frames = decode(SAMPLES / name)

    assert frames.shape[0] == int(header.get("NumberOfFrames") or 1)
    assert frames.shape[1:3] == (header.Rows, header.Columns)
    if header.SamplesPerPixel == 3:
        assert frames.shape[3] == 3
    else:
        assert frames.ndim == 3
    assert frames.dtype == (np.uint8 if header.BitsAllocated == 8 else np.uint16)
    assert frames.max() > frames.min()


def dcmtk_decoded(tool: str, source: Path, target: Path, *options: str) -> np.ndarray:
    subprocess.run(
        [require_tool(tool), *options, str(source), str(target)],
        check=True,
        capture_output=True,
    )
    return decode(target)


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("name", "tool", "options", "max_difference"),
    [
        # Lossy JPEG: the DCMTK 3.6 and GDCM 3.2 decodes of these files differ by up
        # to one level, because the two round the colour conversion differently.
        ("US_Philips_3EAF5680_8b_YBR_jpeg.dcm", "dcmdjpeg", (), 1),
        ("orthanc-Issue16.dcm", "dcmdjpeg", (), 1),
        ("JPEGExtended_3s_1f_u_08_08.dcm", "dcmdjpeg", (), 1),
        ("JPEGLosslessP14SV1_3s_2f_u_08_08.dcm", "dcmdjpeg", (), 0),
        ("JPEGLosslessP14SV1_1s_1f_u_08_08.dcm", "dcmdjpeg", (), 0),
        ("US1_RLE.dcm", "dcmdrle", (), 0),
        ("YBR_FULL-RLE.dcm", "dcmdrle", (), 0),
        ("US-PAL-8-10x-echo.dcm", "dcmdrle", (), 0),
        ("ExplVR_BigEnd.dcm", "dcmconv", ("+te",), 0),
    ],
)
def test_decode_matches_dcmtk(
    tmp_path: Path, name: str, tool: str, options: tuple[str, ...], max_difference: int
) -> None:
    ours = decode(SAMPLES / name).astype(np.int32)
    theirs = dcmtk_decoded(tool, SAMPLES / name, tmp_path / "dcmtk.dcm", *options).astype(np.int32)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= max_difference


@pytest.mark.dcmtk
def test_jpeg_ls_matches_dcmtk_after_repair(tmp_path: Path) -> None:
    # DCMTK cannot read GH364 as it is: a stray Item sits at the top level and the
    # fragment has odd length. After the repairs (item removed, fragment padded) it can.
    header, _, result = repair_file(SAMPLES / "GH364.dcm")
    assert "stray Item (FFFE,E000) removed from the top level" in result.repairs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(SAMPLES / "GH364.dcm")
    fragments = list(generate_frames(source.PixelData, number_of_frames=1))
    header.PixelData = encapsulate(fragments)
    header["PixelData"].VR = "OB"
    repaired = tmp_path / "repaired.dcm"
    header.save_as(repaired)

    theirs = dcmtk_decoded("dcmdjpls", repaired, tmp_path / "dcmtk.dcm")
    assert np.array_equal(decode(SAMPLES / "GH364.dcm"), theirs)


def test_j2k_with_invalid_size_header_fails() -> None:
    """The SIZ segment was altered to hold delimiter bytes, so GDCM and OpenJPEG reject it."""
    path = SAMPLES / "JPEG2000-embedded-sequence-delimiter.dcm"
    header = read_header(path)
    facts = pixel_data_facts(path)
    with open(path, "rb") as stream:
        stream.seek(facts.fragment_offsets[0])
        codestream = stream.read(facts.fragment_lengths[0])

    # SOC, then SIZ: marker, length, Rsiz, Xsiz, Ysiz (big endian).
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    width, height = struct.unpack(">II", codestream[8:16])
    assert (width, height) != (header.Columns, header.Rows)
    with pytest.raises(RuntimeError, match="Unable to decode"):
        decode(path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "no complete frame"),
        ("badVR.dcm", "Number of Frames"),
        ("3gb-bulk-data-truncated.dcm", "Rows"),
        ("no_meta.dcm", "cannot be read as DICOM"),
        (
            "GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",
            "cannot be read as DICOM",
        ),
    ],
)
def test_undecodable_sample_has_reason(name: str, reason: str) -> None:
    with pytest.raises(PreparationError, match=reason):
        repair_file(SAMPLES / name)
