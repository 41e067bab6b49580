"""Detect colour frames that carry only grey content and convert them to MONOCHROME2.

Tolerance rule: a colour frame is grey when, in every pixel, the largest and the
smallest of its three channel values differ by at most `GREY_TOLERANCE_8BIT` (20 levels
of 255), scaled by 2**(bits_stored - 8) for deeper data. One pixel over the tolerance
keeps the whole frame in colour.

Why it is safe both ways: the figures below were measured with libjpeg-turbo 3.1
through imagecodecs 2026.3 on grey ultrasound frames of the sample files, and the tests
repeat these cases.
- Grey content stays grey: grey RGB frames encoded as JPEG Baseline with 4:4:4, 4:2:2 or
  4:2:0 chroma at quality 75 to 95 decode with all three channels equal (spread 0).
  With up to 3 levels of random noise added to each channel before the encoding, as an
  analogue video capture gives, the spread stays at or under 10, half the tolerance.
- Colour stays colour: after the same encodings, a 20x8 yellow mark keeps a spread of
  255, a 1-pixel green ECG trace at least 48, and a 1x4 red line at least 37. Doppler
  colour and colour maps are saturated, far above 20. A frame that is kept in colour
  only costs size, so the rule leans towards colour.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_color_lut

# Largest channel spread (max - min of R, G, B) of a grey pixel in 8-bit data.
GREY_TOLERANCE_8BIT = 20

# Rows checked per step, so a frame with colour near its top returns early.
_BAND_ROWS = 64

_RGB = "RGB"
_YBR = ("YBR_FULL", "YBR_FULL_422")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

_ULTRASOUND_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
}

# Image Pixel and related attributes that only describe colour data: palette
# descriptors and data (normal, large and segmented), alpha palette, Palette Color
# Lookup Table UID, ICC Profile and Color Space.
_COLOUR_ONLY_TAGS = (
    0x00281101,
    0x00281102,
    0x00281103,
    0x00281104,
    0x00281111,
    0x00281112,
    0x00281113,
    0x00281199,
    0x00281201,
    0x00281202,
    0x00281203,
    0x00281204,
    0x00281211,
    0x00281212,
    0x00281213,
    0x00281221,
    0x00281222,
    0x00281223,
    0x00282000,
    0x00282002,
)


def grey_tolerance(bits_stored: int = 8) -> int:
    """Return the largest channel spread of a grey pixel for data of `bits_stored` bits."""
    return GREY_TOLERANCE_8BIT << max(0, bits_stored - 8)


def frame_is_grey(frame: np.ndarray, photometric: str, bits_stored: int = 8) -> bool:
    """Return whether one decoded frame carries only grey content.

    `frame` has shape (rows, cols, 3) for RGB, YBR_FULL and YBR_FULL_422 (the latter
    decoded to full resolution but not converted to RGB). MONOCHROME frames are grey
    by definition. For YBR data both chroma channels must stay within half the
    tolerance of their mid value, because a chroma offset d makes an RGB spread of
    about 2.1 d. A uint16 frame whose `bits_stored` is not given is checked with the
    8-bit tolerance, which can only keep more frames in colour.
    """
    if photometric in _MONOCHROME:
        return True
    if photometric != _RGB and photometric not in _YBR:
        raise ValueError(
            f"Photometric Interpretation {photometric!r} is not supported by the grey "
            "check; pass RGB, YBR_FULL or YBR_FULL_422 frames, or expand PALETTE COLOR "
            "with palette_is_grey() first"
        )
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"a {photometric} frame must have shape (rows, cols, 3), not {frame.shape}")

    tolerance = grey_tolerance(bits_stored)
    for start in range(0, frame.shape[0], _BAND_ROWS):
        band = frame[start : start + _BAND_ROWS]
        if photometric == _RGB:
            if _max_channel_spread(band) > tolerance:
                return False
        elif _max_chroma_offset(band, bits_stored) > tolerance // 2:
            return False
    return True


def _max_channel_spread(band: np.ndarray) -> int:
    """Return the largest max-minus-min of the three channels over all pixels."""
    red, green, blue = band[..., 0], band[..., 1], band[..., 2]
    # Unsigned subtraction is safe because the maximum is never below the minimum.
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return int(spread.max())


def _max_chroma_offset(band: np.ndarray, bits_stored: int) -> int:
    """Return the largest distance of Cb or Cr from the mid value of the range."""
    middle = 1 << (bits_stored - 1)
    chroma = band[..., 1:].astype(np.int32)
    return int(np.abs(chroma - middle).max())


def source_is_grey(frames: Iterable[np.ndarray], photometric: str, bits_stored: int = 8) -> bool:
    """Return whether every frame of an image or loop is grey.

    Stops decoding at the first colour frame when `frames` is a generator. A source
    with no frames returns False, so nothing is converted.
    """
    seen_frame = False
    for frame in frames:
        seen_frame = True
        if not frame_is_grey(frame, photometric, bits_stored):
            return False
    return seen_frame


def palette_is_grey(ds: Dataset) -> bool:
    """Return whether every entry of the PALETTE COLOR lookup table is grey.

    PALETTE COLOR images are treated as colour unless the whole table is grey,
    because the table, not the pixel indices, is what the modality chose to
    show. Entries that no pixel uses still count: that keeps the result a property
    of the header, the same for every frame of a loop. The tolerance is that of
    `frame_is_grey`, scaled to the bit depth of the table entries.
    """
    descriptor = ds.RedPaletteColorLookupTableDescriptor
    entries = descriptor[0] or 65536
    first_index = descriptor[1]
    entry_bits = descriptor[2]
    index_dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    indices = np.arange(first_index, first_index + entries).astype(index_dtype)
    table = apply_color_lut(indices, ds)
    return _max_channel_spread(table) <= grey_tolerance(entry_bits)


def to_monochrome(frame: np.ndarray, photometric: str = _RGB) -> np.ndarray:
    """Convert one grey colour frame to one channel of the same dtype.

    RGB uses the luminance weights of ITU-R BT.601 (0.299, 0.587, 0.114), which
    also give the Y of the YBR_FULL encodings, so a grey frame keeps its values. For
    YBR frames the Y channel is the result. MONOCHROME frames are returned as they
    are.
    """
    if photometric in _MONOCHROME or frame.ndim == 2:
        return frame
    if photometric in _YBR:
        return np.ascontiguousarray(frame[..., 0])

    # Integer weights in thousandths keep uint16 data exact: 65535 * 1000 fits in uint32.
    wide = frame.astype(np.uint32)
    luminance = wide[..., 0] * 299 + wide[..., 1] * 587 + wide[..., 2] * 114
    luminance += 500
    luminance //= 1000
    return luminance.astype(frame.dtype)


def monochrome_attributes(ds: Dataset) -> list[str]:
    """Set the Image Pixel attributes of `ds` for one-sample MONOCHROME2 pixel data.

    Sets Samples per Pixel to 1 and Photometric Interpretation to MONOCHROME2,
    removes Planar Configuration and every palette, ICC Profile and Color Space
    attribute, and sets Ultrasound Color Data Present to 0 where it is present or
    the SOP class is an ultrasound class (in which it is Type 3, but it shows a viewer
    that no colour is left). Bits Allocated, Bits Stored and High Bit stay as they
    are: the caller keeps the sample depth. Returns the changes as short
    descriptions that name elements, never values.
    """
    changes = [
        "Samples per Pixel set to 1",
        "Photometric Interpretation set to MONOCHROME2",
    ]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"

    if "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
        changes.append("Planar Configuration removed")

    removed = [tag for tag in _COLOUR_ONLY_TAGS if tag in ds]
    for tag in removed:
        del ds[tag]
    if removed:
        changes.append("palette, ICC Profile and Color Space attributes removed")

    is_ultrasound = str(ds.get("SOPClassUID", "")) in _ULTRASOUND_CLASSES
    if "UltrasoundColorDataPresent" in ds or is_ultrasound:
        ds.UltrasoundColorDataPresent = 0
        changes.append("Ultrasound Color Data Present set to 0")
    return changes
