"""`pacsbridge archives`, `upload` and `studies` through Typer's CliRunner, and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from typer.testing import CliRunner, Result

import pacsbridge.cli.main  # noqa: F401  (registers every command on the app)
from conftest import SAMPLES
from pacsbridge.cli.app import app
from pacsbridge.ingest.archives import unsecured_reason
from pacsbridge.ingest.testimages import write_test_study

# Keep a developer's own configuration out of the tests.
runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None})
PACS_OPTIONS = ["--kind", "pacs", "--host", "127.0.0.1", "--port", "11112", "--calling-aet", "POCUS01"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)])


def run_ok(data_dir: Path, *args: str) -> Result:
    result = run(data_dir, *args)
    assert result.exit_code == 0, result.output
    return result


def add_pacs(data_dir: Path, name: str, *options: str) -> None:
    run_ok(data_dir, "connections", "add", name, *PACS_OPTIONS, "--called-aet", "PACS", *options)


@pytest.fixture
def linked(data_dir: Path) -> Path:
    """Archive 'Cardiology' linked to 'PACS TLS' (encryption-only) in slot 1 and 'PACS Plain' (no TLS) in slot 2."""
    run_ok(data_dir, "archives", "create", "Cardiology")
    add_pacs(data_dir, "PACS TLS", "--tls", "encryption-only")
    add_pacs(data_dir, "PACS Plain")
    run_ok(data_dir, "archives", "link", "Cardiology", "PACS TLS")
    run_ok(data_dir, "archives", "link", "Cardiology", "PACS Plain", "--slot", "2")
    return data_dir


def study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# archives ------------------------------------------------------------------------------


def test_archives_create_list_show(data_dir: Path) -> None:
    created = run_ok(data_dir, "archives", "create", "Sandbox", "--test")
    listed = json.loads(run_ok(data_dir, "archives", "list", "--json").stdout)
    shown = json.loads(run_ok(data_dir, "archives", "show", "Sandbox", "--json").stdout)

    assert "Created test archive 'Sandbox'" in created.stdout
    assert [(item["name"], item["is_test"], item["links"]) for item in listed] == [("Sandbox", True, [])]
    assert shown["name"] == "Sandbox"
    assert shown["studies"] == 0


def test_archives_create_duplicate_exits_2(data_dir: Path) -> None:
    run_ok(data_dir, "archives", "create", "Cardiology")

    result = run(data_dir, "archives", "create", "Cardiology")

    assert result.exit_code == 2
    assert "error: archive name 'Cardiology' is already used" in result.stderr


def test_archives_show_links_security(linked: Path) -> None:
    shown = json.loads(run_ok(linked, "archives", "show", "Cardiology", "--json").stdout)
    text = run_ok(linked, "archives", "show", "Cardiology").stdout

    assert [(link["slot"], link["connection"], link["security"]) for link in shown["links"]] == [
        (1, "PACS TLS", "secured"),
        (2, "PACS Plain", "unsecured"),
    ]
    assert "PACS Plain" in text
    assert "unsecured" in text


def test_archives_link_unsecured_prints_note(data_dir: Path) -> None:
    run_ok(data_dir, "archives", "create", "Cardiology")
    add_pacs(data_dir, "PACS Plain")

    result = run_ok(data_dir, "archives", "link", "Cardiology", "PACS Plain")

    assert "in slot 1" in result.stdout
    assert "only test studies are sent to it" in result.stderr


def test_archives_link_rule_violations_exit_2(linked: Path) -> None:
    add_pacs(linked, "PACS Three")
    add_pacs(linked, "PACS Four")
    run_ok(linked, "connections", "add", "Worklist", *PACS_OPTIONS[2:], "--kind", "mwl", "--called-aet", "MWL")
    run_ok(linked, "archives", "link", "Cardiology", "PACS Three")

    fourth = run(linked, "archives", "link", "Cardiology", "PACS Four")
    worklist = run(linked, "archives", "link", "Cardiology", "Worklist")
    twice = run(linked, "archives", "link", "Cardiology", "PACS TLS")
    out_of_range = run(linked, "archives", "link", "Cardiology", "PACS Four", "--slot", "4")

    assert fourth.exit_code == 2
    assert "already links 3 PACS" in fourth.stderr
    assert "'PACS Three'" in fourth.stderr
    assert worklist.exit_code == 2
    assert "Modality Worklist" in worklist.stderr
    assert twice.exit_code == 2
    assert "already linked" in twice.stderr
    assert out_of_range.exit_code == 2


def test_archives_unknown_names_exit_1(linked: Path) -> None:
    archive = run(linked, "archives", "link", "Radiology", "PACS TLS")
    connection = run(linked, "archives", "link", "Cardiology", "PACS Z")
    show = run(linked, "archives", "show", "Radiology")

    assert archive.exit_code == 1
    assert "archive 'Radiology' not found" in archive.stderr
    assert connection.exit_code == 1
    assert "connection 'PACS Z' not found" in connection.stderr
    assert show.exit_code == 1


def test_archives_unlink(linked: Path) -> None:
    result = run_ok(linked, "archives", "unlink", "Cardiology", "--slot", "2")
    empty = run(linked, "archives", "unlink", "Cardiology", "--slot", "2")

    assert "Unlinked PACS 'PACS Plain' from slot 2" in result.stdout
    assert empty.exit_code == 2
    shown = json.loads(run_ok(linked, "archives", "show", "Cardiology", "--json").stdout)
    assert [link["slot"] for link in shown["links"]] == [1]


# upload ------------------------------------------------------------------------------


def test_upload_round_trip(linked: Path, tmp_path: Path) -> None:
    test_study = write_test_study(tmp_path / "test-study")
    real = SAMPLES / "US1_UNCR.dcm"

    result = run(linked, "upload", "--archive", "Cardiology", str(test_study[0].parent), str(real), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["counts"]["accepted"] == 4
    by_name = {Path(file["path"]).name: file for file in data["files"]}
    assert by_name["US1_UNCR.dcm"]["deliveries"] == {"PACS TLS": "queued", "PACS Plain": "needs-attention"}
    assert by_name["US1_UNCR.dcm"]["delivery_reasons"] == {"PACS Plain": unsecured_reason("PACS Plain")}
    assert by_name[test_study[0].name]["deliveries"] == {"PACS TLS": "queued", "PACS Plain": "queued"}

    studies = json.loads(run_ok(linked, "studies", "list", "--json").stdout)
    states = {item["study_instance_uid"]: {d["connection"]: d["state"] for d in item["destinations"]} for item in studies}
    assert states[study_uid(real)] == {"PACS TLS": "in progress", "PACS Plain": "needs attention"}
    assert states[study_uid(test_study[0])] == {"PACS TLS": "in progress", "PACS Plain": "in progress"}


def test_upload_text_lines_and_exit_1(linked: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n")
    good = SAMPLES / "US1_RLE.dcm"

    result = run(linked, "upload", "--archive", "Cardiology", str(good), str(text_file))

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    sop_uid = str(dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    assert f"accepted: {good}, SOP Instance UID {sop_uid}" in lines
    assert any(line.startswith(f"rejected: {text_file}: not a DICOM Part-10 file") for line in lines)
    assert "1 accepted, 0 duplicate, 0 need attention, 1 rejected" in result.stdout


def test_upload_duplicate_exits_0(linked: Path) -> None:
    sample = str(SAMPLES / "US1_RLE.dcm")
    run_ok(linked, "upload", "--archive", "Cardiology", sample)

    result = run(linked, "upload", "--archive", "Cardiology", sample)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("duplicate: ")


def test_upload_changed_version_exits_1(linked: Path, tmp_path: Path) -> None:
    dataset = dcmread(SAMPLES / "US1_RLE.dcm")
    dataset.SeriesDescription = "edited"
    changed = tmp_path / "changed.dcm"
    dataset.save_as(changed)
    run_ok(linked, "upload", "--archive", "Cardiology", str(SAMPLES / "US1_RLE.dcm"))

    result = run(linked, "upload", "--archive", "Cardiology", str(changed))

    assert result.exit_code == 1
    assert result.stdout.startswith("needs-attention: ")


def test_upload_missing_path_exits_2(linked: Path, tmp_path: Path) -> None:
    result = run(linked, "upload", "--archive", "Cardiology", str(SAMPLES / "US1_RLE.dcm"), str(tmp_path / "gone"))

    assert result.exit_code == 2
    assert "not found" in result.stderr
    studies = json.loads(run_ok(linked, "studies", "list", "--json").stdout)
    assert studies == []


def test_upload_unknown_archive_exits_1(data_dir: Path) -> None:
    result = run(data_dir, "upload", "--archive", "Radiology", str(SAMPLES / "US1_RLE.dcm"))

    assert result.exit_code == 1
    assert "archive 'Radiology' not found" in result.stderr


def test_upload_without_links_prints_note(data_dir: Path) -> None:
    run_ok(data_dir, "archives", "create", "Cardiology")

    result = run_ok(data_dir, "upload", "--archive", "Cardiology", str(SAMPLES / "US1_RLE.dcm"))

    assert "links no PACS" in result.stderr


# studies -------------------------------------------------------------------------------


def test_studies_resend_after_link(linked: Path) -> None:
    sample = SAMPLES / "US1_RLE.dcm"
    run_ok(linked, "upload", "--archive", "Cardiology", str(sample))
    add_pacs(linked, "PACS Late", "--tls", "encryption-only")
    link = run_ok(linked, "archives", "link", "Cardiology", "PACS Late")
    assert "not sent to 'PACS Late'" in link.stderr

    before = json.loads(run_ok(linked, "studies", "list", "--archive", "Cardiology", "--json").stdout)
    result = run_ok(linked, "studies", "resend", study_uid(sample), "--connection", "PACS Late")
    after = json.loads(run_ok(linked, "studies", "list", "--json").stdout)

    assert {d["connection"]: d["state"] for d in before[0]["destinations"]}["PACS Late"] == "not queued"
    assert "'PACS Late': 1 delivery created" in result.stdout
    assert {d["connection"]: d["counts"] for d in after[0]["destinations"]}["PACS Late"] == {"queued": 1}


def test_studies_resend_errors(linked: Path) -> None:
    sample = SAMPLES / "US1_RLE.dcm"
    run_ok(linked, "upload", "--archive", "Cardiology", str(sample))
    add_pacs(linked, "PACS Other")

    unknown_study = run(linked, "studies", "resend", "1.2.3.4")
    unknown_connection = run(linked, "studies", "resend", study_uid(sample), "--connection", "PACS Z")
    not_linked = run(linked, "studies", "resend", study_uid(sample), "--connection", "PACS Other")

    assert unknown_study.exit_code == 1
    assert "study '1.2.3.4' not found" in unknown_study.stderr
    assert unknown_connection.exit_code == 1
    assert not_linked.exit_code == 2
    assert "'PACS Other' is not linked" in not_linked.stderr


def test_studies_list_text(linked: Path) -> None:
    sample = SAMPLES / "US1_RLE.dcm"
    run_ok(linked, "upload", "--archive", "Cardiology", str(sample))

    result = run_ok(linked, "studies", "list")

    lines = result.stdout.splitlines()
    assert lines[0].startswith("STUDY INSTANCE UID")
    assert any("PACS TLS" in line and "in progress (1 queued)" in line for line in lines)
    assert any("PACS Plain" in line and "needs attention (1 needs-attention)" in line for line in lines)


def test_studies_list_unknown_archive_exits_1(data_dir: Path) -> None:
    result = run(data_dir, "studies", "list", "--archive", "Radiology")

    assert result.exit_code == 1


def test_upload_debug_log_has_no_patient_data(linked: Path, tmp_path: Path) -> None:
    dataset = dcmread(SAMPLES / "US1_UNCR.dcm")
    dataset.PatientName = "Zzyzx^Quintessa"
    dataset.PatientID = "PID-8842-SECRET"
    dataset.PatientBirthDate = "19770707"
    source = tmp_path / "identifiable.dcm"
    dataset.save_as(source)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PACSBRIDGE_DATABASE_URL", "PACSBRIDGE_DATA_DIR")
    }
    env["PACSBRIDGE_LOG_LEVEL"] = "DEBUG"

    run_process = subprocess.run(
        [sys.executable, "-m", "pacsbridge.cli.main", "upload", "--archive", "Cardiology", str(source), str(source),
         "--data-dir", str(linked)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )

    assert run_process.returncode == 0, run_process.stderr
    assert "Upload to archive" in run_process.stderr  # the log is really on
    for secret in ("Zzyzx", "Quintessa", "PID-8842-SECRET", "19770707"):
        assert secret not in run_process.stderr


def test_connections_delete_rules(tmp_path):
    """A linked connection or one with delivery history stays; an unused one is deleted."""
    from typer.testing import CliRunner

    from pacsbridge.cli.main import app

    runner = CliRunner()
    data_dir = str(tmp_path / "data")

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--data-dir", data_dir])

    add = ["connections", "add", "{}", "--kind", "pacs", "--host", "127.0.0.1", "--port", "104",
           "--calling-aet", "POCUS", "--called-aet", "PACS", "--test-only", "--timezone", "UTC"]  # fmt: skip
    assert invoke(*[word.format("Used") for word in add]).exit_code == 0
    assert invoke(*[word.format("Spare") for word in add]).exit_code == 0
    assert invoke("archives", "create", "ward", "--test").exit_code == 0
    assert invoke("archives", "link", "ward", "Used").exit_code == 0

    linked = invoke("connections", "delete", "Used", "--yes")
    assert linked.exit_code == 1
    assert "is linked to archive 'ward' slot 1: unlink it first" in linked.stderr

    unused = invoke("connections", "delete", "Spare", "--yes")
    assert unused.exit_code == 0, unused.output
    assert "Deleted connection 'Spare'." in unused.stdout
    assert "Spare" not in invoke("connections", "list").stdout

    missing = invoke("connections", "delete", "Spare", "--yes")
    assert missing.exit_code == 1

    declined = runner.invoke(app, ["connections", "delete", "Used", "--data-dir", data_dir], input="n\n")
    assert declined.exit_code == 1
    assert "nothing was deleted" in declined.stderr
