"""Write an instance with its pixel data transcoded for one PACS, frame by frame.

`write_prepared` combines the caller's header with the source file's pixel data,
converted to the target transfer syntax. Frames are decoded on the calling thread and
converted and encoded on a pool of worker threads. No more than two frames per worker
are in flight, so memory stays bounded for loops of any length.

Rules:
- JPEG Baseline (quality 90 by default) takes 8-bit data that is not already lossy.
  Colour is encoded as YCbCr with 4:2:2 subsampling and labelled from the frame header
  (YBR_FULL_422). PALETTE COLOR is expanded to RGB through its lookup table first.
- JPEG Lossless (Process 14, Selection Value 1) keeps every stored sample value: RGB
  stays RGB, YBR_FULL stays YBR_FULL (native YBR_FULL_422 is upsampled to YBR_FULL),
  PALETTE COLOR stays indices. Lossy data is rejected, because it would only grow.
- Uncompressed output is Explicit VR Little Endian with colour as RGB.
- Colour output always has Planar Configuration 0, and encapsulated output has one
  fragment per frame, a Basic Offset Table and even-length items.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)

from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.frames import (
    DecodedFrame,
    PixelSource,
    _iter_codestreams,
    frame_count,
    iter_decoded_frames,
    open_pixel_source,
)
from pacsbridge.prepare.jpeg import (
    DEFAULT_BASELINE_QUALITY,
    DEFAULT_CHROMA_SUBSAMPLING,
    baseline_photometric,
    check_chroma_subsampling,
    check_quality,
    encode_baseline,
    encode_lossless,
    read_frame_header,
)
from pacsbridge.prepare.writer import (
    RATIO_PLACEHOLDER,
    CopiedPixelData,
    EncapsulatedPixelDataWriter,
    copy_pixel_data,
    format_ratio,
    serialize_header,
    write_native_pixel_data,
)

LOGGER = logging.getLogger(__name__)

SUPPORTED_TARGETS = (ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGBaseline8Bit)
BASELINE_METHOD = "ISO_10918_1"

# Transfer syntaxes whose pixel data is lossy whatever the Lossy Image Compression value.
# JPEG-LS, JPEG 2000 and HTJ2K can be lossless, so for them the attribute decides.
ALWAYS_LOSSY_SYNTAXES = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        *(UID(f"1.2.840.10008.1.2.4.{number}") for number in range(52, 57)),  # retired JPEG processes 3 to 13
        *(UID(f"1.2.840.10008.1.2.4.{number}") for number in range(59, 65)),  # retired hierarchical processes
        *(UID(f"1.2.840.10008.1.2.4.{number}") for number in range(100, 110)),  # MPEG-2, MPEG-4, HEVC video
    }
)

# Elements that describe a palette; they go when the palette is expanded to RGB.
PALETTE_KEYWORDS = (
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "AlphaPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "AlphaPaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "SegmentedAlphaPaletteColorLookupTableData",
    "PaletteColorLookupTableUID",
)


@dataclass
class PixelTarget:
    """Target form of the pixel data of one instance."""

    syntax: UID  # ExplicitVRLittleEndian, JPEGLosslessSV1 or JPEGBaseline8Bit
    quality: int = DEFAULT_BASELINE_QUALITY  # JPEG Baseline only, 1 to 100
    monochrome: bool = False  # keep only the first channel of RGB grey content, as MONOCHROME2
    keep_pixel_data: bool = False  # copy the Pixel Data element as it is, in the source transfer syntax
    # JPEG Baseline colour only: "4:2:2" (YBR_FULL_422) or "4:4:4" (YBR_FULL, larger,
    # but colour overlays keep their edges).
    chroma_subsampling: str = DEFAULT_CHROMA_SUBSAMPLING


@dataclass(frozen=True)
class PixelReport:
    """Summary of the file that `write_prepared` wrote, for the caller's log (no patient data)."""

    syntax: UID
    source_syntax: UID
    photometric: str
    frames: int
    bytes_written: int  # size of the output file
    pixel_data_bytes: int  # length of the Pixel Data value, items and delimiter included
    lossy_ratio: float | None  # uncompressed / compressed bytes of this lossy step, None if not lossy
    lossy_method: str | None
    kept_pixel_data: bool
    palette_expanded: bool
    monochrome: bool
    padded_items: int  # odd-length fragments or values that got a trailing 0x00
    seconds: float

    @property
    def derived(self) -> bool:
        """True if the pixel data changed in content, which calls for a new SOP Instance UID."""
        return self.lossy_ratio is not None or self.palette_expanded or self.monochrome


@dataclass(frozen=True)
class _Conversion:
    """The per-frame work chosen for one instance."""

    raw: bool  # decode without YBR to RGB conversion
    palette_table: np.ndarray | None  # (entries, 3) uint8 table for PALETTE COLOR expansion
    monochrome: bool
    bits_allocated: int
    bits_stored: int


def write_prepared(src: Path, dst: Path, header: Dataset, target: PixelTarget, *, workers: int = 2) -> PixelReport:
    """Write `header` plus the pixel data of `src`, converted to `target`, as a Part 10 file at `dst`.

    `header` contains file_meta and every element but Pixel Data, already changed by the
    caller (UIDs, time zone, character set). Its Image Pixel attributes must describe
    the pixel data stored in `src`. It is not modified: the Image Pixel attributes,
    Lossy Image Compression (0028,2110), Ratio (0028,2112) and Method (0028,2114), and
    the file meta Transfer Syntax UID are set on a copy.

    Raises PreparationError (and removes `dst`) if the pixel data cannot be read or the
    target cannot hold it.
    """
    started = time.monotonic()
    _check_target(target, workers)
    source = open_pixel_source(src)
    output = copy.deepcopy(header)
    if "PixelData" in output:
        del output.PixelData

    try:
        with dst.open("wb") as file:
            if target.keep_pixel_data:
                report = _write_kept(file, source, output, _kept_syntax(source, target))
            else:
                report = _write_transcoded(file, source, output, target, workers)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise

    report = _finish_report(report, dst, started)
    LOGGER.info(
        "prepared pixel data: %s -> %s, %s, %d frames, %d bytes, lossy ratio %s",
        source.transfer_syntax,
        report.syntax,
        report.photometric,
        report.frames,
        report.bytes_written,
        f"{report.lossy_ratio:.2f}" if report.lossy_ratio is not None else "none",
    )
    return report


def _check_target(target: PixelTarget, workers: int) -> None:
    if not target.keep_pixel_data and target.syntax not in SUPPORTED_TARGETS:
        raise PreparationError(
            f"transfer syntax {target.syntax} is not a supported target for transcoding",
            "choose Explicit VR Little Endian, JPEG Lossless SV1 or JPEG Baseline",
        )
    if target.syntax == JPEGBaseline8Bit:
        check_quality(target.quality)
        check_chroma_subsampling(target.chroma_subsampling)
    if workers < 1:
        raise ValueError(f"workers is {workers}; pass 1 or more")


def _finish_report(report: PixelReport, dst: Path, started: float) -> PixelReport:
    values = dict(report.__dict__)
    values.update(bytes_written=dst.stat().st_size, seconds=time.monotonic() - started)
    return PixelReport(**values)


def _set_file_meta(output: Dataset, syntax: UID) -> None:
    meta = output.file_meta if hasattr(output, "file_meta") else FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    if "SOPClassUID" in output:
        meta.MediaStorageSOPClassUID = output.SOPClassUID
    if "SOPInstanceUID" in output:
        meta.MediaStorageSOPInstanceUID = output.SOPInstanceUID
    output.file_meta = meta
    output.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, output.original_character_set)


def _kept_syntax(source: PixelSource, target: PixelTarget) -> UID:
    """Return the syntax to label kept pixel data with: the target for a relabelled codestream, else the source's.

    A JPEG Extended codestream that uses only the baseline process is valid JPEG
    Baseline as it is, so the caller may relabel it without re-encoding.
    """
    if target.syntax.is_encapsulated and source.transfer_syntax.is_encapsulated:
        return target.syntax
    return source.transfer_syntax


def _write_kept(file, source: PixelSource, output: Dataset, syntax: UID) -> PixelReport:
    """Write the header in `syntax` and copy the Pixel Data element unchanged."""
    _set_file_meta(output, syntax)
    header_bytes = serialize_header(output)
    file.write(header_bytes.before_pixel_data)
    if source.is_encapsulated and frame_count(output) < frame_count(source.dataset):
        copied = _copy_complete_frames(file, source, frame_count(output), syntax)
    else:
        copied = copy_pixel_data(file, source)
    file.write(header_bytes.after_pixel_data)
    return PixelReport(
        syntax=syntax,
        source_syntax=source.transfer_syntax,
        photometric=str(output.get("PhotometricInterpretation", "")),
        frames=frame_count(output),
        bytes_written=0,
        pixel_data_bytes=copied.value_length,
        lossy_ratio=None,
        lossy_method=None,
        kept_pixel_data=True,
        palette_expanded=False,
        monochrome=False,
        padded_items=copied.padded_items,
        seconds=0.0,
    )


def _copy_complete_frames(file, source: PixelSource, frames: int, syntax: UID) -> CopiedPixelData:
    """Copy the codestreams of the first `frames` frames, one item each, when the source lacks later frames.

    The codestreams are copied byte for byte; only the encapsulation (items and
    Basic Offset Table) is written anew.
    """
    writer = EncapsulatedPixelDataWriter(file, frames, syntax)
    with source.path.open("rb") as stream:
        for codestream in _iter_codestreams(stream, source, frames):
            writer.add_frame(codestream)
    return CopiedPixelData(writer.finish(), writer.padded_items)


def _is_lossy(source: PixelSource, header: Dataset) -> bool:
    return source.transfer_syntax in ALWAYS_LOSSY_SYNTAXES or str(header.get("LossyImageCompression", "")) == "01"


def _plan_conversion(source: PixelSource, output: Dataset, target: PixelTarget) -> _Conversion:
    """Check that `target` can hold the source pixel data and choose the per-frame work."""
    photometric = str(output.get("PhotometricInterpretation", ""))
    samples = int(output.get("SamplesPerPixel", 1))
    bits_allocated = int(output.get("BitsAllocated", 0))
    bits_stored = int(output.get("BitsStored", bits_allocated))
    lossy = _is_lossy(source, output)
    is_colour = samples == 3 or photometric == "PALETTE COLOR"
    monochrome = target.monochrome and is_colour

    if target.syntax == JPEGLosslessSV1 and lossy:
        raise PreparationError(
            f"the pixel data is already lossy ({source.transfer_syntax.name}, Lossy Image Compression "
            "(0028,2110)), and JPEG Lossless would only make it larger",
            "send it as received or uncompressed",
        )
    palette_table = None
    if target.syntax == JPEGBaseline8Bit:
        if lossy:
            raise PreparationError(
                f"the pixel data is already lossy ({source.transfer_syntax.name}, Lossy Image Compression "
                "(0028,2110)) and is not compressed lossy a second time",
                "send it as received or uncompressed",
            )
        if photometric != "PALETTE COLOR" and (bits_allocated != 8 or bits_stored > 8):
            raise PreparationError(
                f"JPEG Baseline needs 8-bit samples, Bits Allocated (0028,0100) is {bits_allocated}",
                "choose JPEG Lossless or uncompressed for this instance",
            )
        if int(output.get("PixelRepresentation", 0)) != 0:
            raise PreparationError(
                "JPEG Baseline needs unsigned samples, Pixel Representation (0028,0103) is 1",
                "choose JPEG Lossless or uncompressed for this instance",
            )
    if photometric == "PALETTE COLOR" and (target.syntax == JPEGBaseline8Bit or monochrome):
        palette_table = _palette_table(output, bits_allocated)

    # Lossless output keeps the stored sample values of RGB, grey and palette data. YBR
    # data becomes RGB, as in every other output: the Ultrasound Image module wants
    # YBR_FULL with Planar Configuration 1, which encapsulated data cannot have (it is 0).
    raw = target.syntax == JPEGLosslessSV1 and not monochrome and not photometric.startswith("YBR")
    return _Conversion(raw, palette_table, monochrome, bits_allocated, bits_stored)


def _palette_table(output: Dataset, bits_allocated: int) -> np.ndarray:
    """Return the palette as an (entries, 3) uint8 table indexed by the stored pixel value."""
    if bits_allocated not in (8, 16):
        raise PreparationError(
            f"PALETTE COLOR with Bits Allocated (0028,0100) {bits_allocated} cannot be expanded",
            "choose JPEG Lossless or uncompressed for this instance",
        )
    indices = np.arange(1 << bits_allocated, dtype=np.uint8 if bits_allocated == 8 else np.uint16)
    try:
        table = apply_color_lut(indices, output)
    except (ValueError, KeyError, AttributeError, IndexError) as error:
        raise PreparationError(
            f"the Palette Color Lookup Table cannot be applied: {error}",
            "repair the palette attributes or choose JPEG Lossless or uncompressed",
        ) from error
    if table.dtype.itemsize == 2:
        # NOTE: some writers store 8-bit entries in a 16-bit table, so a table whose
        # entries all fit in 8 bits is taken as is instead of being scaled down.
        table = table if int(table.max()) <= 0xFF else table >> 8
    return np.ascontiguousarray(table.astype(np.uint8))


def _convert(frame: DecodedFrame, conversion: _Conversion) -> np.ndarray:
    pixels = frame.pixels
    if conversion.palette_table is not None:
        pixels = conversion.palette_table[pixels]
    if conversion.monochrome:
        # The caller asks for this only when the channels carry the same grey content.
        pixels = pixels[..., 0]
    return pixels


def _output_photometric(frame: DecodedFrame, conversion: _Conversion) -> str:
    if conversion.monochrome:
        return "MONOCHROME2"
    if conversion.palette_table is not None:
        return "RGB"
    return frame.photometric


def _write_transcoded(file, source: PixelSource, output: Dataset, target: PixelTarget, workers: int) -> PixelReport:
    conversion = _plan_conversion(source, output, target)
    frames = frame_count(output)
    decoded = iter_decoded_frames(source, output, raw=conversion.raw)

    if target.syntax == ExplicitVRLittleEndian:
        return _write_native(file, source, output, decoded, conversion, frames)

    if target.syntax == JPEGBaseline8Bit:
        quality, subsampling = target.quality, target.chroma_subsampling

        def encode(frame: DecodedFrame) -> tuple[bytes, int]:
            pixels = _convert(frame, conversion)
            return encode_baseline(pixels, quality, subsampling), pixels.nbytes
    else:
        # An expanded palette gives 8-bit samples whatever the indices had.
        bits = 8 if conversion.palette_table is not None else conversion.bits_stored

        def encode(frame: DecodedFrame) -> tuple[bytes, int]:
            pixels = _convert(frame, conversion)
            return encode_lossless(pixels, bits), pixels.nbytes

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jpeg-encode") as pool:
        results = _encode_in_order(pool, decoded, encode, max_in_flight=2 * workers)
        first_frame, (first_codestream, uncompressed_bytes) = next(results)
        photometric = _encapsulated_photometric(first_frame, first_codestream, conversion, target)
        samples = len(read_frame_header(first_codestream).components)
        _set_image_pixel(output, samples, photometric)
        if conversion.palette_table is not None:
            _remove_palette(output)
        if target.syntax == JPEGBaseline8Bit or conversion.palette_table is not None:
            _set_8_bit(output)
        if target.syntax == JPEGBaseline8Bit:
            append_lossy_step(output, RATIO_PLACEHOLDER, BASELINE_METHOD)
        _set_file_meta(output, target.syntax)
        header_bytes = serialize_header(output)

        file.write(header_bytes.before_pixel_data)
        writer = EncapsulatedPixelDataWriter(file, frames, target.syntax)
        writer.add_frame(first_codestream)
        for frame, (codestream, frame_bytes) in results:
            _check_same_photometric(frame, first_frame)
            writer.add_frame(codestream)
            uncompressed_bytes += frame_bytes
        value_length = writer.finish()
        file.write(header_bytes.after_pixel_data)

    ratio = None
    if target.syntax == JPEGBaseline8Bit:
        ratio = uncompressed_bytes / max(writer.codestream_bytes, 1)
        assert header_bytes.ratio_offset is not None
        file.seek(header_bytes.ratio_offset)
        file.write(format_ratio(ratio))
        file.seek(0, 2)

    return PixelReport(
        syntax=target.syntax,
        source_syntax=source.transfer_syntax,
        photometric=photometric,
        frames=frames,
        bytes_written=0,
        pixel_data_bytes=value_length,
        lossy_ratio=ratio,
        lossy_method=BASELINE_METHOD if ratio is not None else None,
        kept_pixel_data=False,
        palette_expanded=conversion.palette_table is not None,
        monochrome=conversion.monochrome,
        padded_items=writer.padded_items,
        seconds=0.0,
    )


def _check_same_photometric(frame: DecodedFrame, first: DecodedFrame) -> None:
    if frame.photometric != first.photometric:
        raise PreparationError(
            f"the frames decode to different Photometric Interpretations ({first.photometric}, {frame.photometric})",
            "send the instance as received",
        )


def _encapsulated_photometric(
    frame: DecodedFrame, codestream: bytes, conversion: _Conversion, target: PixelTarget
) -> str:
    if target.syntax == JPEGBaseline8Bit:
        grey = frame.photometric if frame.photometric in ("MONOCHROME1", "MONOCHROME2") else "MONOCHROME2"
        return baseline_photometric(read_frame_header(codestream), grey)
    return _output_photometric(frame, conversion)


def _encode_in_order(
    pool: ThreadPoolExecutor,
    frames: Iterator[DecodedFrame],
    encode: Callable[[DecodedFrame], tuple[bytes, int]],
    *,
    max_in_flight: int,
) -> Iterator[tuple[DecodedFrame, tuple[bytes, int]]]:
    """Yield (frame, codestream) in frame order, with at most `max_in_flight` frames submitted but not yet yielded."""
    pending: deque[tuple[DecodedFrame, Future[tuple[bytes, int]]]] = deque()
    try:
        for frame in frames:
            pending.append((frame, pool.submit(encode, frame)))
            if len(pending) >= max_in_flight:
                done_frame, future = pending.popleft()
                yield done_frame, future.result()
        while pending:
            done_frame, future = pending.popleft()
            yield done_frame, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def _write_native(
    file,
    source: PixelSource,
    output: Dataset,
    decoded: Iterator[DecodedFrame],
    conversion: _Conversion,
    frames: int,
) -> PixelReport:
    """Write Explicit VR Little Endian native pixel data, converting one frame at a time on this thread."""
    first = next(decoded)
    first_pixels = _convert(first, conversion)
    photometric = _output_photometric(first, conversion)
    samples = 1 if first_pixels.ndim == 2 else first_pixels.shape[2]
    _set_image_pixel(output, samples, photometric)
    if conversion.palette_table is not None:
        _remove_palette(output)
        _set_8_bit(output)
    bits_allocated = int(output.BitsAllocated)
    _set_file_meta(output, ExplicitVRLittleEndian)
    header_bytes = serialize_header(output)

    dtype = _little_endian_dtype(first_pixels, bits_allocated)
    frame_bytes = first_pixels.size * dtype.itemsize

    def frame_buffers() -> Iterator[memoryview]:
        yield memoryview(np.ascontiguousarray(first_pixels, dtype=dtype)).cast("B")
        for frame in decoded:
            pixels = _convert(frame, conversion)
            if pixels.shape != first_pixels.shape:
                raise PreparationError(
                    f"a frame decodes to shape {pixels.shape} instead of {first_pixels.shape}",
                    "send the instance as received",
                )
            yield memoryview(np.ascontiguousarray(pixels, dtype=dtype)).cast("B")

    file.write(header_bytes.before_pixel_data)
    vr = "OB" if bits_allocated <= 8 else "OW"
    value_length = write_native_pixel_data(file, frame_buffers(), frame_bytes * frames, vr, ExplicitVRLittleEndian)
    file.write(header_bytes.after_pixel_data)
    return PixelReport(
        syntax=ExplicitVRLittleEndian,
        source_syntax=source.transfer_syntax,
        photometric=photometric,
        frames=frames,
        bytes_written=0,
        pixel_data_bytes=value_length,
        lossy_ratio=None,
        lossy_method=None,
        kept_pixel_data=False,
        palette_expanded=conversion.palette_table is not None,
        monochrome=conversion.monochrome,
        padded_items=int(value_length != frame_bytes * frames),
        seconds=0.0,
    )


def _little_endian_dtype(pixels: np.ndarray, bits_allocated: int) -> np.dtype:
    if bits_allocated not in (8, 16, 32):
        raise PreparationError(
            f"Bits Allocated (0028,0100) {bits_allocated} cannot be written uncompressed frame by frame",
            "send the instance as received",
        )
    kind = "i" if pixels.dtype.kind == "i" else "u"
    return np.dtype(f"<{kind}{bits_allocated // 8}")


def _set_image_pixel(output: Dataset, samples: int, photometric: str) -> None:
    output.SamplesPerPixel = samples
    output.PhotometricInterpretation = photometric
    if samples > 1:
        output.PlanarConfiguration = 0
    elif "PlanarConfiguration" in output:
        del output.PlanarConfiguration
    if "NumberOfFrames" in output:
        output.NumberOfFrames = frame_count(output)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in output:
            delattr(output, keyword)


def _set_8_bit(output: Dataset) -> None:
    output.BitsAllocated = 8
    output.BitsStored = 8
    output.HighBit = 7
    output.PixelRepresentation = 0


def _remove_palette(output: Dataset) -> None:
    for keyword in PALETTE_KEYWORDS:
        if keyword in output:
            delattr(output, keyword)


def _as_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, MultiValue)):
        return [str(item) for item in value]
    return [str(value)]


def append_lossy_step(output: Dataset, ratio: str, method: str) -> None:
    """Mark `output` lossy and append one Lossy Image Compression Ratio and Method value, keeping earlier ones."""
    ratios = _as_list(output.get("LossyImageCompressionRatio"))
    methods = _as_list(output.get("LossyImageCompressionMethod"))
    output.LossyImageCompression = "01"
    output.LossyImageCompressionRatio = [*ratios, ratio]
    output.LossyImageCompressionMethod = [*methods, method]
