import json
import subprocess
import sys

import pytest

from fake_peers import silent_peer, storage_peer
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.echo import ECHO_WAIT_CAP_SECONDS, Outcome, echo
from conftest import free_port

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]


def outcomes(report):
    return {step.name: step.outcome for step in report.steps}


def test_echo_storescp_passes_every_step(start_storescp):
    scp = start_storescp()
    report = echo(Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", scp.ae_title))
    assert report.ok
    assert [step.name for step in report.steps] == ["tcp-connect", "association", "c-echo", "release"]
    assert set(outcomes(report).values()) == {Outcome.PASSED}
    assert all(step.duration_ms >= 0 for step in report.steps)


def test_echo_cli_json_and_exit_code(start_storescp):
    scp = start_storescp()
    run = subprocess.run(
        [*CLI, "echo", "127.0.0.1", str(scp.port), "--calling-aet", "PACSBRIDGE", "--called-aet", "STORESCP", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["ok"] is True
    assert data["secured"] is False
    assert [step["outcome"] for step in data["steps"]] == ["passed"] * 4


def test_echo_closed_port_fails_at_tcp_step():
    port = free_port()
    report = echo(Endpoint("127.0.0.1", port, "PACSBRIDGE", "ANY"))
    assert not report.ok
    assert outcomes(report)["tcp-connect"] == Outcome.FAILED
    assert outcomes(report)["association"] == Outcome.SKIPPED
    assert "refused" in report.steps[0].detail
    assert report.steps[0].action


def test_echo_cli_closed_port_exit_code():
    run = subprocess.run(
        [*CLI, "echo", "127.0.0.1", str(free_port()), "--calling-aet", "PB", "--called-aet", "X"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "refused" in run.stdout
    assert "Echo failed." in run.stdout


def test_echo_rejected_called_ae_title_is_explained():
    with storage_peer(ae_title="REALPACS", require_called_aet=True) as port:
        report = echo(Endpoint("127.0.0.1", port, "PACSBRIDGE", "WRONGPACS"))
    assert not report.ok
    association = report.steps[1]
    assert association.outcome == Outcome.FAILED
    assert "called AE title not recognized" in association.detail
    assert "permanent" in association.detail
    assert "'WRONGPACS'" in association.action
    assert association.data["failure"]["codes"] == {"result": 1, "source": 1, "reason": 7}


def test_echo_silent_peer_reports_acse_timeout():
    with silent_peer() as port:
        report = echo(Endpoint("127.0.0.1", port, "PACSBRIDGE", "SILENT", acse_timeout=1))
    assert outcomes(report)["tcp-connect"] == Outcome.PASSED
    assert outcomes(report)["association"] == Outcome.FAILED
    assert "did not answer the association request" in report.steps[1].detail


def test_echo_caps_waits_whatever_the_timeouts():
    endpoint = Endpoint("127.0.0.1", 104, "A", "B", acse_timeout=300, connection_timeout=300, dimse_timeout=300)
    capped = endpoint.capped(ECHO_WAIT_CAP_SECONDS)
    assert capped.acse_timeout == ECHO_WAIT_CAP_SECONDS
    assert capped.connection_timeout == ECHO_WAIT_CAP_SECONDS
    assert capped.dimse_timeout == 300


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--calling-aet", "", "--called-aet", "X"], "empty"),
        (["--calling-aet", "A" * 17, "--called-aet", "X"], "more than 16"),
        (["--calling-aet", "PB", "--called-aet", "A\\B"], "backslash"),
    ],
)
def test_echo_cli_invalid_ae_title_exit_2(args, expected):
    run = subprocess.run([*CLI, "echo", "127.0.0.1", "104", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert expected in run.stderr


def test_echo_cli_lower_case_warning():
    with storage_peer(ae_title="pacs", require_called_aet=True) as port:
        run = subprocess.run(
            [*CLI, "echo", "127.0.0.1", str(port), "--calling-aet", "pb", "--called-aet", "pacs"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "lower-case" in run.stderr
