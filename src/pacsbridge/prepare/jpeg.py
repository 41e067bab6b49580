"""Encode frames as JPEG Baseline (Process 1) and JPEG Lossless (Process 14, Selection Value 1).

The encoder is libjpeg-turbo 3 through imagecodecs' `jpeg8_encode`, which releases the
GIL, so frames can be encoded on several threads at once. The Photometric
Interpretation of a Baseline frame is read back from the frame header (SOF segment) of
the codestream that was written, not assumed from the options that were passed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np

from pacsbridge.prepare.errors import PreparationError

# Quality 90 is also the default of DCMTK's dcmcjpeg. On the NEMA WG04 ultrasound image
# US1 it compresses 11 times at 42.8 dB luminance PSNR (libjpeg-turbo 3.1, 4:2:2).
DEFAULT_BASELINE_QUALITY = 90

# Horizontal x vertical sampling factors of the luminance component, keyed by the
# usual J:a:b name. 4:2:2 has two luminance samples per chroma sample along each row.
CHROMA_SUBSAMPLING = {"4:2:2": (2, 1), "4:4:4": (1, 1)}
DEFAULT_CHROMA_SUBSAMPLING = "4:2:2"

START_OF_IMAGE = 0xD8
END_OF_IMAGE = 0xD9
START_OF_SCAN = 0xDA
# SOF markers C0 to CF, without DHT (C4), JPG (C8) and DAC (CC).
START_OF_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0 to RST7 (SOI and EOI are handled apart).
MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})


@dataclass(frozen=True)
class JpegComponent:
    """One component of a JPEG frame header: its identifier and sampling factors."""

    identifier: int
    horizontal: int
    vertical: int


@dataclass(frozen=True)
class JpegFrameHeader:
    """The SOF segment of a JPEG codestream."""

    marker: int  # 0xC0 for Baseline, 0xC3 for Lossless (Process 14)
    precision: int  # bits per sample
    rows: int
    columns: int
    components: tuple[JpegComponent, ...]


def read_frame_header(codestream: bytes | bytearray | memoryview) -> JpegFrameHeader:
    """Parse the SOF segment of a JPEG codestream.

    Raises PreparationError if the codestream does not start with SOI or has no SOF
    segment before the first scan.
    """
    data = memoryview(codestream)
    if len(data) < 4 or data[0] != 0xFF or data[1] != START_OF_IMAGE:
        raise PreparationError("the JPEG codestream does not start with SOI (FFD8)", "report this as a bug")

    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise PreparationError(
                f"the JPEG codestream has no marker at byte {position}",
                "report this as a bug",
            )
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in MARKERS_WITHOUT_LENGTH:
            position += 2
            continue
        if marker in (START_OF_SCAN, END_OF_IMAGE):
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in START_OF_FRAME_MARKERS:
            return _parse_start_of_frame(marker, data[position + 4 : position + 2 + length])
        position += 2 + length

    raise PreparationError("the JPEG codestream has no frame header (SOF)", "report this as a bug")


def _parse_start_of_frame(marker: int, segment: memoryview) -> JpegFrameHeader:
    precision, rows, columns, count = struct.unpack(">BHHB", segment[:6])
    components = []
    for index in range(count):
        identifier, sampling, _table = struct.unpack(">BBB", segment[6 + 3 * index : 9 + 3 * index])
        components.append(JpegComponent(identifier, sampling >> 4, sampling & 0x0F))
    return JpegFrameHeader(marker, precision, rows, columns, tuple(components))


def baseline_photometric(header: JpegFrameHeader, grey_photometric: str = "MONOCHROME2") -> str:
    """Return the Photometric Interpretation that matches a Baseline codestream's sampling factors.

    One component keeps `grey_photometric` (MONOCHROME1 or MONOCHROME2). Three components
    with the luminance at 2x1 and both chroma components at 1x1 are YBR_FULL_422, and
    three components at 1x1 are YBR_FULL. Other samplings (4:2:0, for example) have no
    Photometric Interpretation for JPEG Baseline, so they raise PreparationError.
    """
    if len(header.components) == 1:
        return grey_photometric
    sampling = [(component.horizontal, component.vertical) for component in header.components]
    if len(sampling) == 3 and sampling[1] == sampling[2] == (1, 1):
        if sampling[0] == CHROMA_SUBSAMPLING["4:2:2"]:
            return "YBR_FULL_422"
        if sampling[0] == (1, 1):
            return "YBR_FULL"
    raise PreparationError(
        f"the JPEG Baseline codestream has components with sampling factors {sampling}, "
        "which no Photometric Interpretation describes",
        "report this as a bug",
    )


def encode_baseline(
    frame: np.ndarray,
    quality: int = DEFAULT_BASELINE_QUALITY,
    chroma_subsampling: str = DEFAULT_CHROMA_SUBSAMPLING,
) -> bytes:
    """Encode an 8-bit grey (rows, columns) or RGB (rows, columns, 3) frame as JPEG Baseline.

    RGB is converted to YCbCr with the given chroma subsampling: "4:2:2" (labelled
    YBR_FULL_422) or "4:4:4" (labelled YBR_FULL). Raises PreparationError for other
    sample types, shapes or subsamplings.
    """
    check_quality(quality)
    check_chroma_subsampling(chroma_subsampling)
    if frame.dtype != np.uint8:
        raise PreparationError(
            f"JPEG Baseline needs 8-bit unsigned samples, the frame has {frame.dtype}",
            "choose JPEG Lossless or uncompressed for this instance",
        )
    # libjpeg reads whole rows, so a strided view (one channel of RGB, say) is copied first.
    frame = np.ascontiguousarray(frame)
    if frame.ndim == 2:
        return bytes(imagecodecs.jpeg8_encode(frame, level=quality, colorspace="GRAYSCALE"))
    if frame.ndim == 3 and frame.shape[2] == 3:
        codestream = imagecodecs.jpeg8_encode(
            frame,
            level=quality,
            colorspace="RGB",
            outcolorspace="YCBCR",
            subsampling=CHROMA_SUBSAMPLING[chroma_subsampling],
        )
        return bytes(codestream)
    raise PreparationError(
        f"JPEG Baseline encodes grey or 3-sample frames, the frame has shape {frame.shape}",
        "choose uncompressed for this instance",
    )


def encode_lossless(frame: np.ndarray, bits_stored: int) -> bytes:
    """Encode a grey or 3-sample frame as JPEG Lossless Process 14, Selection Value 1.

    Samples are encoded as they are, without colour transform, at a precision of
    `bits_stored` (2 to 16). Bits above Bits Stored are not pixel data, so they are
    cleared. Signed samples are encoded as their two's complement bit pattern, which
    decoders read back with Pixel Representation 1.
    """
    if not 2 <= bits_stored <= 16:
        raise PreparationError(
            f"JPEG Lossless encodes 2 to 16 bits per sample, Bits Stored (0028,0101) is {bits_stored}",
            "choose uncompressed for this instance",
        )
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise PreparationError(
            f"JPEG Lossless encodes grey or 3-sample frames, the frame has shape {frame.shape}",
            "choose uncompressed for this instance",
        )

    samples = _as_unsigned(frame, bits_stored)
    container_bits = samples.dtype.itemsize * 8
    if bits_stored < container_bits:
        mask = (1 << bits_stored) - 1
        if int(samples.max(initial=0)) > mask:
            samples = samples & np.asarray(mask, dtype=samples.dtype)
    # Equal input and output colour spaces mean no conversion. Three samples are marked
    # RGB (Adobe marker, transform 0): write_prepared converts YBR data to RGB before it
    # gets here, and decoders would convert codestreams marked YCbCr, which
    # libjpeg-turbo 3.1 and GDCM 3.2 fail to do for lossless JPEG.
    colorspace = "GRAYSCALE" if samples.ndim == 2 else "RGB"
    codestream = imagecodecs.jpeg8_encode(
        np.ascontiguousarray(samples),
        lossless=True,
        predictor=1,
        bitspersample=bits_stored,
        colorspace=colorspace,
        outcolorspace=colorspace,
    )
    return bytes(codestream)


def _as_unsigned(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    """Return `frame` as uint8 (Bits Stored up to 8) or uint16 without changing the bit patterns."""
    if frame.dtype.kind not in "iu" or frame.dtype.itemsize > 2:
        raise PreparationError(
            f"JPEG Lossless encodes 8- or 16-bit integer samples, the frame has {frame.dtype}",
            "choose uncompressed for this instance",
        )
    unsigned = np.dtype(f"=u{frame.dtype.itemsize}")
    if frame.dtype.byteorder not in "=|":
        frame = frame.astype(frame.dtype.newbyteorder("="))
    frame = frame.view(unsigned)
    if bits_stored <= 8 and frame.dtype.itemsize == 2:
        return frame.astype(np.uint8)
    return frame


def check_chroma_subsampling(chroma_subsampling: str) -> None:
    """Raise PreparationError unless `chroma_subsampling` is "4:2:2" or "4:4:4"."""
    if chroma_subsampling not in CHROMA_SUBSAMPLING:
        raise PreparationError(
            f"chroma subsampling {chroma_subsampling!r} is invalid", "set chroma subsampling to 4:2:2 or 4:4:4"
        )


def check_quality(quality: int) -> None:
    """Raise PreparationError unless `quality` is a JPEG quality from 1 to 100."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise PreparationError(
            f"JPEG quality {quality!r} is invalid",
            "set a JPEG quality from 1 to 100 (the default is 90)",
        )
