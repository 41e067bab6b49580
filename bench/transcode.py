"""Benchmark pacsbridge's JPEG transcoding against DCMTK dcmcjpeg on a synthetic ultrasound loop.

Run from the repository root:

    .venv/bin/python bench/transcode.py [--repeats 3] [--large-mb 1024] [--workers 2]

It writes a seeded 90-frame 640x480 RGB loop (Explicit VR Little Endian) to a temporary
folder and measures, for the same file, frames per second of:
- pacsbridge JPEG Baseline (quality 90) and JPEG Lossless SV1, with `--workers` threads,
- dcmcjpeg +eb +q 90 (Baseline) and dcmcjpeg +e1 (Lossless SV1),
each the median of `--repeats` runs, wall-clock, file reading and writing included.
It then writes a loop of about `--large-mb` MB frame by frame and reports the peak RSS
of a separate process that transcodes it to JPEG Baseline. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1, UltrasoundMultiFrameImageStorage

from pacsbridge.ingest.testimages import doppler_like_loop
from pacsbridge.prepare.pixels import PixelTarget, write_prepared

ROWS, COLUMNS, FRAMES = 480, 640, 90
SEED = 20240601
QUALITY = 90
# Distinct frames rendered for the large loop, which repeats them: rendering every frame
# of a gigabyte loop would take longer than transcoding it.
LARGE_LOOP_DISTINCT_FRAMES = 30


def render_frames(count: int, rows: int, columns: int, seed: int) -> np.ndarray:
    """Return `count` RGB frames of a colour Doppler-like loop: speckled sector, cyst, scale, flow."""
    return doppler_like_loop(count, rows, columns, seed)


def write_loop(path: Path, frame_source: np.ndarray, frame_count: int) -> int:
    """Write an Ultrasound Multi-frame Image of `frame_count` frames, cycling through `frame_source`.

    The header is written by pydicom and the Pixel Data element by hand, one frame at a
    time, so a loop larger than memory can be written. Returns the file size.
    """
    rows, columns = frame_source.shape[1:3]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1"
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = "2.25.1"
    ds.Modality = "US"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frame_count
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    length = rows * columns * 3 * frame_count
    with path.open("wb") as file:
        pydicom.dcmwrite(file, ds, enforce_file_format=True)
        file.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length + length % 2))
        for index in range(frame_count):
            file.write(frame_source[index % len(frame_source)].tobytes())
        if length % 2:
            file.write(b"\x00")
    return path.stat().st_size


def median_seconds(run, repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def ours(source: Path, output: Path, syntax, workers: int) -> None:
    header = pydicom.dcmread(source, stop_before_pixels=True)
    write_prepared(source, output, header, PixelTarget(syntax, quality=QUALITY), workers=workers)


def dcmcjpeg(source: Path, output: Path, *options: str) -> None:
    subprocess.run(["dcmcjpeg", *options, str(source), str(output)], check=True, capture_output=True)


def tracemalloc_peak(source: Path, output: Path, syntax, workers: int) -> int:
    tracemalloc.start()
    ours(source, output, syntax, workers)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def measure_child(source: str, output: str, workers: int) -> None:
    """Run in a fresh process: transcode `source` to JPEG Baseline and print peak RSS as JSON."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    ours(Path(source), Path(output), JPEGBaseline8Bit, workers)
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_before_kib": rss_before, "rss_peak_kib": rss_after, "seconds": seconds}))


def large_loop_memory(folder: Path, megabytes: int, workers: int) -> dict:
    free = shutil.disk_usage(folder).free
    frame_bytes = ROWS * COLUMNS * 3
    frame_count = max(1, megabytes * 1_000_000 // frame_bytes)
    if free < 2 * frame_count * frame_bytes:
        frame_count = max(1, free // (3 * frame_bytes))
    source = folder / "large.dcm"
    output = folder / "large-baseline.dcm"
    try:
        size = write_loop(source, render_frames(LARGE_LOOP_DISTINCT_FRAMES, ROWS, COLUMNS, SEED + 1), frame_count)
        result = subprocess.run(
            [sys.executable, __file__, "--measure-child", str(source), str(output), str(workers)],
            check=True,
            capture_output=True,
            text=True,
        )
        values = json.loads(result.stdout.strip().splitlines()[-1])
        values.update(frames=frame_count, file_bytes=size, output_bytes=output.stat().st_size)
        return values
    finally:
        source.unlink(missing_ok=True)
        output.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--workers", type=int, default=2, help="encoder threads of pacsbridge")
    parser.add_argument("--large-mb", type=int, default=1024, help="size of the memory-check loop in MB; 0 skips it")
    parser.add_argument("--measure-child", nargs=3, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure_child:
        source, output, workers = arguments.measure_child
        measure_child(source, output, int(workers))
        return
    if shutil.which("dcmcjpeg") is None:
        sys.exit("dcmcjpeg is not on PATH: install DCMTK (Debian package dcmtk) to compare against it")

    with tempfile.TemporaryDirectory(prefix="pacsbridge-bench-") as temporary:
        folder = Path(temporary)
        source = folder / "loop.dcm"
        write_loop(source, render_frames(FRAMES, ROWS, COLUMNS, SEED), FRAMES)
        runs = {
            "pacsbridge JPEG Baseline q90": lambda: ours(source, folder / "b.dcm", JPEGBaseline8Bit, arguments.workers),
            "dcmcjpeg +eb +q 90": lambda: dcmcjpeg(source, folder / "db.dcm", "+eb", "+q", str(QUALITY)),
            "pacsbridge JPEG Lossless SV1": lambda: ours(source, folder / "l.dcm", JPEGLosslessSV1, arguments.workers),
            "dcmcjpeg +e1": lambda: dcmcjpeg(source, folder / "dl.dcm", "+e1"),
        }
        seconds = {name: median_seconds(run, arguments.repeats) for name, run in runs.items()}
        sizes = {
            name: (folder / file).stat().st_size
            for name, file in zip(runs, ["b.dcm", "db.dcm", "l.dcm", "dl.dcm"], strict=True)
        }
        peaks = {
            "pacsbridge JPEG Baseline q90": tracemalloc_peak(source, folder / "b.dcm", JPEGBaseline8Bit, 2),
            "pacsbridge JPEG Lossless SV1": tracemalloc_peak(source, folder / "l.dcm", JPEGLosslessSV1, 2),
        }
        large = large_loop_memory(folder, arguments.large_mb, arguments.workers) if arguments.large_mb else None

    print(
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}"
    )
    print(f"Loop: {FRAMES} frames {COLUMNS}x{ROWS} RGB, Explicit VR Little Endian; median of {arguments.repeats} runs")
    print()
    print("| Encoder | Seconds | Frames/s | Output MB | tracemalloc peak MB |")
    print("|---|---:|---:|---:|---:|")
    for name, value in seconds.items():
        peak = f"{peaks[name] / 1e6:.1f}" if name in peaks else "-"
        print(f"| {name} | {value:.2f} | {FRAMES / value:.1f} | {sizes[name] / 1e6:.1f} | {peak} |")
    print()
    baseline = seconds["dcmcjpeg +eb +q 90"] / seconds["pacsbridge JPEG Baseline q90"]
    lossless = seconds["dcmcjpeg +e1"] / seconds["pacsbridge JPEG Lossless SV1"]
    print(f"Baseline speed-up over dcmcjpeg: {baseline:.1f}x (target 5x)")
    print(f"Lossless speed-up over dcmcjpeg: {lossless:.1f}x (target 1x)")
    if large:
        print()
        print(
            f"Large loop: {large['frames']} frames, {large['file_bytes'] / 1e9:.2f} GB in, "
            f"{large['output_bytes'] / 1e6:.0f} MB JPEG Baseline out in {large['seconds']:.1f} s; "
            f"peak RSS {large['rss_peak_kib'] / 1024:.0f} MiB "
            f"({large['rss_before_kib'] / 1024:.0f} MiB after imports)"
        )


if __name__ == "__main__":
    main()
