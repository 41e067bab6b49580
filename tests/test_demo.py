import subprocess
import sys

from pydicom import dcmread

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]


def test_demo_smoke_sends_worklist_patient(tmp_path):
    run = subprocess.run([*CLI, "demo", "--smoke", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Demo succeeded: 3 of 3 instances arrived intact." in run.stdout
    received = sorted((tmp_path / "sandbox-pacs").glob("*.dcm"))
    assert len(received) == 3
    for path in received:
        ds = dcmread(path)
        assert ds.AccessionNumber == "DEMOACC0001"
        assert ds.PatientID == "DEMO-0001"
        assert str(ds.PatientName) == "Müller^Zoë"


def test_demo_smoke_runs_twice_on_same_data_dir(tmp_path):
    for _ in range(2):
        run = subprocess.run([*CLI, "demo", "--smoke", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
