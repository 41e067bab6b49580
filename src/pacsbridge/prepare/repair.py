"""Repair or reject the odd inputs met in the field, by documented rules.

The repair functions take a header Dataset (all elements but Pixel Data) and facts
about the pixel data read from the file. They change the header in place and return the
repairs made, as short descriptions that name elements and never values. An input
that no rule can repair raises PreparationError. The rules:

- Odd-length Pixel Data or fragments: reported; the writer pads them to even length.
- UI values over 64 characters: replaced by `replacement_uid(old)`, a deterministic
  UID, so all instances of a study map one old UID to the same new one.
- A single-frame SOP class with several frames: Ultrasound Image Storage (current or
  retired) becomes Ultrasound Multi-frame Image Storage; other classes are rejected.
- Planar Configuration that contradicts native colour data: set to the layout that the
  first frame shows.
- Fewer frames than Number of Frames declares: the complete frames are sent and Number
  of Frames is set to their count; an instance with no complete frame is rejected. A
  partial frame is never sent.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, RLELossless

from pacsbridge.ingest.pixel_layout import MalformedPixelDataError, PixelDataFacts, read_pixel_data_facts
from pacsbridge.prepare.errors import PreparationError

MAX_UID_LENGTH = 64

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_IMAGE_STORAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"

# Image storage classes whose IOD has no Multi-frame Module, so Number of Frames over 1
# is invalid. Other classes are left as they are.
SINGLE_FRAME_CLASSES = {
    US_IMAGE_STORAGE: "Ultrasound Image Storage",
    US_IMAGE_STORAGE_RETIRED: "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}

# UI elements that name a class or transfer syntax, not an instance: a replacement UID
# would make them meaningless, so a long one is rejected instead.
_CLASS_UID_KEYWORDS = {
    "SOPClassUID",
    "MediaStorageSOPClassUID",
    "ReferencedSOPClassUID",
    "ReferencedSOPClassUIDInFile",
    "TransferSyntaxUID",
    "ReferencedTransferSyntaxUIDInFile",
}


# Bytes that start a frame's codestream: JPEG and JPEG-LS SOI, JPEG 2000 SOC, JP2 box.
_CODESTREAM_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP")
# JPEG, JPEG-LS and JPEG 2000 codestreams all end with FFD9 (EOI, or EOC for JPEG 2000).
_CODESTREAM_END = b"\xff\xd9"

# The smoother reading must be this many times smoother before the declared Planar
# Configuration is overruled. On the first frames of the 12 colour and grey ultrasound
# samples, the wrong reading was 1.77 to 51 times rougher than the right one.
_PLANAR_MARGIN = 1.5


@dataclass(frozen=True)
class ImageGeometry:
    """The Image Pixel values needed to measure frames, checked to be usable."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    photometric: str
    declared_frames: int

    @property
    def frame_bits(self) -> int:
        pixels = self.rows * self.columns
        if self.photometric == "YBR_FULL_422":
            # Two luminance samples share one Cb and one Cr: 2 samples per pixel.
            return pixels * 2 * self.bits_allocated
        return pixels * self.samples_per_pixel * self.bits_allocated


@dataclass
class RepairResult:
    """Changes that the repairs made to a header, for the plan and the report."""

    repairs: list[str] = field(default_factory=list)
    uid_map: dict[str, str] = field(default_factory=dict)
    # Conversions that make the instance a derived one, for derived_uid().
    conversions: list[str] = field(default_factory=list)
    frame_count: int | None = None  # frames to send; None without Pixel Data


# -- Reading the Pixel Data layout -------------------------------------------------


def read_header_and_facts(path: Path) -> tuple[Dataset, PixelDataFacts | None]:
    """Read the header of a file and the layout of its Pixel Data, not the pixels.

    Raises PreparationError when the file is not DICOM Part 10 or its Pixel Data
    element is malformed.
    """
    with open(path, "rb") as stream:
        try:
            header = dcmread(stream, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as error:
            raise PreparationError(
                f"the file cannot be read as DICOM: {error}",
                "Export the instance again as a DICOM Part 10 file.",
            ) from error
        try:
            facts = read_pixel_data_facts(stream, header, os.fstat(stream.fileno()).st_size)
        except MalformedPixelDataError as error:
            raise PreparationError(
                str(error), "Export the instance again from the modality or archive that created it."
            ) from error
    return header, facts


def pixel_data_facts(path: Path) -> PixelDataFacts | None:
    """Return the layout of the Pixel Data of a file, or None when it has none."""
    return read_header_and_facts(path)[1]


def read_native_frame(path: Path, facts: PixelDataFacts, geometry: ImageGeometry, index: int = 0) -> bytes:
    """Read the bytes of one native frame, for the Planar Configuration check."""
    frame_length = geometry.frame_bits // 8
    with open(path, "rb") as stream:
        stream.seek(facts.value_offset + index * frame_length)
        return stream.read(frame_length)


# -- Header checks ------------------------------------------------------------------


def image_geometry(ds: Dataset) -> ImageGeometry:
    """Return the Image Pixel values of `ds`, or raise when one is missing or invalid."""
    values = {}
    for keyword, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("SamplesPerPixel", "(0028,0002)"),
        ("BitsAllocated", "(0028,0100)"),
    ):
        value = ds.get(keyword)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PreparationError(
                f"{keyword} {tag} is missing, not a single value or not positive",
                "Export the instance again from the modality or archive that created it.",
            )
        values[keyword] = value

    raw_frames = ds.get("NumberOfFrames")
    try:
        declared_frames = 1 if raw_frames in (None, "") else int(raw_frames)
    except (TypeError, ValueError):
        raise PreparationError(
            "Number of Frames (0028,0008) is not an integer",
            "Export the instance again from the modality or archive that created it.",
        ) from None
    if declared_frames < 1:
        raise PreparationError(
            "Number of Frames (0028,0008) is below 1",
            "Export the instance again from the modality or archive that created it.",
        )

    return ImageGeometry(
        rows=values["Rows"],
        columns=values["Columns"],
        samples_per_pixel=values["SamplesPerPixel"],
        bits_allocated=values["BitsAllocated"],
        photometric=str(ds.get("PhotometricInterpretation", "")),
        declared_frames=declared_frames,
    )


def count_complete_frames(facts: PixelDataFacts, geometry: ImageGeometry) -> int:
    """Return how many whole frames the Pixel Data holds; a partial frame is not counted."""
    if not facts.encapsulated:
        return (facts.available_length * 8) // geometry.frame_bits

    fragments = len(facts.fragment_lengths)
    if fragments == 0:
        return 0
    if facts.transfer_syntax == RLELossless:
        # RLE Lossless puts each frame in exactly one fragment.
        return fragments

    if fragments == geometry.declared_frames:
        starts = [True] * fragments
    else:
        starts = [head.startswith(_CODESTREAM_STARTS) for head in facts.fragment_heads]
        starts[0] = True
    frames = sum(starts)

    if facts.truncated or facts.delimiter_missing:
        # The file ends inside Pixel Data, so the last frame may have lost fragments.
        # It counts only when its last fragment ends with the codestream end marker.
        last_tail = facts.fragment_tails[-1].rstrip(b"\x00")
        if not last_tail.endswith(_CODESTREAM_END):
            frames -= 1
    return frames


# -- Repairs ------------------------------------------------------------------------


def repair_frame_count(ds: Dataset, facts: PixelDataFacts, geometry: ImageGeometry) -> tuple[list[str], int]:
    """Keep the complete frames when fewer than declared; return repairs and frame count.

    Sending the complete frames keeps a usable loop on the PACS when a transfer or an
    export was cut short. Number of Frames is set to their count, and the instance is
    derived (the caller gives it a new SOP Instance UID), so a later complete copy
    never collides with it. An instance with no complete frame is rejected.
    """
    repairs: list[str] = []
    complete = count_complete_frames(facts, geometry)
    declared = geometry.declared_frames

    if complete == 0:
        raise PreparationError(
            "Pixel Data (7FE0,0010) contains no complete frame"
            + (": the file ends inside it" if facts.truncated else ""),
            "Send the instance again from the modality or archive that created it.",
        )
    if complete < declared:
        ds.NumberOfFrames = complete
        repairs.append("Number of Frames set to the count of complete frames in Pixel Data")
        if facts.truncated:
            repairs.append("incomplete last frame of Pixel Data left out")
        return repairs, complete

    if facts.encapsulated and facts.delimiter_missing and not facts.truncated:
        repairs.append("Sequence Delimitation Item added after the Pixel Data fragments")
    elif facts.truncated:
        repairs.append("bytes after the declared frames of the cut Pixel Data left out")
    return repairs, declared


def repair_odd_lengths(facts: PixelDataFacts) -> list[str]:
    """Report odd-length Pixel Data or fragments, which the writer pads to even length."""
    repairs = []
    if not facts.encapsulated and facts.available_length % 2:
        repairs.append("Pixel Data padded to even length")
    if any(length % 2 for length in facts.fragment_lengths):
        repairs.append("Pixel Data fragments padded to even length")
    return repairs


def repair_single_frame_class(ds: Dataset, frame_count: int) -> list[str]:
    """Move a multi-frame instance out of a single-frame SOP class, or reject it.

    Ultrasound Image Storage (current or retired) becomes Ultrasound Multi-frame Image
    Storage. Its Frame Increment Pointer is Type 1 there, so it points at Frame Time or
    Frame Time Vector when present. Without either, the frames have no known timing, so
    it points at a new Frame Label Vector that numbers the frames: dciodvfy accepts that
    with a warning, and no frame time is invented.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if frame_count <= 1 or sop_class not in SINGLE_FRAME_CLASSES:
        return []
    if sop_class not in (US_IMAGE_STORAGE, US_IMAGE_STORAGE_RETIRED):
        raise PreparationError(
            f"SOP Class UID (0008,0016) {sop_class} ({SINGLE_FRAME_CLASSES[sop_class]}) "
            "allows one frame, but Pixel Data holds several",
            "Export the frames as separate instances, or in a multi-frame SOP class, "
            "from the modality or archive that created them.",
        )

    repairs = ["SOP Class UID changed to Ultrasound Multi-frame Image Storage"]
    ds.SOPClassUID = UID(US_MULTIFRAME_IMAGE_STORAGE)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "MediaStorageSOPClassUID" in file_meta:
        file_meta.MediaStorageSOPClassUID = UID(US_MULTIFRAME_IMAGE_STORAGE)
        repairs.append("Media Storage SOP Class UID changed to Ultrasound Multi-frame Image Storage")

    if "FrameIncrementPointer" not in ds:
        if "FrameTime" in ds:
            ds.FrameIncrementPointer = Tag("FrameTime")
        elif "FrameTimeVector" in ds:
            ds.FrameIncrementPointer = Tag("FrameTimeVector")
        else:
            ds.FrameLabelVector = [str(number) for number in range(1, frame_count + 1)]
            ds.FrameIncrementPointer = Tag("FrameLabelVector")
            repairs.append("Frame Label Vector added to number the frames")
        repairs.append("Frame Increment Pointer added")
    return repairs


def detect_planar_configuration(frame: bytes, geometry: ImageGeometry, little_endian: bool = True) -> int | None:
    """Return the Planar Configuration that a native 3-sample frame shows, or None.

    Both readings of the bytes are built, by pixel (0) and by plane (1), and the mean
    absolute difference between neighbouring samples of the same channel is measured.
    Real images are smooth, and the wrong reading mixes samples of distant pixels or of
    other channels, so it is rougher. None means the readings are too close to tell,
    for example in a flat frame.
    """
    if geometry.bits_allocated not in (8, 16):
        return None
    if geometry.bits_allocated == 8:
        dtype = np.dtype(np.uint8)
    else:
        dtype = np.dtype("<u2" if little_endian else ">u2")
    samples = np.frombuffer(frame, dtype=dtype)
    expected = geometry.rows * geometry.columns * 3
    if samples.size < expected:
        return None
    samples = samples[:expected].astype(np.int32)

    by_pixel = samples.reshape(geometry.rows, geometry.columns, 3)
    by_plane = samples.reshape(3, geometry.rows, geometry.columns).transpose(1, 2, 0)
    roughness_by_pixel = _roughness(by_pixel)
    roughness_by_plane = _roughness(by_plane)

    if roughness_by_plane * _PLANAR_MARGIN < roughness_by_pixel:
        return 1
    if roughness_by_pixel * _PLANAR_MARGIN < roughness_by_plane:
        return 0
    return None


def _roughness(image: np.ndarray) -> float:
    """Return the mean absolute difference between neighbours along rows and columns."""
    across = np.abs(np.diff(image, axis=1)).mean() if image.shape[1] > 1 else 0.0
    down = np.abs(np.diff(image, axis=0)).mean() if image.shape[0] > 1 else 0.0
    return float(across + down)


def repair_planar_configuration(
    ds: Dataset, facts: PixelDataFacts, geometry: ImageGeometry, first_frame: bytes
) -> list[str]:
    """Set Planar Configuration to the layout of native RGB or YBR_FULL data.

    Encapsulated data is left alone: its codestream sets the layout, and the writer
    sets the attribute for the transfer syntax it writes.
    """
    if facts.encapsulated or geometry.samples_per_pixel != 3:
        return []
    if geometry.photometric not in ("RGB", "YBR_FULL"):
        return []

    little_endian = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
    detected = detect_planar_configuration(first_frame, geometry, little_endian)
    declared = ds.get("PlanarConfiguration")
    if detected is None:
        if declared is None:
            ds.PlanarConfiguration = 0
            return ["Planar Configuration added with 0, the usual layout"]
        return []
    if declared is None:
        ds.PlanarConfiguration = detected
        return ["Planar Configuration added to match the pixel data layout"]
    if declared != detected:
        ds.PlanarConfiguration = detected
        return ["Planar Configuration corrected to match the pixel data layout"]
    return []


def repair_stray_items(ds: Dataset) -> list[str]:
    """Remove Item and delimiter tags (group FFFE) found among the top-level elements.

    Such a tag only belongs inside a sequence or encapsulated Pixel Data. At the top
    level it is what is left of a sequence whose header was lost, has no VR, and stops
    pydicom from reading or writing the data set, so it cannot be sent as it is.
    """
    # Iterating the Dataset itself would convert each element and fail on the stray one.
    stray = [tag for tag in ds.keys() if tag.group == 0xFFFE]  # noqa: SIM118
    for tag in stray:
        del ds[tag]
    return ["stray Item (FFFE,E000) removed from the top level"] if stray else []


def replacement_uid(old: str) -> str:
    """Return the deterministic '2.25.' UID that replaces a UID over 64 characters."""
    digest = hashlib.sha256(("uid-too-long|" + old).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def repair_long_uids(ds: Dataset) -> tuple[list[str], dict[str, str]]:
    """Replace every UI value over 64 characters, in sequences and File Meta too.

    Returns the repairs and the mapping from old to new UID. Rejects a long class or
    transfer syntax UID, because no replacement could name the same class.
    """
    mapping: dict[str, str] = {}
    changed: list[str] = []
    _replace_long_uids(ds, mapping, changed)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        _replace_long_uids(file_meta, mapping, changed)

    repairs = [f"{name} replaced: UID longer than 64 characters" for name in dict.fromkeys(changed)]
    return repairs, mapping


def _replace_long_uids(ds: Dataset, mapping: dict[str, str], changed: list[str]) -> None:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _replace_long_uids(item, mapping, changed)
            continue
        if element.VR != "UI" or element.value is None:
            continue

        values = [element.value] if isinstance(element.value, str) else list(element.value)
        if all(len(value) <= MAX_UID_LENGTH for value in values):
            continue
        name = element.keyword or str(element.tag)
        if element.keyword in _CLASS_UID_KEYWORDS:
            raise PreparationError(
                f"{name} {element.tag} is longer than 64 characters and names a class, so it cannot be replaced",
                "Correct the modality's configuration and send the instance again.",
            )
        new_values = []
        for value in values:
            if len(value) > MAX_UID_LENGTH:
                mapping.setdefault(value, replacement_uid(value))
                value = mapping[value]
            new_values.append(value)
        element.value = new_values[0] if isinstance(element.value, str) else new_values
        changed.append(name)


# -- All rules ----------------------------------------------------------------------


def repair_header(ds: Dataset, facts: PixelDataFacts | None, first_frame: bytes | None = None) -> RepairResult:
    """Apply every rule to a header; `first_frame` is needed for native 3-sample data."""
    result = RepairResult()
    result.repairs += repair_stray_items(ds)
    if facts is not None:
        geometry = image_geometry(ds)
        repairs, frame_count = repair_frame_count(ds, facts, geometry)
        result.repairs += repairs
        result.frame_count = frame_count
        if frame_count < geometry.declared_frames:
            result.conversions.append("frames-dropped")

        result.repairs += repair_odd_lengths(facts)

        class_repairs = repair_single_frame_class(ds, frame_count)
        if class_repairs:
            result.repairs += class_repairs
            result.conversions.append("multi-frame-class")

        if first_frame is not None:
            result.repairs += repair_planar_configuration(ds, facts, geometry, first_frame)

    uid_repairs, result.uid_map = repair_long_uids(ds)
    result.repairs += uid_repairs
    if uid_repairs:
        result.conversions.append("uid-too-long")
    return result


def repair_file(path: Path) -> tuple[Dataset, PixelDataFacts | None, RepairResult]:
    """Read a file's header and Pixel Data layout and apply every rule to the header."""
    header, facts = read_header_and_facts(path)
    first_frame = None
    if facts is not None and not facts.encapsulated and header.get("SamplesPerPixel") == 3:
        first_frame = read_native_frame(path, facts, image_geometry(header))
    return header, facts, repair_header(header, facts, first_frame)
