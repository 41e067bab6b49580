"""Read the frames of a Part 10 file one at a time.

A loop can hold a gigabyte of pixel data, so nothing here loads the whole Pixel Data
element. The file is parsed up to Pixel Data, and frames are then read (and decoded)
from the open file one after the other, so peak memory is about one frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacsbridge.prepare.errors import PreparationError

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
# Value representations whose explicit VR element header has a 4-byte length after 2 reserved bytes.
LONG_LENGTH_VRS = {
    b"OB",
    b"OW",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"UN",
    b"SQ",
    b"UC",
    b"UR",
    b"UT",
}


@dataclass(frozen=True)
class PixelSource:
    """The Pixel Data element of a Part 10 file: where its value starts and how it is encoded."""

    path: Path
    dataset: Dataset  # every element before Pixel Data, with file_meta
    transfer_syntax: UID
    value_offset: int  # file offset of the first byte of the Pixel Data value
    value_length: int | None  # None for undefined length (encapsulated pixel data)
    vr: str | None  # None for Implicit VR Little Endian

    @property
    def is_encapsulated(self) -> bool:
        return self.value_length is None


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame and the Photometric Interpretation its samples are in."""

    pixels: np.ndarray  # (rows, columns) or (rows, columns, samples), Planar Configuration 0
    photometric: str


def open_pixel_source(path: Path) -> PixelSource:
    """Parse `path` up to Pixel Data and return where the Pixel Data value starts.

    Raises PreparationError if the file is not DICOM, has no Pixel Data or uses a
    transfer syntax whose pixel data cannot be read as a stream (Deflated).
    """
    try:
        with path.open("rb") as file:
            dataset = dcmread(file, stop_before_pixels=True)
            # pydicom 3.0 leaves the file at the tag of the element it stopped before.
            element_offset = file.tell()
            element_header = file.read(12)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise PreparationError(
            f"{path.name} cannot be read as a DICOM Part 10 file ({type(error).__name__}: {error})",
            "check that the file is a complete DICOM file",
        ) from error

    transfer_syntax = UID(dataset.file_meta.get("TransferSyntaxUID", ""))
    if not transfer_syntax:
        raise PreparationError(
            f"{path.name} has no Transfer Syntax UID (0002,0010) in its File Meta Information",
            "repair the file meta information before preparing the pixel data",
        )
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        raise PreparationError(
            f"{path.name} uses {transfer_syntax.name} ({transfer_syntax}), whose pixel data cannot be read frame by frame",
            "send it as received, or inflate it with 'dcmconv +te' first",
        )

    value_offset, value_length, vr = _parse_pixel_data_header(element_header, transfer_syntax, path)
    return PixelSource(
        path=path,
        dataset=dataset,
        transfer_syntax=transfer_syntax,
        value_offset=element_offset + value_offset,
        value_length=value_length,
        vr=vr,
    )


def _parse_pixel_data_header(header: bytes, transfer_syntax: UID, path: Path) -> tuple[int, int | None, str | None]:
    """Return (value offset within the element, value length or None if undefined, VR)."""
    byte_order = "<" if transfer_syntax.is_little_endian else ">"
    if len(header) < 8:
        raise PreparationError(
            f"{path.name} has no Pixel Data (7FE0,0010)",
            "send only instances that contain images",
        )

    group, element = struct.unpack(f"{byte_order}HH", header[:4])
    if (group << 16 | element) != PIXEL_DATA_TAG:
        raise PreparationError(
            f"{path.name} has no Pixel Data (7FE0,0010): the data set continues with ({group:04X},{element:04X})",
            "send only instances that contain images",
        )

    if transfer_syntax.is_implicit_VR:
        (length,) = struct.unpack(f"{byte_order}I", header[4:8])
        offset, vr = 8, None
    else:
        vr_bytes = header[4:6]
        if vr_bytes in LONG_LENGTH_VRS:
            (length,) = struct.unpack(f"{byte_order}I", header[8:12])
            offset = 12
        else:
            (length,) = struct.unpack(f"{byte_order}H", header[6:8])
            offset = 8
        vr = vr_bytes.decode("ascii", errors="replace")

    if length == UNDEFINED_LENGTH:
        if not transfer_syntax.is_encapsulated:
            raise PreparationError(
                f"{path.name} has Pixel Data of undefined length in {transfer_syntax.name}, which requires native pixel data",
                "repair the file: its transfer syntax does not match its pixel data",
            )
        return offset, None, vr
    if transfer_syntax.is_encapsulated:
        raise PreparationError(
            f"{path.name} has native Pixel Data of {length} bytes in {transfer_syntax.name}, which requires encapsulated pixel data",
            "repair the file: its transfer syntax does not match its pixel data",
        )
    return offset, length, vr


def frame_count(image: Dataset) -> int:
    """Return Number of Frames (0028,0008), or 1 if it is absent.

    Raises PreparationError if the value is not a positive integer.
    """
    if "NumberOfFrames" not in image or image["NumberOfFrames"].value in (None, ""):
        return 1
    try:
        count = int(image.NumberOfFrames)
    except (TypeError, ValueError) as error:
        raise PreparationError(
            "Number of Frames (0028,0008) is not an integer",
            "repair Number of Frames before preparing the pixel data",
        ) from error
    if count < 1:
        raise PreparationError(
            f"Number of Frames (0028,0008) is {count}",
            "repair Number of Frames before preparing the pixel data",
        )
    return count


def native_frame_length(image: Dataset) -> int:
    """Return the length in bytes of one native frame described by the Image Pixel attributes of `image`.

    Raises PreparationError for Bits Allocated 1, whose frames need not start on a byte boundary.
    """
    options = _pixel_options(image)
    bits_allocated = options["bits_allocated"]
    if bits_allocated % 8:
        raise PreparationError(
            f"Bits Allocated (0028,0100) is {bits_allocated}; frames are read only for multiples of 8",
            "send the instance as received",
        )
    samples = options["samples_per_pixel"]
    length = options["rows"] * options["columns"] * samples * bits_allocated // 8
    if samples == 3 and options["photometric_interpretation"] == "YBR_FULL_422":
        # Two pixels share one Cb and one Cr sample: 2 bytes per pixel instead of 3.
        length = length * 2 // 3
    return length


def _pixel_options(image: Dataset) -> dict:
    """Return the pydicom decoding options of `image` after checking that the required ones are present."""
    try:
        options = as_pixel_options(image)
    except (TypeError, ValueError) as error:
        raise PreparationError(
            f"an Image Pixel attribute has an invalid value ({error})",
            "repair the Image Pixel attributes",
        ) from error
    required = {
        "rows": "Rows (0028,0010)",
        "columns": "Columns (0028,0011)",
        "samples_per_pixel": "Samples per Pixel (0028,0002)",
        "bits_allocated": "Bits Allocated (0028,0100)",
        "bits_stored": "Bits Stored (0028,0101)",
        "photometric_interpretation": "Photometric Interpretation (0028,0004)",
        "pixel_representation": "Pixel Representation (0028,0103)",
    }
    for key, element in required.items():
        value = options.get(key)
        if value is None or value == "":
            raise PreparationError(f"{element} is missing or empty", "repair the Image Pixel attributes")
        if key != "photometric_interpretation" and not isinstance(value, int):
            raise PreparationError(
                f"{element} is not a single integer",
                "repair the Image Pixel attributes",
            )
    options["number_of_frames"] = frame_count(image)
    if options["samples_per_pixel"] > 1:
        options.setdefault("planar_configuration", 0)
    return options


def iter_decoded_frames(source: PixelSource, image: Dataset, *, raw: bool) -> Iterator[DecodedFrame]:
    """Decode the frames of `source` one at a time, as described by the Image Pixel attributes of `image`.

    `image` is usually the caller's header, which may carry repaired attributes (Number
    of Frames, Planar Configuration) that describe the stored pixel data better than the
    source file does. Exactly Number of Frames frames are yielded.

    With `raw` False, YBR_FULL and YBR_FULL_422 samples are converted to RGB. With `raw`
    True they are yielded as YBR_FULL, which keeps the stored values exactly (native
    YBR_FULL_422 is only upsampled). PALETTE COLOR is always yielded as indices.

    Raises PreparationError naming the transfer syntax if a frame cannot be decoded or
    the pixel data contains fewer frames than Number of Frames.
    """
    options = _pixel_options(image)
    expected = options["number_of_frames"]
    if source.value_length is not None:
        _check_native_length(source, image, expected)

    try:
        decoder = get_decoder(source.transfer_syntax)
    except NotImplementedError as error:
        raise PreparationError(
            f"no decoder for {source.transfer_syntax.name} ({source.transfer_syntax})",
            "send the instance as received to a PACS that accepts this transfer syntax",
        ) from error
    if not decoder.is_available:
        raise PreparationError(
            f"no decoder is installed for {source.transfer_syntax.name} ({source.transfer_syntax})",
            "install python-gdcm or pylibjpeg, or send the instance as received",
        )

    options.update(transfer_syntax_uid=source.transfer_syntax, pixel_keyword="PixelData")
    if source.vr is not None:
        options["pixel_vr"] = source.vr

    decoded = 0
    with source.path.open("rb") as file:
        file.seek(source.value_offset)
        frames = decoder.iter_array(file, raw=raw, **options)
        while decoded < expected:
            try:
                pixels, properties = next(frames)
            except StopIteration:
                break
            except Exception as error:  # decoder plugins raise any type
                raise PreparationError(
                    f"frame {decoded + 1} of {expected} cannot be decoded from {source.transfer_syntax.name} "
                    f"({source.transfer_syntax}): {type(error).__name__}: {error}",
                    "send the instance as received to a PACS that accepts this transfer syntax",
                ) from error
            decoded += 1
            yield DecodedFrame(pixels, str(properties.get("photometric_interpretation", "")))

    if decoded < expected:
        raise PreparationError(
            f"the pixel data contains {decoded} frames but Number of Frames (0028,0008) is {expected}",
            "repair Number of Frames before preparing the pixel data",
        )


def _check_native_length(source: PixelSource, image: Dataset, expected: int) -> None:
    """Raise PreparationError unless the native pixel data (as declared and as present in the file) contains `expected` frames."""
    frame_length = native_frame_length(image)
    needed = frame_length * expected
    assert source.value_length is not None
    # A truncated file can declare more bytes than it contains.
    available = min(source.value_length, source.path.stat().st_size - source.value_offset)
    if available < needed:
        frames = available // max(frame_length, 1)
        raise PreparationError(
            f"the native pixel data is {available} bytes, {needed} are needed for "
            f"Number of Frames (0028,0008) {expected}, so it holds only {frames} whole frames",
            "repair Number of Frames or the Image Pixel attributes before preparing the pixel data",
        )


def iter_frames(path: Path) -> Iterator[np.ndarray]:
    """Decode the frames of the file at `path` one at a time.

    Yields arrays of shape (rows, columns) or (rows, columns, samples). Colour comes out
    as RGB (YBR_FULL and YBR_FULL_422 are converted), PALETTE COLOR as its indices.
    Raises PreparationError naming the transfer syntax if decoding fails.
    """
    source = open_pixel_source(path)
    for frame in iter_decoded_frames(source, source.dataset, raw=False):
        yield frame.pixels


def iter_native_frames(path: Path) -> Iterator[bytes]:
    """Yield the stored bytes of each frame of a file with native (uncompressed) pixel data.

    The bytes are as stored, in the byte order of the file's transfer syntax.
    Raises PreparationError if the pixel data is encapsulated or too short.
    """
    source = open_pixel_source(path)
    if source.is_encapsulated:
        raise PreparationError(
            f"{path.name} has encapsulated pixel data ({source.transfer_syntax.name})",
            "use iter_encapsulated_frames for compressed pixel data",
        )
    count = frame_count(source.dataset)
    _check_native_length(source, source.dataset, count)
    length = native_frame_length(source.dataset)
    with path.open("rb") as file:
        file.seek(source.value_offset)
        for _ in range(count):
            yield file.read(length)


def iter_encapsulated_frames(path: Path) -> Iterator[bytes]:
    """Yield the codestream of each frame of a file with encapsulated (compressed) pixel data.

    Fragments of one frame are joined. Raises PreparationError if the pixel data is
    native or contains fewer frames than Number of Frames.
    """
    source = open_pixel_source(path)
    if not source.is_encapsulated:
        raise PreparationError(
            f"{path.name} has native pixel data ({source.transfer_syntax.name})",
            "use iter_native_frames for uncompressed pixel data",
        )
    count = frame_count(source.dataset)
    with path.open("rb") as file:
        yield from _iter_codestreams(file, source, count)


def _iter_codestreams(file: BinaryIO, source: PixelSource, count: int) -> Iterator[bytes]:
    file.seek(source.value_offset)
    extended = None
    dataset = source.dataset
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    yielded = 0
    try:
        for codestream in generate_frames(file, number_of_frames=count, extended_offsets=extended):
            yield codestream
            yielded += 1
            if yielded == count:
                return
    except (ValueError, struct.error, EOFError) as error:
        raise PreparationError(
            f"the encapsulated pixel data of {source.path.name} is invalid after frame {yielded}: {error}",
            "send the instance as received or repair its pixel data",
        ) from error
    raise PreparationError(
        f"the encapsulated pixel data contains {yielded} frames but Number of Frames (0028,0008) is {count}",
        "repair Number of Frames before preparing the pixel data",
    )
