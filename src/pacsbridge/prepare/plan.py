"""Preparation settings of a PACS, and the transfer syntaxes to offer for each instance.

The plan is made from the file's header alone, before the association, so
that the presentation contexts can offer the configured transfer syntax
first and the uncompressed ones after it, as the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)

from pacsbridge.connections.settings import (
    DEFAULT_JPEG_QUALITY,
    Compression,
    ConnectionSettings,
    MonochromeMode,
)
from pacsbridge.prepare.frames import frame_count

UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
NATIVE_SYNTAXES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
# Transfer syntaxes whose pixel data may have lost information (PS3.5 Annex A).
LOSSY_SYNTAXES = frozenset(
    {
        UID("1.2.840.10008.1.2.4.50"),  # JPEG Baseline
        UID("1.2.840.10008.1.2.4.51"),  # JPEG Extended
        UID("1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
        UID("1.2.840.10008.1.2.4.91"),  # JPEG 2000
        UID("1.2.840.10008.1.2.4.93"),  # JPEG 2000 Part 2 multi-component
        UID("1.2.840.10008.1.2.4.203"),  # HTJ2K
        UID("1.2.840.10008.1.2.4.100"),  # MPEG2 and the video syntaxes after it
        UID("1.2.840.10008.1.2.4.101"),
        UID("1.2.840.10008.1.2.4.102"),
        UID("1.2.840.10008.1.2.4.103"),
        UID("1.2.840.10008.1.2.4.104"),
        UID("1.2.840.10008.1.2.4.105"),
        UID("1.2.840.10008.1.2.4.106"),
        UID("1.2.840.10008.1.2.4.107"),
        UID("1.2.840.10008.1.2.4.108"),
    }
)
COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"})


@dataclass(frozen=True)
class Preparation:
    """The form in which one PACS receives instances: compression, monochrome, time zone and character set.

    `timezone` and `character_set` None leave times and text as received;
    stored connections always set both.
    """

    image_compression: Compression = Compression.AS_RECEIVED
    loop_compression: Compression = Compression.AS_RECEIVED
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    monochrome: MonochromeMode = MonochromeMode.NEVER
    timezone: str | None = None
    character_set: str | None = None

    @classmethod
    def from_settings(cls, settings: ConnectionSettings) -> Preparation:
        return cls(
            image_compression=Compression(settings.image_compression),
            loop_compression=Compression(settings.loop_compression),
            jpeg_quality=int(settings.jpeg_quality),
            monochrome=MonochromeMode(settings.monochrome),
            timezone=settings.timezone,
            character_set=settings.character_set,
        )

    def compression_for(self, frames: int) -> Compression:
        return self.loop_compression if frames > 1 else self.image_compression

    def describe(self) -> str:
        parts = [
            f"images {self.image_compression.value}",
            f"loops {self.loop_compression.value}",
        ]
        if Compression.JPEG_BASELINE in (self.image_compression, self.loop_compression):
            parts.append(f"JPEG quality {self.jpeg_quality}")
        parts.append(f"monochrome {self.monochrome.value}")
        if self.timezone:
            parts.append(f"time zone {self.timezone}")
        if self.character_set:
            parts.append(f"character set {self.character_set}")
        return ", ".join(parts)


AS_RECEIVED = Preparation()


def is_lossy(header: Dataset, syntax: UID) -> bool:
    """Tell whether the pixel data has already been through lossy compression."""
    return str(header.get("LossyImageCompression", "")).strip() == "01" or syntax in LOSSY_SYNTAXES


def _eight_bit(header: Dataset) -> bool:
    return int(header.get("BitsAllocated", 0) or 0) == 8 and int(header.get("BitsStored", 8) or 8) <= 8


@dataclass(frozen=True)
class Candidates:
    """The transfer syntaxes to offer for one instance, best first, and why the first is what it is."""

    syntaxes: tuple[UID, ...]
    # The syntax the settings ask for, when it differs from the received one.
    wanted: UID | None = None
    # Why the wanted syntax differs from the configured compression, for the record.
    note: str | None = None


def _with_uncompressed(first: Sequence[UID], own: UID | None = None) -> tuple[UID, ...]:
    """Return `first`, then the uncompressed syntaxes, then `own`: the last resort for pixel data no decoder reads."""
    ordered: list[UID] = []
    for syntax in [*first, *UNCOMPRESSED_TARGETS, *([own] if own is not None else [])]:
        if syntax not in ordered:
            ordered.append(syntax)
    return tuple(ordered)


def candidates(header: Dataset, own: UID, has_pixels: bool, preparation: Preparation) -> Candidates:
    """Return the transfer syntaxes to offer for an instance whose header is `header`.

    As-received keeps the received syntax. Lossy data is never compressed
    again, lossily or losslessly, so it keeps its own syntax where accepted.
    JPEG Baseline takes 8-bit samples only, so deeper data goes as JPEG
    Lossless. Uncompressed syntaxes always follow as the fallback.
    """
    # Imported here: dicomnet imports this module, and plan must not import dicomnet at load time.
    from pacsbridge.dicomnet.syntaxes import syntaxes_to_propose

    if not has_pixels:
        return Candidates(tuple(syntaxes_to_propose(own)))
    # The repairs have checked Number of Frames of every instance with pixel data.
    compression = preparation.compression_for(frame_count(header))
    if compression == Compression.AS_RECEIVED:
        return Candidates(tuple(syntaxes_to_propose(own)))
    if compression == Compression.NONE:
        return Candidates(_with_uncompressed([ExplicitVRLittleEndian], own), ExplicitVRLittleEndian)
    if is_lossy(header, own):
        keep = [] if own in NATIVE_SYNTAXES else syntaxes_to_propose(own)[:2]
        if compression == Compression.JPEG_BASELINE and JPEGBaseline8Bit in keep:
            # JPEG Extended frames that use only the baseline process are relabelled, never re-encoded.
            keep = [JPEGBaseline8Bit, own]
        return Candidates(
            _with_uncompressed(keep),
            None,
            "already lossy: not compressed again",
        )
    if compression == Compression.JPEG_BASELINE and not _eight_bit(header):
        return Candidates(
            _with_uncompressed([JPEGLosslessSV1], own),
            JPEGLosslessSV1,
            f"{int(header.get('BitsStored', 0) or 0)}-bit samples do not fit JPEG Baseline: JPEG Lossless instead",
        )
    wanted = JPEGBaseline8Bit if compression == Compression.JPEG_BASELINE else JPEGLosslessSV1
    return Candidates(_with_uncompressed([wanted], own), wanted)
