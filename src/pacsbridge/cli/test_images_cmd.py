"""The `pacsbridge test-images` command: write a synthetic ultrasound test study."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydicom import dcmread
from pydicom.uid import UID

from pacsbridge.cli.app import app
from pacsbridge.ingest.testimages import LOOP_FRAME_COUNT, TEST_DATA_LABEL, write_test_study

LOGGER = logging.getLogger(__name__)

_HELP = (
    "Write a synthetic ultrasound test study to OUTDIR: a B-mode still, a color Doppler still "
    f"and a {LOOP_FRAME_COUNT}-frame B-mode loop, marked {TEST_DATA_LABEL}.\n\n"
    "Prints one tab-separated line per file: path, SOP class, number of frames and "
    "SOP Instance UID. Files of an earlier run in OUTDIR are overwritten. "
    "Exits with 1 if OUTDIR cannot be created or written."
)


@app.command("test-images", help=_HELP)
def test_images(
    outdir: Annotated[
        Path,
        typer.Argument(help="Folder to write the DICOM files to. It is created if missing."),
    ],
) -> None:
    """Write the test study and print one line per file."""
    try:
        paths = write_test_study(outdir)
    except OSError as error:
        LOGGER.debug("writing test images to %s failed", outdir, exc_info=True)
        typer.echo(
            f"error: failed to write test images to {outdir}: {_reason(error)}. "
            "Pass a folder that this user can create and write to.",
            err=True,
        )
        raise typer.Exit(code=1) from error

    for path in paths:
        typer.echo(_describe(path))


def _reason(error: OSError) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return "the path or one of its parents is a file, not a folder"
    return error.strerror or str(error)


def _describe(path: Path) -> str:
    """Format the output line of one written DICOM file."""
    ds = dcmread(path, stop_before_pixels=True)
    sop_class_name = UID(ds.SOPClassUID).name
    frames = int(ds.get("NumberOfFrames", 1))
    return f"{path}\t{sop_class_name}\tframes={frames}\t{ds.SOPInstanceUID}"
