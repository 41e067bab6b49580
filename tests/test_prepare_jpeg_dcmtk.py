"""Cross-check write_prepared output with DCMTK (dcmdjpeg, dcmdump) and dicom3tools (dciodvfy).

dcmdjpeg decodes with DCMTK's own IJG-based codec, so these tests do not depend on the
libjpeg-turbo build that encoded the frames.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, require_tool
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1
from test_prepare_pixels import header_of, luminance, psnr, ultrasound_loop, write_loop

from pacsbridge.prepare.pixels import PixelTarget, write_prepared

pytestmark = pytest.mark.dcmtk


def dcmdjpeg(path: Path, output: Path, *options: str) -> np.ndarray:
    """Decode `path` with DCMTK's dcmdjpeg and return the stored pixels that pydicom reads from the result."""
    binary = require_tool("dcmdjpeg")
    result = subprocess.run(
        [binary, *options, str(path), str(output)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(output)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.pixels.pixel_array(output, raw=True)


def source_pixels(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.pixels.pixel_array(path, raw=True)


@pytest.fixture(scope="module")
def loop_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loop")
    return write_loop(folder / "loop.dcm", ultrasound_loop(frames=8, rows=240, columns=320))


@pytest.mark.parametrize(
    "name",
    [
        "US1_UNCR.dcm",
        "US-PAL-8-10x-echo.dcm",
        "gdcm-US-ALOKA-16.dcm",
        "YBR_FULL-RLE.dcm",
        "ExplVR_BigEnd.dcm",
        "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
    ],
)
def test_lossless_identical_in_dcmdjpeg(tmp_path, name):
    source = SAMPLES / name
    output = tmp_path / "lossless.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1))
    decoded = dcmdjpeg(output, tmp_path / "decoded.dcm")
    if name.startswith("YBR_FULL"):
        # YBR_FULL is written as RGB, so the reference is the source converted to RGB.
        assert np.array_equal(decoded, pydicom.pixels.pixel_array(source))
    else:
        assert np.array_equal(decoded, source_pixels(source))


def test_lossless_loop_identical_in_dcmdjpeg(tmp_path, loop_file):
    output = tmp_path / "lossless.dcm"
    write_prepared(loop_file, output, header_of(loop_file), PixelTarget(JPEGLosslessSV1))
    assert np.array_equal(dcmdjpeg(output, tmp_path / "decoded.dcm"), source_pixels(loop_file))


def test_baseline_psnr_in_dcmdjpeg(tmp_path, loop_file):
    output = tmp_path / "baseline.dcm"
    write_prepared(loop_file, output, header_of(loop_file), PixelTarget(JPEGBaseline8Bit))
    decoded = dcmdjpeg(output, tmp_path / "decoded.dcm")
    assert pydicom.dcmread(tmp_path / "decoded.dcm", stop_before_pixels=True).PhotometricInterpretation == "RGB"
    reference = source_pixels(loop_file)
    grey = reference[..., 0]
    for index in range(len(reference)):
        assert psnr(luminance(reference[index]), luminance(decoded[index])) >= 40
        # Grey content has no chroma to subsample, so its RGB PSNR must reach 40 dB too.
        is_grey = (reference[index, ..., 1] == grey[index]) & (reference[index, ..., 2] == grey[index])
        assert psnr(reference[index][is_grey], decoded[index][is_grey]) >= 40


def test_baseline_us1_psnr_in_dcmdjpeg(tmp_path):
    source = SAMPLES / "US1_UNCR.dcm"
    output = tmp_path / "baseline.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    decoded = dcmdjpeg(output, tmp_path / "decoded.dcm")
    assert psnr(luminance(source_pixels(source)), luminance(decoded)) >= 40


def test_dcmdump_reads_every_target(tmp_path, loop_file):
    binary = require_tool("dcmdump")
    for name, target in {
        "baseline": PixelTarget(JPEGBaseline8Bit),
        "lossless": PixelTarget(JPEGLosslessSV1),
        "uncompressed": PixelTarget(ExplicitVRLittleEndian),
    }.items():
        output = tmp_path / f"{name}.dcm"
        write_prepared(loop_file, output, header_of(loop_file), target)
        result = subprocess.run([binary, "-q", str(output)], check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "E:" not in result.stderr


def dciodvfy_errors(path: Path) -> set[str]:
    binary = require_tool("dciodvfy")
    result = subprocess.run([binary, str(path)], check=False, capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {line for line in lines if line.startswith("Error")}


@pytest.mark.dicom3tools
@pytest.mark.parametrize(
    "target",
    [
        PixelTarget(JPEGBaseline8Bit),
        PixelTarget(JPEGLosslessSV1),
        PixelTarget(ExplicitVRLittleEndian),
    ],
    ids=["baseline", "lossless", "uncompressed"],
)
def test_dciodvfy_adds_no_errors(tmp_path, target):
    study = tmp_path / "study"
    result = subprocess.run(
        [str(Path(__file__).parents[1] / ".venv/bin/pacsbridge"), "test-images", str(study)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    sources = sorted(study.glob("*.dcm"))
    assert len(sources) == 3
    for source in [*sources, SAMPLES / "US1_UNCR.dcm", SAMPLES / "US-PAL-8-10x-echo.dcm"]:
        output = tmp_path / f"out-{source.name}"
        write_prepared(source, output, header_of(source), target)
        assert dciodvfy_errors(output) <= dciodvfy_errors(source), source.name
