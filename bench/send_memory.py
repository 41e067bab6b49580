"""Measure the peak memory of `pacsbridge store` sending a large loop to DCMTK storescp.

Run: .venv/bin/python bench/send_memory.py [--megabytes 900]

The loop is written frame by frame into a temporary folder, sent once as
received and once transcoded to JPEG Baseline, and deleted afterwards. Peak
memory is the maximum resident set size of the `pacsbridge store` process, as
the kernel reports it for that finished child (wait4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsbridge.ingest.testimages import doppler_like_loop
from pacsbridge.prepare.writer import serialize_header

ROWS, COLUMNS = 480, 640
FRAME_BYTES = ROWS * COLUMNS * 3


def write_loop(path: Path, frame_count: int) -> None:
    """Write an RGB Ultrasound Multi-frame Image of `frame_count` frames, one frame at a time."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientName = "Bench^Memory"
    ds.PatientID = "BENCH-MEM"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frame_count
    ds.FrameTime = 33.3
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    frames = doppler_like_loop(30, ROWS, COLUMNS, seed=11)
    with path.open("wb") as file:
        file.write(serialize_header(ds).before_pixel_data)
        file.write(b"\xe0\x7f\x10\x00OB\x00\x00")
        file.write((frame_count * FRAME_BYTES).to_bytes(4, "little"))
        for index in range(frame_count):
            file.write(frames[index % len(frames)].tobytes())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """Run `command` and return (seconds, peak RSS in MiB) of that child alone, from wait4."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if child.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=900, help="size of the loop to send (default 900)")
    args = parser.parse_args()
    if shutil.which("storescp") is None:
        sys.exit("storescp (DCMTK) is not on PATH")
    frame_count = max(1, args.megabytes * 1_000_000 // FRAME_BYTES)
    pacsbridge = str(Path(sys.executable).with_name("pacsbridge"))

    with tempfile.TemporaryDirectory(prefix="pacsbridge-bench-") as folder:
        loop = Path(folder) / "loop.dcm"
        write_loop(loop, frame_count)
        received = Path(folder) / "received"
        received.mkdir()
        port = free_port()
        scp = subprocess.Popen(
            ["storescp", "--aetitle", "PACS", "-od", str(received), "+xa", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            base = [pacsbridge, "store", "127.0.0.1", str(port), str(loop), "--calling-aet", "BENCH"]
            base += ["--called-aet", "PACS"]
            idle_seconds, idle_peak = peak_rss_of([pacsbridge, "--help"])
            rows = [("`pacsbridge --help` (imports only)", idle_seconds, idle_peak)]
            rows.append(("store, as received", *peak_rss_of(base)))
            rows.append(("store, JPEG Baseline", *peak_rss_of([*base, "--loop-compression", "jpeg-baseline"])))
        finally:
            scp.terminate()
            scp.wait(timeout=10)

    size_gb = frame_count * FRAME_BYTES / 1e9
    print(f"Loop: {frame_count} frames 640x480 RGB, {size_gb:.2f} GB, sent to storescp on 127.0.0.1")
    print()
    print("| Run | Seconds | Peak RSS MiB |")
    print("|---|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
