"""Tests for derived UIDs, frame-by-frame reading and write_prepared (pydicom as decoder).

The DCMTK cross-checks (dcmdjpeg as independent decoder, dciodvfy) are in
test_prepare_jpeg_dcmtk.py, which imports the synthetic loop helpers from here.
"""

from __future__ import annotations

import re
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

from pacsbridge.ingest.testimages import doppler_like_loop
from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.frames import (
    iter_encapsulated_frames,
    iter_frames,
    iter_native_frames,
    open_pixel_source,
)
from pacsbridge.prepare.jpeg import read_frame_header
from pacsbridge.prepare.pixels import PixelTarget, append_lossy_step, write_prepared
from pacsbridge.prepare.uids import derived_uid

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def ultrasound_loop(frames: int, rows: int, columns: int, seed: int = 7) -> np.ndarray:
    return doppler_like_loop(frames, rows, columns, seed)


def ultrasound_dataset(pixels: np.ndarray, syntax=ExplicitVRLittleEndian) -> Dataset:
    """Return an Ultrasound Multi-frame Image dataset (native pixel data) holding `pixels`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1399.1.1"
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1399.1.1"
    ds.Modality = "US"
    ds.Rows, ds.Columns = pixels.shape[1:3]
    ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = pixels.shape[3] if pixels.ndim == 4 else 1
    ds.PhotometricInterpretation = "RGB" if ds.SamplesPerPixel == 3 else "MONOCHROME2"
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsAllocated - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_loop(path: Path, pixels: np.ndarray) -> Path:
    ultrasound_dataset(pixels).save_as(path, enforce_file_format=True)
    return path


def header_of(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def read_pixels(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path).pixel_array


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    error = np.mean((reference.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def encapsulated_items(path: Path) -> list[bytes]:
    """Return the raw item values (Basic Offset Table first) of the file's encapsulated Pixel Data."""
    source = open_pixel_source(path)
    data = path.read_bytes()
    position = source.value_offset
    items = []
    while True:
        group, element, length = struct.unpack("<HHI", data[position : position + 8])
        if (group, element) == (0xFFFE, 0xE0DD):
            return items
        items.append(data[position + 8 : position + 8 + length])
        position += 8 + length


@pytest.fixture(scope="module")
def small_loop() -> np.ndarray:
    return ultrasound_loop(frames=6, rows=120, columns=160)


# derived_uid


def test_derived_uid_is_deterministic():
    assert derived_uid("1.2.3.4", "monochrome") == derived_uid("1.2.3.4", "monochrome")


def test_derived_uid_depends_on_both_inputs():
    uids = {
        derived_uid("1.2.3.4", "monochrome"),
        derived_uid("1.2.3.4", "jpeg-baseline q90"),
        derived_uid("1.2.3.5", "monochrome"),
        derived_uid("1.2.3", "4\nmonochrome"),
    }
    assert len(uids) == 4


def test_derived_uid_is_valid_ui():
    long_source = "1." + "2" * 70  # over 64 characters, as some devices write
    for uid in (derived_uid("1.2.3.4", "monochrome"), derived_uid(long_source, "uid-too-long")):
        assert uid.startswith("2.25.")
        assert len(uid) <= 64
        assert UID_PATTERN.match(uid)
        assert int(uid.removeprefix("2.25.")) < 2**128


def test_derived_uid_rejects_empty_inputs():
    with pytest.raises(ValueError, match="source_uid"):
        derived_uid("", "monochrome")
    with pytest.raises(ValueError, match="conversion"):
        derived_uid("1.2.3", "")


# Frame reading


def test_iter_frames_converts_colour_to_rgb():
    uncompressed = next(iter_frames(SAMPLES / "US1_UNCR.dcm"))
    assert np.array_equal(next(iter_frames(SAMPLES / "US1_RLE.dcm")), uncompressed)
    assert np.array_equal(next(iter_frames(SAMPLES / "US1_J2KR.dcm")), uncompressed)
    ybr = next(iter_frames(SAMPLES / "YBR_FULL-RLE.dcm"))
    assert ybr.shape == (480, 640, 3)
    subsampled = next(iter_frames(SAMPLES / "YBR_422.dcm"))
    assert subsampled.shape == (555, 800, 3)


def test_iter_frames_reads_big_endian():
    frame = next(iter_frames(SAMPLES / "ExplVR_BigEnd.dcm"))
    assert np.array_equal(frame, read_pixels(SAMPLES / "ExplVR_BigEnd.dcm"))


def test_iter_frames_keeps_palette_indices():
    frames = list(iter_frames(SAMPLES / "US-PAL-8-10x-echo.dcm"))
    assert len(frames) == 10
    assert frames[0].shape == (430, 600)
    assert np.array_equal(np.stack(frames), read_pixels(SAMPLES / "US-PAL-8-10x-echo.dcm"))


def test_iter_frames_rejects_truncated_pixel_data():
    with pytest.raises(PreparationError, match="needed for Number of Frames"):
        list(iter_frames(SAMPLES / "MR_truncated.dcm"))


def test_iter_frames_memory_is_about_one_frame(tmp_path, small_loop):
    frame = ultrasound_loop(frames=1, rows=128, columns=128)[0]
    pixels = np.repeat(frame[None], 200, axis=0)
    path = write_loop(tmp_path / "loop.dcm", pixels)
    del pixels

    tracemalloc.start()
    count = 0
    for decoded in iter_frames(path):
        count += int(decoded.shape == frame.shape)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 200
    assert peak < 6 * frame.nbytes  # the whole Pixel Data is 200 frames


def test_iter_native_frames_returns_stored_bytes(tmp_path, small_loop):
    path = write_loop(tmp_path / "loop.dcm", small_loop)
    frames = list(iter_native_frames(path))
    assert len(frames) == 6
    assert frames[2] == small_loop[2].tobytes()


def test_iter_encapsulated_frames_returns_codestreams(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    output = tmp_path / "lossless.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1))
    codestreams = list(iter_encapsulated_frames(output))
    assert len(codestreams) == 6
    assert all(codestream[:2] == b"\xff\xd8" for codestream in codestreams)


# write_prepared: uncompressed


def test_uncompressed_from_rle_matches_source(tmp_path):
    output = tmp_path / "out.dcm"
    report = write_prepared(
        SAMPLES / "US1_RLE.dcm", output, header_of(SAMPLES / "US1_RLE.dcm"), PixelTarget(ExplicitVRLittleEndian)
    )
    ds = pydicom.dcmread(output)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.PlanarConfiguration == 0
    assert report.photometric == "RGB"
    assert np.array_equal(ds.pixel_array, read_pixels(SAMPLES / "US1_UNCR.dcm"))


def test_uncompressed_converts_ybr_to_rgb(tmp_path):
    output = tmp_path / "out.dcm"
    write_prepared(
        SAMPLES / "YBR_FULL-RLE.dcm",
        output,
        header_of(SAMPLES / "YBR_FULL-RLE.dcm"),
        PixelTarget(ExplicitVRLittleEndian),
    )
    ds = pydicom.dcmread(output)
    assert ds.PhotometricInterpretation == "RGB"
    assert np.array_equal(ds.pixel_array, next(iter_frames(SAMPLES / "YBR_FULL-RLE.dcm")))


def test_uncompressed_pads_odd_length(tmp_path):
    pixels = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)  # 105 bytes
    source = write_loop(tmp_path / "odd.dcm", pixels)
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(ExplicitVRLittleEndian))
    ds = pydicom.dcmread(output)
    assert len(ds.PixelData) == 106
    assert np.array_equal(ds.pixel_array, pixels)


def test_lossy_source_stays_marked_lossy(tmp_path):
    source = SAMPLES / "orthanc-Issue16.dcm"
    output = tmp_path / "out.dcm"
    header = header_of(source)
    report = write_prepared(source, output, header, PixelTarget(ExplicitVRLittleEndian))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert ds.LossyImageCompression == "01"
    assert report.frames == 34
    assert ds.NumberOfFrames == 34


# write_prepared: JPEG Lossless


@pytest.mark.parametrize(
    "name",
    ["US1_UNCR.dcm", "US-PAL-8-10x-echo.dcm", "gdcm-US-ALOKA-16.dcm", "ExplVR_BigEnd.dcm", "OBXXXX1A_2frame.dcm"],
)
def test_lossless_decodes_identical(tmp_path, name):
    source = SAMPLES / name
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == header_of(source).PhotometricInterpretation
    assert report.lossy_ratio is None
    assert "LossyImageCompressionRatio" not in ds
    assert np.array_equal(read_pixels(output), read_pixels(source))


def test_lossless_turns_ybr_full_into_rgb(tmp_path):
    """YBR_FULL becomes RGB: encapsulated data has Planar Configuration 0, which US YBR_FULL may not have."""
    source = SAMPLES / "YBR_FULL-RLE.dcm"
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1))
    assert pydicom.dcmread(output, stop_before_pixels=True).PhotometricInterpretation == "RGB"
    ours = pydicom.pixels.pixel_array(output)
    theirs = pydicom.pixels.pixel_array(source)  # pydicom converts YBR_FULL to RGB
    assert np.array_equal(ours, theirs)


def test_lossless_loop_structure(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1), workers=3)
    items = encapsulated_items(output)
    assert report.frames == 6
    assert len(items) == 7  # Basic Offset Table + one fragment per frame
    assert all(len(item) % 2 == 0 for item in items)
    assert read_frame_header(items[1]).marker == 0xC3
    assert np.array_equal(read_pixels(output), small_loop)


def test_lossless_rejects_lossy_source(tmp_path):
    output = tmp_path / "out.dcm"
    source = SAMPLES / "orthanc-Issue16.dcm"
    with pytest.raises(PreparationError, match="already lossy"):
        write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1))
    assert not output.exists()


# write_prepared: JPEG Baseline


def test_baseline_loop_attributes(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert ds.PlanarConfiguration == 0
    assert ds.NumberOfFrames == 6
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(ds.LossyImageCompressionRatio) == pytest.approx(report.lossy_ratio, abs=0.01)
    assert report.lossy_ratio > 2
    assert report.derived


def test_baseline_items_and_offset_table(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    table, *fragments = encapsulated_items(output)
    assert len(fragments) == 6
    assert all(len(fragment) % 2 == 0 for fragment in fragments)
    offsets = struct.unpack("<6I", table)
    expected = [sum(8 + len(fragment) for fragment in fragments[:index]) for index in range(6)]
    assert list(offsets) == expected
    for fragment in fragments:
        header = read_frame_header(fragment)
        assert header.marker == 0xC0
        assert [(c.horizontal, c.vertical) for c in header.components] == [(2, 1), (1, 1), (1, 1)]
        assert fragment.rstrip(b"\x00").endswith(b"\xff\xd9")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Return the Y of YCbCr (ITU-R BT.601 weights) of RGB samples, as float."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# 4:2:2 halves the horizontal chroma resolution by design, so sharp colour overlay edges
# lose detail at any quality (US1 peaks near 36.7 dB RGB PSNR at quality 100). Colour
# content is therefore held to 40 dB on luminance, and grey content to 40 dB on RGB.


def test_baseline_psnr_loop(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    decoded = read_pixels(output)
    for index in range(6):
        assert psnr(luminance(small_loop[index]), luminance(decoded[index])) >= 40


def test_baseline_psnr_grey_loop(tmp_path, small_loop):
    grey = np.repeat(small_loop[..., :1], 3, axis=3)
    source = write_loop(tmp_path / "grey.dcm", grey)
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    decoded = read_pixels(output)
    for index in range(6):
        assert psnr(grey[index], decoded[index]) >= 40


def test_baseline_psnr_us1(tmp_path):
    source = SAMPLES / "US1_UNCR.dcm"
    reference = read_pixels(source)
    output = tmp_path / "out.dcm"
    write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    assert psnr(luminance(reference), luminance(read_pixels(output))) >= 40


def test_baseline_444_is_ybr_full(tmp_path):
    source = SAMPLES / "US1_UNCR.dcm"
    output = tmp_path / "out.dcm"
    target = PixelTarget(JPEGBaseline8Bit, chroma_subsampling="4:4:4")
    report = write_prepared(source, output, header_of(source), target)
    assert report.photometric == "YBR_FULL"
    assert pydicom.dcmread(output, stop_before_pixels=True).PhotometricInterpretation == "YBR_FULL"
    assert psnr(read_pixels(source), read_pixels(output)) >= 40


def test_baseline_expands_palette(tmp_path):
    source = SAMPLES / "US-PAL-8-10x-echo.dcm"
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert report.palette_expanded
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert ds.SamplesPerPixel == 3
    assert "RedPaletteColorLookupTableData" not in ds
    assert "RedPaletteColorLookupTableDescriptor" not in ds
    expanded = pydicom.pixels.apply_color_lut(read_pixels(source), header_of(source)) >> 8  # 16-bit palette
    decoded = read_pixels(output)
    assert psnr(luminance(expanded[0]), luminance(decoded[0])) >= 40


def test_baseline_grey_is_monochrome2(tmp_path):
    source = SAMPLES / "JPEGLosslessP14SV1_1s_1f_u_08_08.dcm"
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit, quality=95))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert report.photometric == "MONOCHROME2"
    assert ds.SamplesPerPixel == 1
    assert "PlanarConfiguration" not in ds


def test_baseline_rejects_16_bit(tmp_path):
    source = SAMPLES / "emri_small_jpeg_2k_lossless_too_short.dcm"
    with pytest.raises(PreparationError, match="8-bit"):
        write_prepared(source, tmp_path / "out.dcm", header_of(source), PixelTarget(JPEGBaseline8Bit))


def test_baseline_rejects_second_lossy_step(tmp_path):
    source = SAMPLES / "US_Philips_3EAF5680_8b_YBR_jpeg.dcm"
    with pytest.raises(PreparationError, match="already lossy"):
        write_prepared(source, tmp_path / "out.dcm", header_of(source), PixelTarget(JPEGBaseline8Bit))


def test_baseline_rejects_invalid_quality(tmp_path):
    source = SAMPLES / "US1_UNCR.dcm"
    with pytest.raises(PreparationError, match="quality"):
        write_prepared(source, tmp_path / "out.dcm", header_of(source), PixelTarget(JPEGBaseline8Bit, quality=0))


def test_append_lossy_step_keeps_earlier_values():
    ds = Dataset()
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "12.5"
    ds.LossyImageCompressionMethod = "ISO_15444_1"
    append_lossy_step(ds, "8.25", "ISO_10918_1")
    assert ds.LossyImageCompression == "01"
    assert [str(value) for value in ds.LossyImageCompressionRatio] == ["12.5", "8.25"]
    assert list(ds.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]


def test_workers_do_not_change_output(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    outputs = []
    for workers in (1, 4):
        output = tmp_path / f"out-{workers}.dcm"
        write_prepared(source, output, header_of(source), PixelTarget(JPEGBaseline8Bit), workers=workers)
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]


def test_write_prepared_memory_is_bounded(tmp_path):
    frame = ultrasound_loop(frames=1, rows=128, columns=128)[0]
    source = write_loop(tmp_path / "loop.dcm", np.repeat(frame[None], 200, axis=0))
    header = header_of(source)
    output = tmp_path / "out.dcm"
    tracemalloc.start()
    write_prepared(source, output, header, PixelTarget(JPEGLosslessSV1), workers=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 12 * frame.nbytes  # the source Pixel Data is 200 frames


# write_prepared: monochrome, kept pixel data, errors


def test_monochrome_takes_first_channel(tmp_path, small_loop):
    grey = np.repeat(small_loop[..., :1], 3, axis=3)
    source = write_loop(tmp_path / "grey.dcm", grey)
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(JPEGLosslessSV1, monochrome=True))
    ds = pydicom.dcmread(output, stop_before_pixels=True)
    assert report.monochrome
    assert ds.SamplesPerPixel == 1
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert "PlanarConfiguration" not in ds
    assert np.array_equal(read_pixels(output), grey[..., 0])


def test_keep_pixel_data_copies_bytes(tmp_path):
    source = SAMPLES / "orthanc-Issue16.dcm"
    output = tmp_path / "out.dcm"
    report = write_prepared(
        source, output, header_of(source), PixelTarget(ExplicitVRLittleEndian, keep_pixel_data=True)
    )
    assert report.kept_pixel_data
    assert report.syntax == header_of(source).file_meta.TransferSyntaxUID
    assert pydicom.dcmread(output).PixelData == pydicom.dcmread(source).PixelData


def _odd_fragment_file(path: Path) -> tuple[Path, list[bytes]]:
    """Write an RLE-labelled file with two frames in odd-length fragments, each frame split in two."""
    # An even total, so that pydicom adds no padding byte of its own after the last item.
    fragments = [b"\x01" * 5, b"\x02" * 7, b"\x03" * 9, b"\x04" * 3]
    table = struct.pack("<2I", 0, (8 + 5) + (8 + 7))
    value = struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table
    for fragment in fragments:
        value += struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
    ds = ultrasound_dataset(np.zeros((2, 4, 4), dtype=np.uint8), syntax=RLELossless)
    ds.PixelData = value
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path, fragments


def test_keep_pixel_data_pads_odd_fragments(tmp_path):
    source, fragments = _odd_fragment_file(tmp_path / "odd.dcm")
    output = tmp_path / "out.dcm"
    report = write_prepared(source, output, header_of(source), PixelTarget(RLELossless, keep_pixel_data=True))
    table, *items = encapsulated_items(output)
    assert report.padded_items == 4
    assert items == [fragment + b"\x00" for fragment in fragments]
    assert struct.unpack("<2I", table) == (0, (8 + 6) + (8 + 8))


def test_fewer_frames_than_declared_fails(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    header = header_of(source)
    header.NumberOfFrames = 9
    output = tmp_path / "out.dcm"
    with pytest.raises(PreparationError, match="Number of Frames"):
        write_prepared(source, output, header, PixelTarget(JPEGBaseline8Bit))
    assert not output.exists()


def test_header_is_not_modified(tmp_path, small_loop):
    source = write_loop(tmp_path / "loop.dcm", small_loop)
    header = header_of(source)
    write_prepared(source, tmp_path / "out.dcm", header, PixelTarget(JPEGBaseline8Bit))
    assert header.PhotometricInterpretation == "RGB"
    assert "LossyImageCompression" not in header
    assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
