"""Tests of the grey check and the MONOCHROME2 conversion on JPEG-coded and sample frames."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, require_tool
from pydicom.encaps import encapsulate
from pydicom.pixels import iter_pixels
from pydicom.uid import JPEGBaseline8Bit

from pacsbridge.prepare.monochrome import (
    frame_is_grey,
    grey_tolerance,
    monochrome_attributes,
    palette_is_grey,
    source_is_grey,
    to_monochrome,
)

# Colour ultrasound samples: every one shows Doppler, a colour bar, coloured icons or
# coloured text, so none may become monochrome.
COLOUR_SAMPLES = [
    "ExplVR_BigEnd.dcm",
    "JPEGExtended_3s_1f_u_08_08.dcm",
    "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
    "US-RGB-8-esopecho.dcm",
    "US1_J2KR.dcm",
    "US1_RLE.dcm",
    "US1_UNCR.dcm",
    "US_Philips_3EAF5680_8b_YBR_jpeg.dcm",
    "YBR_422.dcm",
    "YBR_FULL-RLE.dcm",
    "color-px.dcm",
    "orthanc-Issue16.dcm",
]
PALETTE_SAMPLES = [
    "OBXXXX1A.dcm",
    "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "US-PAL-8-10x-echo.dcm",
    "gdcm-US-ALOKA-16.dcm",
]


def read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(SAMPLES / name)


@pytest.fixture(scope="module")
def grey_rgb() -> np.ndarray:
    """A grey 480x640 ultrasound frame (a real MONOCHROME2 sample) as RGB."""
    grey = read("JPEGLosslessP14SV1_1s_1f_u_08_08.dcm").pixel_array[:480, :640]
    return np.repeat(grey[..., None], 3, axis=-1)


def jpeg_round_trip(frame: np.ndarray, quality: int, subsampling: str) -> np.ndarray:
    encoded = imagecodecs.jpeg8_encode(frame, level=quality, subsampling=subsampling)
    return imagecodecs.jpeg8_decode(encoded)


def ecg_trace(frame: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Draw a 1-pixel wide sine trace, as an ECG line, near the bottom of a copy."""
    marked = frame.copy()
    columns = np.arange(100, 600)
    rows = (440 + 10 * np.sin(columns / 7)).astype(int)
    marked[rows, columns] = colour
    return marked


@pytest.mark.parametrize("subsampling", ["444", "422", "420"])
@pytest.mark.parametrize("quality", [75, 85, 95])
def test_grey_after_jpeg_is_grey(grey_rgb: np.ndarray, quality: int, subsampling: str) -> None:
    decoded = jpeg_round_trip(grey_rgb, quality, subsampling)
    assert frame_is_grey(decoded, "RGB")


@pytest.mark.parametrize("subsampling", ["444", "422"])
@pytest.mark.parametrize("quality", [75, 95])
def test_noisy_grey_after_jpeg_is_grey(grey_rgb: np.ndarray, quality: int, subsampling: str) -> None:
    # Up to 3 levels of independent noise per channel, as an analogue video capture adds.
    noise = np.random.default_rng(5).integers(-3, 4, size=grey_rgb.shape)
    noisy = np.clip(grey_rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    decoded = jpeg_round_trip(noisy, quality, subsampling)
    spread = decoded.max(axis=-1).astype(int) - decoded.min(axis=-1)
    assert spread.max() <= grey_tolerance() // 2
    assert frame_is_grey(decoded, "RGB")


def colour_marks(grey: np.ndarray) -> dict[str, np.ndarray]:
    yellow_text = grey.copy()
    yellow_text[20:28, 300:320] = (255, 255, 0)
    red_line = grey.copy()
    red_line[100:104, 200] = (255, 0, 0)
    return {
        "yellow 20x8 mark": yellow_text,
        "green ECG trace": ecg_trace(grey, (0, 255, 0)),
        "dim green ECG trace": ecg_trace(grey, (0, 128, 0)),
        "pale green ECG trace": ecg_trace(grey, (60, 180, 60)),
        "red 1x4 line": red_line,
    }


@pytest.mark.parametrize("subsampling", ["444", "422", "420"])
@pytest.mark.parametrize("quality", [75, 95])
def test_colour_marks_after_jpeg_stay_colour(grey_rgb: np.ndarray, quality: int, subsampling: str) -> None:
    for name, marked in colour_marks(grey_rgb).items():
        decoded = jpeg_round_trip(marked, quality, subsampling)
        assert not frame_is_grey(decoded, "RGB"), name


@pytest.mark.parametrize("name", COLOUR_SAMPLES)
def test_colour_samples_stay_colour(name: str) -> None:
    frames = iter_pixels(SAMPLES / name)
    assert not source_is_grey(frames, "RGB")


@pytest.mark.parametrize("name", PALETTE_SAMPLES)
def test_palette_samples_are_colour(name: str) -> None:
    assert not palette_is_grey(read(name))


def test_grey_palette_is_grey() -> None:
    ds = read("OBXXXX1A.dcm")
    ramp = (np.arange(256, dtype=np.uint16) * 257).tobytes()
    ds.RedPaletteColorLookupTableData = ramp
    ds.GreenPaletteColorLookupTableData = ramp
    ds.BluePaletteColorLookupTableData = ramp
    assert palette_is_grey(ds)


def grey_jpeg_dataset(grey_rgb: np.ndarray) -> pydicom.Dataset:
    """Make an Ultrasound Image of grey content in JPEG Baseline YBR_FULL_422."""
    ds = read("US1_UNCR.dcm")
    encoded = imagecodecs.jpeg8_encode(grey_rgb, level=90, subsampling="422")
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    return ds


def test_grey_jpeg_decoded_by_pydicom_is_grey(grey_rgb: np.ndarray) -> None:
    ds = grey_jpeg_dataset(grey_rgb)
    assert frame_is_grey(ds.pixel_array, "RGB")


def test_grey_jpeg_checked_as_ybr(grey_rgb: np.ndarray) -> None:
    ds = grey_jpeg_dataset(grey_rgb)
    ybr = pydicom.pixels.pixel_array(ds, as_rgb=False)
    assert frame_is_grey(ybr, "YBR_FULL_422")
    # Y of the lossy frame equals every channel of the same frame decoded to RGB.
    assert np.array_equal(to_monochrome(ybr, "YBR_FULL_422"), ds.pixel_array[..., 0])


def test_colour_sample_checked_as_ybr() -> None:
    ds = read("US_Philips_3EAF5680_8b_YBR_jpeg.dcm")
    ybr = pydicom.pixels.pixel_array(ds, as_rgb=False)
    assert not frame_is_grey(ybr, "YBR_FULL_422")


def test_monochrome_frame_is_grey() -> None:
    assert frame_is_grey(np.zeros((4, 4), np.uint8), "MONOCHROME2")


def test_palette_frame_rejected() -> None:
    with pytest.raises(ValueError, match="PALETTE COLOR"):
        frame_is_grey(np.zeros((4, 4), np.uint8), "PALETTE COLOR")


def test_wrong_shape_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(rows, cols, 3\)"):
        frame_is_grey(np.zeros((3, 4, 4), np.uint8), "RGB")


def test_uint16_tolerance_scales_with_bits() -> None:
    frame = np.full((8, 8, 3), 2000, np.uint16)
    frame[0, 0, 0] += 100
    assert not frame_is_grey(frame, "RGB")
    assert frame_is_grey(frame, "RGB", bits_stored=12)


def test_source_stops_at_first_colour_frame(grey_rgb: np.ndarray) -> None:
    consumed = []
    colour = colour_marks(grey_rgb)["yellow 20x8 mark"]

    def frames() -> Iterator[np.ndarray]:
        for index, frame in enumerate([grey_rgb, colour, grey_rgb, grey_rgb]):
            consumed.append(index)
            yield frame

    assert not source_is_grey(frames(), "RGB")
    assert consumed == [0, 1]


def test_source_all_grey_frames(grey_rgb: np.ndarray) -> None:
    assert source_is_grey([grey_rgb, grey_rgb], "RGB")


def test_source_without_frames_not_grey() -> None:
    assert not source_is_grey([], "RGB")


def test_to_monochrome_keeps_grey_values(grey_rgb: np.ndarray) -> None:
    mono = to_monochrome(grey_rgb)
    assert mono.shape == grey_rgb.shape[:2]
    assert mono.dtype == np.uint8
    assert np.array_equal(mono, grey_rgb[..., 0])


def test_to_monochrome_uint16() -> None:
    frame = np.full((2, 3, 3), 65535, np.uint16)
    mono = to_monochrome(frame)
    assert mono.dtype == np.uint16
    assert (mono == 65535).all()


def test_to_monochrome_luminance_weights() -> None:
    frame = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert to_monochrome(frame).tolist() == [[76, 150, 29]]


def test_attributes_of_rgb_ultrasound() -> None:
    ds = read("US1_UNCR.dcm")
    changes = monochrome_attributes(ds)
    assert ds.SamplesPerPixel == 1
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert "PlanarConfiguration" not in ds
    assert ds.UltrasoundColorDataPresent == 0
    assert "Planar Configuration removed" in changes


def test_attributes_of_palette_image() -> None:
    ds = read("OBXXXX1A.dcm")
    monochrome_attributes(ds)
    assert "RedPaletteColorLookupTableDescriptor" not in ds
    assert "BluePaletteColorLookupTableData" not in ds
    assert ds.UltrasoundColorDataPresent == 0
    assert ds.PhotometricInterpretation == "MONOCHROME2"


def test_attributes_of_other_class_without_colour_flag() -> None:
    ds = read("chrRuss.dcm")
    monochrome_attributes(ds)
    assert "UltrasoundColorDataPresent" not in ds


def dciodvfy_errors(path: Path) -> set[str]:
    output = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = (output.stdout + output.stderr).splitlines()
    return {line for line in lines if line.startswith("Error")}


@pytest.mark.dicom3tools
def test_converted_ultrasound_adds_no_errors(tmp_path: Path, grey_rgb: np.ndarray) -> None:
    source = read("US1_UNCR.dcm")
    source.PixelData = grey_rgb.tobytes()
    source_path = tmp_path / "grey-rgb.dcm"
    source.save_as(source_path)

    converted = read("US1_UNCR.dcm")
    monochrome_attributes(converted)
    converted.PixelData = to_monochrome(grey_rgb).tobytes()
    converted_path = tmp_path / "monochrome.dcm"
    converted.save_as(converted_path)

    assert np.array_equal(pydicom.dcmread(converted_path).pixel_array, grey_rgb[..., 0])
    assert dciodvfy_errors(converted_path) <= dciodvfy_errors(source_path)
