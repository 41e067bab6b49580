"""`pacsbridge worklist` against DCMTK wlmscpfs and pynetdicom fake SCPs: output, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from peers import fake_worklist_scp, make_worklist_folder, raw_identifier, wlmscpfs, write_worklist_file
from typer.testing import CliRunner

from pacsbridge.cli.main import app
from pacsbridge.sandbox.mwl import SandboxWorklistServer, make_worklist_item

CALLED_AE = "PB_MWL"
CALLING_AE = "PB_TEST"
ACCENTED = "Gérard^Ñuñez"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"

ITEMS = {
    "accented": dict(
        patient_name=ACCENTED,
        patient_id="CLI-1",
        birth_date="19751224",
        sex="M",
        accession_number="CLIACC1",
        scheduled_date="20240510",
        scheduled_time="101500",
    ),
    "japanese": dict(
        patient_name=JAPANESE,
        patient_id="CLI-2",
        birth_date="19900315",
        sex="M",
        accession_number="CLIACC2",
        scheduled_date="20240510",
        scheduled_time="080000",
        character_set="\\ISO 2022 IR 87",
    ),
    "computed_tomography": dict(
        patient_name="Doe^Jane",
        patient_id="CLI-3",
        scheduled_date="20240510",
        modality="CT",
    ),
}


@pytest.fixture(scope="module")
def wlmscpfs_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("cli-worklists")
    folder = make_worklist_folder(root, CALLED_AE)
    for name, keywords in ITEMS.items():
        write_worklist_file(make_worklist_item(**keywords), folder / f"{name}.wl")
    with wlmscpfs(root, "--keep-char-set") as port:
        yield port


def run_worklist(port: int | str, *options: str, host: str = "127.0.0.1"):
    """Invoke `pacsbridge worklist` in-process and return the click result."""
    base = ["worklist", host, str(port)]
    if "--calling-aet" not in options:
        base += ["--calling-aet", CALLING_AE]
    if "--called-aet" not in options:
        base += ["--called-aet", CALLED_AE]
    return CliRunner().invoke(app, [*base, *options])


@pytest.mark.dcmtk
def test_cli_table_lists_ultrasound(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["Scheduled", "Patient"]
    assert JAPANESE in lines[2]
    assert "2024-05-10 08:00" in lines[2]
    assert ACCENTED in lines[3]
    assert "CLIACC1" in lines[3]
    assert "Doe^Jane" not in result.stdout
    assert len(lines) == 4


@pytest.mark.dcmtk
def test_cli_json_shape(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port, "--json", "--date", "20240510")

    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert set(output) == {"ok", "items", "warnings", "truncated"}
    assert output["truncated"] is False
    assert output["warnings"] == []
    assert [item["patient_name"] for item in output["items"]] == [JAPANESE, ACCENTED]
    first = output["items"][0]
    assert first["patient_name_components"]["ideographic"] == "山田^太郎"
    assert first["patient_id"] == "CLI-2"
    assert first["birth_date"] == "19900315"
    assert first["scheduled_steps"][0]["modality"] == "US"
    assert first["scheduled_steps"][0]["start_time"] == "080000"
    assert "raw" not in first


@pytest.mark.dcmtk
def test_cli_any_modality_and_name(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port, "--json", "--modality", "", "--patient-name", "Doe*")

    assert result.exit_code == 0, result.stderr
    assert [item["patient_id"] for item in json.loads(result.stdout)["items"]] == ["CLI-3"]


@pytest.mark.dcmtk
def test_cli_empty_result_message(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port, "--patient-name", "Nobody*")

    assert result.exit_code == 0, result.stderr
    # The message repeats the keys sent, so an admin can tell why nothing matched.
    assert result.stdout.strip() == "No worklist items match the query (modality US, patient name or ID pattern)."


@pytest.mark.dcmtk
def test_cli_truncation_notice(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port, "--max-items", "1")

    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert "Showing the first 1 items" in result.stderr


@pytest.mark.dcmtk
def test_cli_wrong_called_ae_wlmscpfs(wlmscpfs_port):
    result = run_worklist(wlmscpfs_port, "--called-aet", "UNKNOWN_AE")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("worklist unavailable: ")


def test_cli_wrong_called_ae_reason():
    # The sandbox SCP rejects with reason 7 and then waits for the requestor to
    # close the connection (pynetdicom's state machine action AE-8, state Sta13),
    # so the rejection is read first. wlmscpfs closes at once and races with it.
    with SandboxWorklistServer([], ae_title="SANDBOX_MWL") as sandbox:
        result = run_worklist(sandbox.port, "--called-aet", "UNKNOWN_AE")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("worklist unavailable: ")
    assert "called AE title not recognized" in result.stderr
    assert "'UNKNOWN_AE'" in result.stderr


def test_cli_closed_port():
    port = free_port()

    result = run_worklist(port, "--connection-timeout", "5")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("worklist unavailable: ")
    assert f"port {port} was refused" in result.stderr
    assert "No worklist items" not in result.stdout


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--calling-aet", "A_VERY_LONG_AE_TITLE"), ("--calling-aet", "'A_VERY_LONG_AE_TITLE'", "more than 16")),
        (("--called-aet", "BAD\\AE"), ("--called-aet", "backslash", "Use 1 to 16")),
        (("--called-aet", "   "), ("--called-aet", "empty")),
        (("--date", "2024-05-10"), ("'2024-05-10'", "YYYYMMDD")),
        (("--date", "20240231"), ("'20240231'", "not a calendar date")),
        (("--charset", "LATIN1"), ("charset", "'LATIN1'", "ISO_IR 100")),
        (("--dimse-timeout", "0"), ("--dimse-timeout", "number of seconds")),
        (("--modality", "ULTRA/SOUND"), ("modality", "'ULTRA/SOUND'")),
    ],
)
def test_cli_invalid_input_exit_2(options, fragments):
    # Port 9 on loopback is never contacted: input is checked before any connection.
    result = run_worklist(9, *options)

    assert result.exit_code == 2
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize(("host", "port"), [("bad host!", "104"), ("127.0.0.1", "0"), ("127.0.0.1", "70000")])
def test_cli_invalid_address_exit_2(host, port):
    result = run_worklist(port, host=host)

    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "Use " in result.stderr


@pytest.mark.parametrize("status", [0xA700, 0xC000])
@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_cli_failure_status_is_not_empty_list(status, json_flag):
    item = make_worklist_item(patient_name="Doe^John", patient_id="F1", scheduled_date="20240510")

    def on_find(event):
        yield 0xFF00, item
        yield status, None

    with fake_worklist_scp(on_find, ae_title=CALLED_AE) as port:
        result = run_worklist(port, *json_flag)

    assert result.exit_code == 1
    if json_flag:
        data = json.loads(result.stdout)
        assert data["ok"] is False
        assert "items" not in data
        assert f"(status 0x{status:04X})" in data["error"]["summary"]
    else:
        assert result.stdout == ""
    assert result.stderr.startswith("worklist unavailable: worklist query failed: ")
    assert f"(status 0x{status:04X})" in result.stderr


def test_cli_misspelled_charset_warns():
    item = make_worklist_item(patient_name="Müller^Zoë", patient_id="W1", scheduled_date="20240510")

    def on_find(event):
        yield 0xFF00, raw_identifier(item, "ISO-IR 100")
        yield 0x0000, None

    with fake_worklist_scp(on_find, ae_title=CALLED_AE) as port:
        table = run_worklist(port)
        as_json = run_worklist(port, "--json")

    assert table.exit_code == 0, table.stderr
    assert "Müller^Zoë" in table.stdout
    assert "warning: The worklist SCP sent Specific Character Set 'ISO-IR 100'" in table.stderr
    output = json.loads(as_json.stdout)
    assert output["items"][0]["patient_name"] == "Müller^Zoë"
    assert len(output["warnings"]) == 1


@pytest.mark.dcmtk
def test_cli_entry_point_keeps_names_out_of_log(wlmscpfs_port):
    env = {**os.environ, "PACSBRIDGE_LOG_LEVEL": "DEBUG"}
    command = [sys.executable, "-m", "pacsbridge.cli.main", "worklist", "127.0.0.1", str(wlmscpfs_port)]
    command += ["--calling-aet", CALLING_AE, "--called-aet", CALLED_AE, "--json", "--patient-name", "Yamada*"]

    run = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).parent)

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["items"][0]["patient_name"] == JAPANESE
    assert "worklist query to" in run.stderr  # the log is really on
    for secret in ("Yamada", "山田", "CLI-2", "19900315"):
        assert secret not in run.stderr
