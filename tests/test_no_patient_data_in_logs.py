"""Patient names, IDs and birth dates must never reach the logs, even at DEBUG."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from conftest import SAMPLES
from fake_peers import storage_peer

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]
PATIENT_NAME = "Zzyzx^Quintessa"
PATIENT_ID = "PID-8842-SECRET"
BIRTH_DATE = "19770707"


@pytest.fixture
def identifiable_file(tmp_path: Path) -> Path:
    ds = dcmread(SAMPLES / "US1_UNCR.dcm")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    path = tmp_path / "identifiable.dcm"
    ds.save_as(path)
    return path


def assert_no_patient_data(text: str) -> None:
    for secret in (PATIENT_NAME, "Zzyzx", "Quintessa", PATIENT_ID, BIRTH_DATE):
        assert secret not in text, f"{secret!r} appeared in the log"


def test_store_debug_log_has_no_patient_data(identifiable_file):
    env = {**os.environ, "PACSBRIDGE_LOG_LEVEL": "DEBUG"}
    with storage_peer(status_for=lambda ds: 0xB000) as port:
        run = subprocess.run(
            [*CLI, "store", "127.0.0.1", str(port), str(identifiable_file), "--calling-aet", "PB", "--called-aet", "X"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert run.returncode == 0, run.stderr
    assert "C-STORE" in run.stderr  # the log is really on
    assert_no_patient_data(run.stderr)
