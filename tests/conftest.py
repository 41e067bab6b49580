"""Fixtures shared by the tests: free ports, DCMTK peers and sample files."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SAMPLES = DATA / "samples"

# The ultrasound samples (of other vendors and toolkits) that are valid enough to send.
ULTRASOUND_SAMPLES = [
    "ExplVR_BigEnd.dcm",
    "JPEGExtended_3s_1f_u_08_08.dcm",
    "JPEGLosslessP14SV1_1s_1f_u_08_08.dcm",
    "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "US-PAL-8-10x-echo.dcm",
    "US-RGB-8-esopecho.dcm",
    "US1_J2KR.dcm",
    "US1_RLE.dcm",
    "US1_UNCR.dcm",
    "US_Philips_3EAF5680_8b_YBR_jpeg.dcm",
    "YBR_FULL-RLE.dcm",
    "color-px.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "orthanc-Issue16.dcm",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"peer exited with code {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package dcmtk or dicom3tools)")
    return path


class Storescp:
    """A DCMTK storescp process on a free loopback port, storing into its own folder."""

    def __init__(self, folder: Path, ae_title: str, port: int, process: subprocess.Popen) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port
        self.process = process

    def received(self) -> list[Path]:
        return sorted(path for path in self.folder.iterdir() if path.is_file())


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    """Start `storescp` with the given extra options; every process is stopped after the test."""
    binary = require_tool("storescp")
    processes: list[subprocess.Popen] = []

    def start(*options: str, ae_title: str = "STORESCP") -> Storescp:
        folder = tmp_path / f"storescp-{len(processes)}"
        folder.mkdir()
        port = free_port()
        process = subprocess.Popen(
            [binary, "--aetitle", ae_title, "--output-directory", str(folder), *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        wait_for_port(port, process)
        return Storescp(folder, ae_title, port, process)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def ultrasound_samples() -> list[Path]:
    return [SAMPLES / name for name in ULTRASOUND_SAMPLES]
