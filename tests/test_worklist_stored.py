"""`pacsbridge worklist --connection` and the stored-connection query against DCMTK wlmscpfs."""

from __future__ import annotations

import datetime
import json
import zoneinfo
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from peers import copy_dcmtk_examples, make_worklist_folder, require_dcmtk, wlmscpfs, write_worklist_file
from typer.testing import CliRunner, Result

import pacsbridge.cli.main  # noqa: F401  (registers every command on the app)
from pacsbridge.cli.app import app
from pacsbridge.config import load_config
from pacsbridge.db import close_database, open_database
from pacsbridge.ingest.stored_worklist import load_stored_worklist, query_stored_worklist
from pacsbridge.sandbox.mwl import make_worklist_item

pytestmark = pytest.mark.dcmtk

runner = CliRunner(env={"PACSBRIDGE_DATABASE_URL": None, "PACSBRIDGE_DATA_DIR": None})

CALLED_AE = "PB_MWL"
EXAMPLES_AE = "OFFIS"
CALLING_AE = "PB_US1"
TIMEZONE = "Europe/Berlin"
MWL = "Hospital MWL"

ACCENTED = "Müller^Zoë"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
CHINESE = "Wang^XiaoDong=王^小东"


def _today() -> datetime.date:
    return datetime.datetime.now(zoneinfo.ZoneInfo(TIMEZONE)).date()


def _items(today: datetime.date) -> dict[str, dict]:
    yesterday = today - datetime.timedelta(days=1)
    common = {"station_ae_title": CALLING_AE, "scheduled_date": today}
    return {
        "accented": dict(
            common, patient_name=ACCENTED, patient_id="ST-1", accession_number="STACC1", scheduled_time="101500"
        ),
        "japanese": dict(
            common,
            patient_name=JAPANESE,
            patient_id="ST-2",
            accession_number="STACC2",
            scheduled_time="080000",
            character_set="\\ISO 2022 IR 87",
        ),
        "chinese": dict(
            common,
            patient_name=CHINESE,
            patient_id="ST-3",
            accession_number="STACC3",
            scheduled_time="140000",
            character_set="ISO_IR 192",
        ),
        "computed_tomography": dict(
            common, patient_name="Doe^Jane", patient_id="ST-4", accession_number="STACC4", modality="CT"
        ),
        "other_station": dict(
            common, patient_name="Other^Station", patient_id="ST-5", accession_number="STACC5", station_ae_title="US_9"
        ),
        "yesterday": dict(
            common, patient_name="Late^Entry", patient_id="ST-6", accession_number="STACC6", scheduled_date=yesterday
        ),
    }


@pytest.fixture(scope="module")
def wlmscpfs_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    require_dcmtk("wlmscpfs", "dump2dcm")
    root = tmp_path_factory.mktemp("stored-worklists")
    folder = make_worklist_folder(root, CALLED_AE)
    for name, keywords in _items(_today()).items():
        write_worklist_file(make_worklist_item(**keywords), folder / f"{name}.wl")
    copy_dcmtk_examples(make_worklist_folder(root, EXAMPLES_AE))
    with wlmscpfs(root, "--keep-char-set") as port:
        yield port


def run(data_dir: Path, *args: str) -> Result:
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)])


def add_mwl(data_dir: Path, port: int, *options: str, called_ae: str = CALLED_AE) -> None:
    result = run(
        data_dir,
        "connections",
        "add",
        MWL,
        "--kind",
        "mwl",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--calling-aet",
        CALLING_AE,
        "--called-aet",
        called_ae,
        "--timezone",
        TIMEZONE,
        "--acse-timeout",
        "10",
        "--dimse-timeout",
        "10",
        "--connection-timeout",
        "10",
        *options,
    )
    assert result.exit_code == 0, result.output


def worklist_json(data_dir: Path, *options: str) -> dict:
    result = run(data_dir, "worklist", "--connection", MWL, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_stored_default_filters(wlmscpfs_port, tmp_path):
    add_mwl(tmp_path, wlmscpfs_port)

    data = worklist_json(tmp_path)

    assert data["ok"] is True
    assert data["configured"] is True
    assert data["connection"] == MWL
    assert data["scheduled_dates"] == [_today().isoformat()] * 2
    # Sorted by scheduled time; the CT item, the other station and yesterday's item are excluded.
    assert [item["patient_name"] for item in data["items"]] == [JAPANESE, ACCENTED, CHINESE]


def test_stored_filters_widened(wlmscpfs_port, tmp_path):
    filters = {"modality": "*", "scheduled_station_ae_title": False, "days_back": 1}
    add_mwl(tmp_path, wlmscpfs_port, "--worklist-filters", json.dumps(filters))

    data = worklist_json(tmp_path)

    assert {item["patient_id"] for item in data["items"]} == {f"ST-{number}" for number in range(1, 7)}


def test_stored_patient_name_search(wlmscpfs_port, tmp_path):
    add_mwl(tmp_path, wlmscpfs_port)

    accented = worklist_json(tmp_path, "--patient-name", "Müller*")
    chinese = worklist_json(tmp_path, "--patient-name", "Wang*")
    by_id = worklist_json(tmp_path, "--patient-id", "ST-2")

    assert [item["patient_name"] for item in accented["items"]] == [ACCENTED]
    assert [item["patient_name"] for item in chinese["items"]] == [CHINESE]
    assert [item["patient_name"] for item in by_id["items"]] == [JAPANESE]


def test_stored_show_query_dump(wlmscpfs_port, tmp_path):
    add_mwl(tmp_path, wlmscpfs_port)

    result = run(tmp_path, "worklist", "--connection", MWL, "--show-query", "--patient-name", "Müller*")

    assert result.exit_code == 0, result.output
    output = result.stdout
    assert f"C-FIND identifier sent to {CALLED_AE}@127.0.0.1:{wlmscpfs_port}:" in output
    assert "(0008,0005) SpecificCharacterSet CS [ISO_IR 100]" in output
    assert "(0010,0010) PatientName PN [Müller*]" in output
    assert "(0040,0100) ScheduledProcedureStepSequence SQ (1 items)" in output
    assert f"(0040,0001) ScheduledStationAETitle AE [{CALLING_AE}]" in output
    assert f"(0040,0002) ScheduledProcedureStepStartDate DA [{_today():%Y%m%d}]" in output
    assert "(0040,0003) ScheduledProcedureStepStartTime TM []" in output
    assert "Response 1 (kept):" in output
    assert "(0010,0020) PatientID LO [ST-1]" in output


def test_stored_show_query_json(wlmscpfs_port, tmp_path):
    add_mwl(tmp_path, wlmscpfs_port)

    data = worklist_json(tmp_path, "--show-query")

    assert "(0008,0060) Modality CS [US]" in [line.strip() for line in data["query"]["identifier"]]
    assert len(data["query"]["responses"]) == 3
    assert all(response["kept"] for response in data["query"]["responses"])


def test_host_port_show_query(wlmscpfs_port):
    result = runner.invoke(
        app,
        [
            "worklist",
            "127.0.0.1",
            str(wlmscpfs_port),
            "--calling-aet",
            "PB_TEST",
            "--called-aet",
            CALLED_AE,
            "--modality",
            "CT",
            "--show-query",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "(0008,0060) Modality CS [CT]" in result.stdout
    assert "Doe^Jane" in result.stdout


def test_not_configured_exit_1(tmp_path):
    text = run(tmp_path, "worklist", "--connection", MWL)
    data = run(tmp_path, "worklist", "--connection", MWL, "--json")

    assert text.exit_code == 1
    assert "no Modality Worklist connection is configured for this organization" in text.stderr
    assert "pacsbridge connections add NAME --kind mwl" in text.stderr
    assert data.exit_code == 1
    payload = json.loads(data.stdout)
    assert payload["ok"] is False
    assert payload["configured"] is False
    assert "items" not in payload


def test_other_connection_name_exit_2(wlmscpfs_port, tmp_path):
    add_mwl(tmp_path, wlmscpfs_port)

    result = run(tmp_path, "worklist", "--connection", "Radiology PACS")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "'Radiology PACS' not found" in result.stderr
    assert repr(MWL) in result.stderr


def test_connection_with_direct_options_exit_2(tmp_path):
    result = run(tmp_path, "worklist", "--connection", MWL, "--modality", "CT", "--calling-aet", "X")

    assert result.exit_code == 2
    assert "--calling-aet, --modality cannot be given with it" in result.stderr


def test_neither_form_exit_2(tmp_path):
    result = runner.invoke(app, ["worklist", "127.0.0.1"])

    assert result.exit_code == 2
    assert "--connection NAME" in result.stderr


def test_invalid_filters_rejected_on_save(wlmscpfs_port, tmp_path):
    result = run(
        tmp_path,
        "connections",
        "add",
        MWL,
        "--kind",
        "mwl",
        "--host",
        "127.0.0.1",
        "--port",
        str(wlmscpfs_port),
        "--calling-aet",
        CALLING_AE,
        "--called-aet",
        CALLED_AE,
        "--worklist-filters",
        '{"days_back": -3, "modalty": "US"}',
    )

    assert result.exit_code == 2
    assert "worklist_filters.days_back -3: is outside 0 to 31 days" in result.stderr
    assert "worklist_filters.modalty" in result.stderr
    assert "Nothing was stored." in result.stderr

    query = run(tmp_path, "worklist", "--connection", MWL, "--json")
    assert query.exit_code == 1
    assert json.loads(query.stdout)["configured"] is False


def test_unreachable_worklist_not_empty(tmp_path):
    add_mwl(tmp_path, free_port())

    result = run(tmp_path, "worklist", "--connection", MWL, "--json")

    assert result.exit_code == 1
    assert result.stderr.startswith("worklist unavailable: ")
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert payload["configured"] is True
    assert "items" not in payload


def test_stored_path_dcmtk_examples(wlmscpfs_port, tmp_path):
    # DCMTK's example items are scheduled in 1996, so "today" is set to the day of the ultrasound exam.
    add_mwl(tmp_path, wlmscpfs_port, "--worklist-filters", '{"scheduled_station_ae_title": false}', called_ae=EXAMPLES_AE)
    sessions = open_database(load_config(tmp_path, environ={}))
    try:
        with sessions.begin() as session:
            worklist = load_stored_worklist(session)
    finally:
        close_database(sessions)
    exam_day = datetime.datetime(1996, 1, 3, 12, 0, tzinfo=datetime.UTC)

    result = query_stored_worklist(worklist, worklist.build_query(now=exam_day))

    assert [item.patient_name for item in result.items] == ["HAYDN^FRANZ^JOSEPH"]
    assert result.items[0].scheduled_steps[0].modality == "US"
