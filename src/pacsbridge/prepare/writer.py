"""Write a DICOM Part 10 file whose Pixel Data is streamed in frame by frame.

pydicom writes the header (File Meta Information and every element before Pixel
Data). The Pixel Data element is written here, so no more than one frame has to be in
memory. Values that are known only at the end (the Basic Offset Table, the Lossy Image
Compression Ratio) get fixed-size room in the file that is filled in afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.frames import PIXEL_DATA_TAG, UNDEFINED_LENGTH, PixelSource

ITEM_TAG = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER_TAG = (0xFFFE, 0xE0DD)
MAX_32_BIT_LENGTH = 0xFFFFFFFE  # the largest even value a 32-bit length field can hold

# Room for the last Lossy Image Compression Ratio value, filled in once the ratio is
# known: 16 characters, the maximum length of one DS value.
RATIO_PLACEHOLDER = "9876543210.01234"
COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class SerializedHeader:
    """The bytes of a Part 10 header and of the elements that follow Pixel Data."""

    before_pixel_data: bytes  # preamble, File Meta Information and elements up to Pixel Data
    after_pixel_data: bytes  # elements with tags above (7FE0,0010), such as Data Set Trailing Padding
    ratio_offset: int | None  # offset of RATIO_PLACEHOLDER in before_pixel_data, if present


def serialize_header(header: Dataset) -> SerializedHeader:
    """Encode `header` in the transfer syntax of its file_meta, leaving out Pixel Data.

    Raises PreparationError if pydicom cannot encode an element or the ratio
    placeholder cannot be found exactly once.
    """
    syntax = UID(header.file_meta.TransferSyntaxUID)
    leading = Dataset()
    trailing = Dataset()
    buffer = BytesIO()
    try:
        # Iterating converts raw elements, which raises for a VR that pydicom does not know.
        for element in header:
            if element.tag < PIXEL_DATA_TAG:
                leading.add(element)
            elif element.tag > PIXEL_DATA_TAG:
                trailing.add(element)
        leading.file_meta = header.file_meta
        leading.preamble = getattr(header, "preamble", None)
        for target in (leading, trailing):
            target.set_original_encoding(*header.original_encoding, header.original_character_set)
        dcmwrite(buffer, leading, enforce_file_format=True)
        after = DicomBytesIO()
        after.is_little_endian = syntax.is_little_endian
        after.is_implicit_VR = syntax.is_implicit_VR
        write_dataset(after, trailing)
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError, struct.error) as error:
        raise PreparationError(
            f"the header cannot be written in {syntax.name}: {type(error).__name__}: {error}",
            "check the header elements that the error names",
        ) from error

    before = buffer.getvalue()
    ratio_offset = None
    if "LossyImageCompressionRatio" in header and RATIO_PLACEHOLDER in str(header.LossyImageCompressionRatio):
        placeholder = RATIO_PLACEHOLDER.encode("ascii")
        if before.count(placeholder) != 1:
            raise PreparationError(
                "the room for Lossy Image Compression Ratio (0028,2112) cannot be found exactly once in the header",
                "report this as a bug",
            )
        ratio_offset = before.index(placeholder)
    return SerializedHeader(before, after.getvalue(), ratio_offset)


def format_ratio(ratio: float) -> bytes:
    """Return `ratio` as a DS value of exactly the placeholder length (padded with trailing spaces)."""
    text = f"{ratio:.2f}" if ratio < 1e9 else f"{ratio:.6g}"
    return text.ljust(len(RATIO_PLACEHOLDER)).encode("ascii")


def element_header(tag: int, vr: str | None, length: int, syntax: UID) -> bytes:
    """Return the tag, VR (if explicit) and 32-bit length of an OB/OW-like element in `syntax`."""
    order = "<" if syntax.is_little_endian else ">"
    group, element = tag >> 16, tag & 0xFFFF
    if syntax.is_implicit_VR:
        return struct.pack(f"{order}HHI", group, element, length)
    assert vr is not None
    return struct.pack(f"{order}HH2sHI", group, element, vr.encode("ascii"), 0, length)


def item_header(tag: tuple[int, int], length: int, syntax: UID) -> bytes:
    order = "<" if syntax.is_little_endian else ">"
    return struct.pack(f"{order}HHI", tag[0], tag[1], length)


class EncapsulatedPixelDataWriter:
    """Writes encapsulated Pixel Data: a Basic Offset Table and one even-length item per frame.

    The Basic Offset Table is written as zeros first and filled in by `finish`, so the
    output must be a seekable file. Codestreams of odd length get one trailing 0x00
    byte after the EOI marker, which JPEG decoders ignore.
    """

    def __init__(self, file: BinaryIO, frame_count: int, syntax: UID) -> None:
        self._file = file
        self._syntax = syntax
        self._frame_count = frame_count
        self._offsets: list[int] = []
        self._position = 0  # bytes written after the Basic Offset Table item
        self.codestream_bytes = 0  # sum of codestream lengths before padding
        self.padded_items = 0
        file.write(element_header(PIXEL_DATA_TAG, "OB", UNDEFINED_LENGTH, syntax))
        file.write(item_header(ITEM_TAG, 4 * frame_count, syntax))
        self._table_offset = file.tell()
        file.write(bytes(4 * frame_count))

    def add_frame(self, codestream: bytes | bytearray | memoryview) -> None:
        if len(self._offsets) == self._frame_count:
            raise PreparationError(
                f"more frames than the {self._frame_count} announced in the Basic Offset Table",
                "report this as a bug",
            )
        if self._position > 0xFFFFFFFF:
            raise PreparationError(
                "the compressed pixel data exceeds 4 GiB, beyond what a Basic Offset Table can address",
                "send this instance uncompressed or as received",
            )
        self._offsets.append(self._position)
        length = len(codestream)
        padded = length + length % 2
        self._file.write(item_header(ITEM_TAG, padded, self._syntax))
        self._file.write(codestream)
        if padded != length:
            self._file.write(b"\x00")
            self.padded_items += 1
        self._position += 8 + padded
        self.codestream_bytes += length

    def finish(self) -> int:
        """Write the sequence delimiter, fill in the Basic Offset Table and return the bytes of the element value."""
        if len(self._offsets) != self._frame_count:
            raise PreparationError(
                f"{len(self._offsets)} frames were written but {self._frame_count} were announced",
                "report this as a bug",
            )
        self._file.write(item_header(SEQUENCE_DELIMITER_TAG, 0, self._syntax))
        end = self._file.tell()
        order = "<" if self._syntax.is_little_endian else ">"
        self._file.seek(self._table_offset)
        self._file.write(struct.pack(f"{order}{self._frame_count}I", *self._offsets))
        self._file.seek(end)
        return 8 + 4 * self._frame_count + self._position + 8


def write_native_pixel_data(
    file: BinaryIO,
    frames: Iterator[bytes | memoryview],
    total_length: int,
    vr: str,
    syntax: UID,
) -> int:
    """Write native Pixel Data of `total_length` bytes from `frames`, padded to even length.

    Returns the length of the element value. Raises PreparationError if the frames do
    not add up to `total_length` or the value would not fit a 32-bit length.
    """
    padded = total_length + total_length % 2
    if padded > MAX_32_BIT_LENGTH:
        raise PreparationError(
            f"the uncompressed pixel data would be {padded} bytes, more than a DICOM element can hold (4 GiB)",
            "send this instance compressed or as received",
        )
    file.write(element_header(PIXEL_DATA_TAG, vr, padded, syntax))
    written = 0
    for frame in frames:
        file.write(frame)
        written += len(frame)
    if written != total_length:
        raise PreparationError(
            f"{written} bytes of native pixel data were written instead of {total_length}",
            "report this as a bug",
        )
    if padded != total_length:
        file.write(b"\x00")
    return padded


@dataclass(frozen=True)
class CopiedPixelData:
    """Length and padding of a copied Pixel Data element."""

    value_length: int  # length of the value as written (undefined-length values: all items and the delimiter)
    padded_items: int  # odd-length values or fragments that got a trailing 0x00


def copy_pixel_data(file: BinaryIO, source: PixelSource) -> CopiedPixelData:
    """Copy the Pixel Data element of `source` unchanged, except that odd lengths are padded to even.

    Native data of odd length gets one trailing 0x00. In encapsulated data each odd
    fragment gets one, and the Basic Offset Table is moved by the bytes added before
    each frame. The copy is made in chunks of 1 MiB.
    """
    with source.path.open("rb") as src:
        if source.value_length is not None:
            return _copy_native(file, src, source)
        return _copy_encapsulated(file, src, source)


def _copy_native(file: BinaryIO, src: BinaryIO, source: PixelSource) -> CopiedPixelData:
    assert source.value_length is not None
    length = source.value_length
    available = source.path.stat().st_size - source.value_offset
    if available < length:
        raise PreparationError(
            f"the file ends {length - available} bytes before the end of Pixel Data (7FE0,0010)",
            "repair or resend the truncated file",
        )
    padded = length + length % 2
    file.write(element_header(PIXEL_DATA_TAG, source.vr, padded, source.transfer_syntax))
    src.seek(source.value_offset)
    _copy_bytes(src, file, length)
    if padded != length:
        file.write(b"\x00")
    return CopiedPixelData(padded, padded - length)


@dataclass(frozen=True)
class _Item:
    offset: int  # file offset of the item value
    length: int


def _scan_items(src: BinaryIO, source: PixelSource) -> tuple[_Item, list[_Item]]:
    """Return the Basic Offset Table item and the fragment items, reading only the item headers."""
    order = "<" if source.transfer_syntax.is_little_endian else ">"
    size = source.path.stat().st_size
    src.seek(source.value_offset)
    items: list[_Item] = []
    while True:
        header = src.read(8)
        if len(header) < 8:
            raise PreparationError(
                "the encapsulated Pixel Data (7FE0,0010) ends without a sequence delimiter",
                "repair or resend the truncated file",
            )
        group, element, length = struct.unpack(f"{order}HHI", header)
        if (group, element) == SEQUENCE_DELIMITER_TAG:
            break
        if (group, element) != ITEM_TAG or length == UNDEFINED_LENGTH:
            raise PreparationError(
                f"the encapsulated Pixel Data (7FE0,0010) has an invalid item ({group:04X},{element:04X}) "
                f"at byte {src.tell() - 8}",
                "repair the pixel data or send the instance as received",
            )
        offset = src.tell()
        if offset + length > size:
            raise PreparationError(
                "the last fragment of the encapsulated Pixel Data (7FE0,0010) is cut off",
                "repair or resend the truncated file",
            )
        items.append(_Item(offset, length))
        src.seek(length, 1)
    if not items:
        raise PreparationError(
            "the encapsulated Pixel Data (7FE0,0010) has no Basic Offset Table item",
            "repair the pixel data",
        )
    return items[0], items[1:]


def _copy_encapsulated(file: BinaryIO, src: BinaryIO, source: PixelSource) -> CopiedPixelData:
    syntax = source.transfer_syntax
    order = "<" if syntax.is_little_endian else ">"
    table_item, fragments = _scan_items(src, source)

    # Map each fragment's old position (relative to the first fragment) to its new one.
    moved: dict[int, int] = {}
    old_position = new_position = 0
    for fragment in fragments:
        moved[old_position] = new_position
        old_position += 8 + fragment.length
        new_position += 8 + fragment.length + fragment.length % 2

    src.seek(table_item.offset)
    table = src.read(table_item.length)
    if table_item.length % 4:
        raise PreparationError(
            f"the Basic Offset Table is {table_item.length} bytes, not a multiple of 4",
            "repair the pixel data or send the instance as received",
        )
    offsets = struct.unpack(f"{order}{table_item.length // 4}I", table)
    if any(offset not in moved for offset in offsets):
        raise PreparationError(
            "the Basic Offset Table points between fragments",
            "repair the pixel data or send the instance as received",
        )

    file.write(element_header(PIXEL_DATA_TAG, source.vr or "OB", UNDEFINED_LENGTH, syntax))
    file.write(item_header(ITEM_TAG, table_item.length, syntax))
    file.write(struct.pack(f"{order}{len(offsets)}I", *(moved[offset] for offset in offsets)))
    padded_items = 0
    for fragment in fragments:
        padded = fragment.length + fragment.length % 2
        file.write(item_header(ITEM_TAG, padded, syntax))
        src.seek(fragment.offset)
        _copy_bytes(src, file, fragment.length)
        if padded != fragment.length:
            file.write(b"\x00")
            padded_items += 1
    file.write(item_header(SEQUENCE_DELIMITER_TAG, 0, syntax))
    return CopiedPixelData(8 + table_item.length + new_position + 8, padded_items)


def _copy_bytes(src: BinaryIO, dst: BinaryIO, length: int) -> None:
    remaining = length
    while remaining:
        chunk = src.read(min(COPY_CHUNK_BYTES, remaining))
        if not chunk:
            raise PreparationError(
                f"the file ends {remaining} bytes early inside Pixel Data (7FE0,0010)",
                "repair or resend the truncated file",
            )
        dst.write(chunk)
        remaining -= len(chunk)
