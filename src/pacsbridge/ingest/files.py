"""Read and check DICOM Part-10 files before they are sent or stored.

Each file is checked on its own. A bad file gets a reason that names the file
and what is wrong, and it never stops the good files beside it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.ingest.pixel_layout import read_pixel_data_facts

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectedFile:
    path: Path
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}


class UnreadableFileError(ValueError):
    """Raised for a file that is not a readable DICOM Part-10 file."""


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Return the files named by `paths`, walking folders recursively in sorted order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


def _native_pixel_length(ds) -> int | None:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.SamplesPerPixel)
        bits = int(ds.BitsAllocated)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    pixels = rows * columns * frames
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        # Native YBR_FULL_422 stores two chroma samples per two pixels (PS3.3 C.7.6.3.1.2).
        return (pixels * 2 * bits + 7) // 8
    return (pixels * samples * bits + 7) // 8


def _value_text(value: object) -> str:
    """Show an element value in a message: "32768 and 0" for several values, "empty" for none."""
    if isinstance(value, MultiValue | list | tuple):
        items = [str(item) for item in value]
        if len(items) > 1:
            return ", ".join(items[:-1]) + " and " + items[-1]
        value = items[0] if items else None
    if value is None or value == "":
        return "empty"
    return str(value)


def _check_elements(ds: Dataset) -> None:
    """Decode every element once, so a malformed one is found before anything is sent."""
    try:
        ds.walk(lambda dataset, element: None)
    except (NotImplementedError, ValueError, KeyError, TypeError, OverflowError) as exc:
        # pydicom puts a traceback into some messages; its last line is the reason.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnreadableFileError(
            f"the file contains a malformed data element ({reason}); export it again from its source"
        ) from None


def inspect_file(path: Path) -> InstanceFile:
    """Read the header of `path`, check the layout of its pixel data, and return its identity.

    Raises `UnreadableFileError` with the reason. Pixel data is never loaded, so a
    1 GB loop costs no more memory than a still image.
    """
    if not path.exists():
        raise UnreadableFileError("file not found")
    try:
        with warnings.catch_warnings(record=True) as caught, path.open("rb") as stream:
            warnings.simplefilter("always")
            ds = dcmread(stream, stop_before_pixels=True)
            pixels = read_pixel_data_facts(stream, ds, os.fstat(stream.fileno()).st_size)
    except InvalidDicomError:
        raise UnreadableFileError(
            "not a DICOM Part-10 file (no 'DICM' prefix and File Meta Information); "
            "export it from the modality or PACS as a DICOM file"
        ) from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        # MalformedPixelDataError is a ValueError: items that break the encapsulation rules land here too.
        raise UnreadableFileError(
            f"not readable as DICOM ({exc}); the file is damaged or not DICOM: export it again from its source"
        ) from None

    truncation = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if (
        truncation
        or len(ds) == 0
        or (pixels is not None and pixels.encapsulated and (pixels.truncated or pixels.delimiter_missing))
    ):
        raise UnreadableFileError(
            "the file is truncated: it ends before its last data element; export it again from its source"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not syntax:
        raise UnreadableFileError("the File Meta Information has no Transfer Syntax UID")
    sop_class = ds.get("SOPClassUID")
    sop_instance = ds.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise UnreadableFileError(
            "the data set has no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018), and a File Meta "
            "header alone is not enough to send it; export it again from its source"
        )
    _check_elements(ds)

    if pixels is not None and not pixels.encapsulated:
        expected = _native_pixel_length(ds)
        actual = pixels.available_length
        if expected is None:
            values = "; ".join(
                f"{keyword} {_value_text(ds.get(keyword))}"
                for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")
                if keyword in ds
            )
            raise UnreadableFileError(
                f"the image pixel description is invalid ({values}); export the image again from its source"
            )
        if actual < expected:
            raise UnreadableFileError(
                f"the pixel data is truncated: {actual} bytes, {expected} expected from Rows, Columns, "
                "Samples per Pixel, Bits Allocated and Number of Frames; export it again from its source"
            )
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise UnreadableFileError(f"Number of Frames {ds.get('NumberOfFrames')!r} is not a number") from None
    return InstanceFile(
        path=path,
        sop_class_uid=str(sop_class),
        sop_instance_uid=str(sop_instance),
        transfer_syntax_uid=str(syntax),
        number_of_frames=frames,
    )


def find_duplicate_uids(instances: Iterable[InstanceFile]) -> dict[str, list[Path]]:
    """Return the SOP Instance UIDs carried by more than one file, with those files."""
    paths: dict[str, list[Path]] = {}
    for instance in instances:
        paths.setdefault(instance.sop_instance_uid, []).append(instance.path)
    return {uid: files for uid, files in paths.items() if len(files) > 1}


def collect_instances(paths: Iterable[Path]) -> tuple[list[InstanceFile], list[RejectedFile]]:
    """Inspect every file under `paths`; return the readable instances and the rejected files."""
    accepted: list[InstanceFile] = []
    rejected: list[RejectedFile] = []
    for path in expand_paths(paths):
        try:
            accepted.append(inspect_file(path))
        except UnreadableFileError as exc:
            LOGGER.info("rejected file %s: %s", path, exc)
            rejected.append(RejectedFile(path, str(exc)))
    return accepted, rejected
