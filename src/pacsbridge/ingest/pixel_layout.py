"""The layout of a file's Pixel Data element, read from its headers without loading the pixels.

Reading a file for its identity (ingest) and preparing it for a PACS both need
to know where the pixel data lies, how long it is, and whether the file ends
inside it, for files of any size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import Dataset
from pydicom.tag import Tag

_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_LENGTH_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}

_HEAD_BYTES = 8
_TAIL_BYTES = 4


class MalformedPixelDataError(ValueError):
    """Encapsulated Pixel Data whose items do not follow the encapsulation rules of PS3.5 A.4."""


@dataclass(frozen=True)
class PixelDataFacts:
    """Layout of the Pixel Data element of a file, read without loading the pixels."""

    transfer_syntax: str
    encapsulated: bool
    value_offset: int  # file offset of the first value byte
    declared_length: int | None  # None for undefined length (encapsulated)
    available_length: int  # native: value bytes present in the file
    basic_offsets: tuple[int, ...] = ()
    fragment_offsets: tuple[int, ...] = ()  # file offset of each complete fragment value
    fragment_lengths: tuple[int, ...] = ()
    fragment_heads: tuple[bytes, ...] = ()  # first bytes of each complete fragment
    fragment_tails: tuple[bytes, ...] = ()  # last bytes of each complete fragment
    truncated: bool = False  # the file ends inside a value or an item header
    delimiter_missing: bool = False  # the file ends after a complete item, no delimiter


def read_pixel_data_facts(stream: BinaryIO, header: Dataset, file_size: int) -> PixelDataFacts | None:
    """Parse the Pixel Data element at the stream position left by dcmread."""
    implicit_vr, little_endian = header.original_encoding
    byte_order = "<" if little_endian else ">"
    transfer_syntax = str(header.file_meta.get("TransferSyntaxUID", ""))

    element_header = stream.read(8)
    if len(element_header) < 8:
        return None
    group, element = struct.unpack(byte_order + "HH", element_header[:4])
    if (group << 16) | element != _PIXEL_DATA:
        return None

    if implicit_vr:
        (length,) = struct.unpack(byte_order + "I", element_header[4:8])
    elif element_header[4:6] in _LONG_LENGTH_VRS:
        length_bytes = stream.read(4)
        if len(length_bytes) < 4:
            return _truncated_facts(transfer_syntax, stream.tell())
        (length,) = struct.unpack(byte_order + "I", length_bytes)
    else:
        (length,) = struct.unpack(byte_order + "H", element_header[6:8])

    value_offset = stream.tell()
    if length != _UNDEFINED_LENGTH:
        available = min(length, file_size - value_offset)
        return PixelDataFacts(
            transfer_syntax=transfer_syntax,
            encapsulated=False,
            value_offset=value_offset,
            declared_length=length,
            available_length=available,
            truncated=available < length,
        )
    return _read_encapsulated(stream, transfer_syntax, value_offset, file_size)


def _truncated_facts(transfer_syntax: str, offset: int) -> PixelDataFacts:
    return PixelDataFacts(
        transfer_syntax=transfer_syntax,
        encapsulated=False,
        value_offset=offset,
        declared_length=None,
        available_length=0,
        truncated=True,
    )


def _read_encapsulated(stream: BinaryIO, transfer_syntax: str, value_offset: int, file_size: int) -> PixelDataFacts:
    """Walk the items of encapsulated Pixel Data by their lengths, never by scanning.

    Walking by length keeps delimiter bytes inside a fragment from ending the walk.
    """
    offsets: list[int] = []
    lengths: list[int] = []
    heads: list[bytes] = []
    tails: list[bytes] = []
    basic_offsets: tuple[int, ...] = ()
    truncated = False
    delimiter_missing = False
    first_item = True

    while True:
        item_header = stream.read(8)
        if len(item_header) == 0:
            delimiter_missing = True
            break
        if len(item_header) < 8:
            truncated = True
            break
        # Items of encapsulated Pixel Data are always little endian.
        group, element, length = struct.unpack("<HHI", item_header)
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise MalformedPixelDataError(
                f"encapsulated Pixel Data (7FE0,0010) contains tag {Tag(tag)} where an "
                "Item (FFFE,E000) of defined length is expected"
            )
        start = stream.tell()
        if start + length > file_size:
            truncated = True
            break

        if first_item:
            first_item = False
            table = stream.read(length)
            basic_offsets = tuple(struct.unpack(f"<{length // 4}I", table[: length // 4 * 4]))
            continue

        offsets.append(start)
        lengths.append(length)
        head = stream.read(min(length, _HEAD_BYTES))
        heads.append(head)
        if length > _HEAD_BYTES:
            stream.seek(start + length - _TAIL_BYTES)
            tails.append(stream.read(_TAIL_BYTES))
        else:
            tails.append(head[-_TAIL_BYTES:])
        stream.seek(start + length)

    return PixelDataFacts(
        transfer_syntax=transfer_syntax,
        encapsulated=True,
        value_offset=value_offset,
        declared_length=None,
        available_length=sum(lengths),
        basic_offsets=basic_offsets,
        fragment_offsets=tuple(offsets),
        fragment_lengths=tuple(lengths),
        fragment_heads=tuple(heads),
        fragment_tails=tuple(tails),
        truncated=truncated,
        delimiter_missing=delimiter_missing,
    )
