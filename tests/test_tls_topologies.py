"""DICOM-TLS through the front ends hospitals put before a PACS, end to end on loopback.

pacsbridge speaks DICOM-TLS to nginx, HAProxy or stunnel, which terminate TLS
and forward plain DICOM to DCMTK storescp or wlmscpfs, and to Orthanc, which
receives over DICOM-TLS and forwards each instance in plain DICOM. The last
tests check that --bind-address sets the source address that arrives at the front end.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, Storescp
from peers import make_worklist_folder, wlmscpfs, write_worklist_file
from tls_material import Identity, load_signer, make_identity
from tls_peers import (
    Peer,
    haproxy_tls_proxy,
    nginx_tls_proxy,
    orthanc_router,
    stunnel_tls_proxy,
)

from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.echo import EchoReport, EchoStep, Outcome, echo
from pacsbridge.dicomnet.store import store_instances
from pacsbridge.dicomnet.worklist import WorklistQuery, query_worklist
from pacsbridge.ingest.files import collect_instances
from pacsbridge.sandbox.mwl import make_worklist_item
from pacsbridge.tls.context import TlsMode, TlsSettings

pytestmark = pytest.mark.dcmtk

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]
CALLING_AE = "PACSBRIDGE"
# Uncompressed samples, so that every peer accepts them as they are.
STUDY = [SAMPLES / "US1_UNCR.dcm", SAMPLES / "US-RGB-8-esopecho.dcm"]
# A second loopback address: Linux routes all of 127.0.0.0/8 to the lo interface.
EGRESS_ADDRESS = "127.0.0.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    folder = tmp_path_factory.mktemp("pki")
    client_ca = make_identity(folder, "client-ca", common_name="Hospital client CA", is_ca=True)
    return {
        "dmz": make_identity(folder, "dmz", common_name="dicom-dmz.hospital.test"),
        "client-ca": client_ca,
        "client": make_identity(folder, "client", common_name="PACSBRIDGE", issuer=load_signer(client_ca)),
        "other": make_identity(folder, "other", common_name="someone else"),
    }


@pytest.fixture
def inside(start_storescp) -> Storescp:
    """The plain storage SCP behind the front end, as the PACS inside the hospital."""
    return start_storescp(ae_title="PACS")


def active(identity: Identity, client: Identity | None = None) -> TlsSettings:
    return TlsSettings(
        TlsMode.ACTIVE,
        scp_certificate_pem=identity.pem,
        client_certificate=None if client is None else client.cert,
        client_key=None if client is None else client.key,
    )


def endpoint(port: int, called_ae: str, tls: TlsSettings | None, *, bind_address: str | None = None) -> Endpoint:
    return Endpoint(
        "127.0.0.1",
        port,
        CALLING_AE,
        called_ae,
        acse_timeout=15,
        dimse_timeout=30,
        connection_timeout=15,
        bind_address=bind_address,
        tls=tls,
    )


def step(report: EchoReport, name: str) -> EchoStep:
    return next(item for item in report.steps if item.name == name)


def assert_echo_passes(report: EchoReport, identity: Identity) -> None:
    assert report.ok, [(item.name, item.outcome, item.detail) for item in report.steps]
    handshake = step(report, "tls-handshake")
    assert handshake.data["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert handshake.data["peer_certificate"]["sha256"] == identity.fingerprint


def store_study(target: Endpoint) -> None:
    instances, rejected = collect_instances(STUDY)
    assert rejected == []
    result = store_instances(target, instances)
    assert result.all_stored, [outcome.as_dict() for outcome in result.outcomes]


def wait_for_files(scp: Storescp, count: int, timeout: float = 20.0) -> list[Path]:
    """Return the files `scp` received once there are `count`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        received = scp.received()
        if len(received) >= count:
            return received
        time.sleep(0.1)
    pytest.fail(f"{scp.ae_title} received {len(scp.received())} of {count} instances within {timeout} s")


def assert_same_pixels(sent: list[Path], received: list[Path]) -> None:
    """Check that each sent instance arrived once, with the same pixel data."""
    arrived = {}
    for path in received:
        dataset = pydicom.dcmread(path)
        arrived[dataset.SOPInstanceUID] = dataset
    assert len(arrived) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        copy = arrived[original.SOPInstanceUID]
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData, f"pixel data of {path.name} changed"


def access_log_lines(proxy: Peer, expected_lines: int, timeout: float = 10.0) -> list[str]:
    """Return nginx's access log lines, one per connection, once there are `expected_lines`.

    nginx writes a line when a session ends, which can be just after the
    client has exited, so the log is read again until it is long enough.
    """
    assert proxy.access_log is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = proxy.access_log.read_text().splitlines()
        if len(lines) >= expected_lines:
            break
        time.sleep(0.1)
    return lines


def source_address(line: str) -> str:
    """Return the client address of an access log line, which starts with address:port."""
    return line.split()[0].rsplit(":", 1)[0]


def require_egress_address() -> None:
    with socket.socket() as probe:
        try:
            probe.bind((EGRESS_ADDRESS, 0))
        except OSError as exc:
            pytest.skip(f"cannot send from {EGRESS_ADDRESS} on this machine: {exc}")


# nginx stream module


def test_nginx_echo_and_store(tmp_path, pki, inside):
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port) as proxy:
        assert_echo_passes(echo(endpoint(proxy.port, "PACS", active(pki["dmz"]))), pki["dmz"])
        store_study(endpoint(proxy.port, "PACS", active(pki["dmz"])))

    assert_same_pixels(STUDY, wait_for_files(inside, len(STUDY)))


def test_nginx_worklist_query(tmp_path, pki):
    root = tmp_path / "worklists"
    item = make_worklist_item(
        patient_name="Dmz^Test", patient_id="DMZ-0001", scheduled_date="20240601", accession_number="ACC-DMZ-1"
    )
    write_worklist_file(item, make_worklist_folder(root, "MWL") / "dmz.wl")

    with wlmscpfs(root) as worklist_port, nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], worklist_port) as proxy:
        target = endpoint(proxy.port, "MWL", active(pki["dmz"]))
        assert_echo_passes(echo(target), pki["dmz"])
        result = query_worklist(target, WorklistQuery(modality="US"))

    assert [found.patient_id for found in result.items] == ["DMZ-0001"]
    assert result.items[0].patient_name == "Dmz^Test"
    assert result.items[0].accession_number == "ACC-DMZ-1"


def test_nginx_client_certificate_missing_fails_echo(tmp_path, pki, inside):
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port, client_ca=pki["client-ca"].cert) as proxy:
        report = echo(endpoint(proxy.port, "PACS", active(pki["dmz"])))
        log = proxy.log_text()

    assert not report.ok
    assert "client sent no required SSL certificate" in log


# NOTE: nginx completes the handshake and only then closes the connection, so
# no TLS alert reaches the client. pacsbridge's handshake probe reads that
# close as success, and Echo then reports an unexplained association abort.
def test_nginx_client_certificate_missing_explained(tmp_path, pki, inside):
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port, client_ca=pki["client-ca"].cert) as proxy:
        report = echo(endpoint(proxy.port, "PACS", active(pki["dmz"])))

    handshake = step(report, "tls-handshake")
    assert handshake.outcome == Outcome.FAILED
    assert "requires a client certificate" in handshake.detail


def test_nginx_client_certificate_accepted(tmp_path, pki, inside):
    tls = active(pki["dmz"], client=pki["client"])
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port, client_ca=pki["client-ca"].cert) as proxy:
        assert_echo_passes(echo(endpoint(proxy.port, "PACS", tls)), pki["dmz"])
        store_study(endpoint(proxy.port, "PACS", tls))
        # Echo opens three connections and the store one.
        lines = access_log_lines(proxy, 4)

    assert len(lines) == 4
    assert sum('"CN=PACSBRIDGE"' in line for line in lines) >= 2, lines
    assert_same_pixels(STUDY, wait_for_files(inside, len(STUDY)))


# HAProxy


def test_haproxy_echo_and_store(tmp_path, pki, inside):
    with haproxy_tls_proxy(tmp_path / "haproxy", pki["dmz"], inside.port) as proxy:
        assert_echo_passes(echo(endpoint(proxy.port, "PACS", active(pki["dmz"]))), pki["dmz"])
        store_study(endpoint(proxy.port, "PACS", active(pki["dmz"])))

    assert_same_pixels(STUDY, wait_for_files(inside, len(STUDY)))


# stunnel


def test_stunnel_echo_and_store(tmp_path, pki, inside):
    with stunnel_tls_proxy(tmp_path / "stunnel", pki["dmz"], inside.port) as proxy:
        assert_echo_passes(echo(endpoint(proxy.port, "PACS", active(pki["dmz"]))), pki["dmz"])
        store_study(endpoint(proxy.port, "PACS", active(pki["dmz"])))

    assert_same_pixels(STUDY, wait_for_files(inside, len(STUDY)))


def test_stunnel_renewal_overlap(tmp_path, pki, inside):
    """With the old and the new certificate uploaded together, the front end may switch at any time."""
    both = TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["other"].pem + pki["dmz"].pem)
    old_only = TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["other"].pem)
    with stunnel_tls_proxy(tmp_path / "stunnel", pki["dmz"], inside.port) as proxy:
        with_both = echo(endpoint(proxy.port, "PACS", both))
        with_old_only = echo(endpoint(proxy.port, "PACS", old_only))

    assert_echo_passes(with_both, pki["dmz"])
    assert not with_old_only.ok
    assert "untrusted" in step(with_old_only, "tls-handshake").detail


def test_stunnel_encryption_only_pinning(tmp_path, pki, inside):
    """Echo shows the fingerprint, the admin pins it, and a different pin stops sending."""
    with stunnel_tls_proxy(tmp_path / "stunnel", pki["dmz"], inside.port) as proxy:
        first = echo(endpoint(proxy.port, "PACS", TlsSettings(TlsMode.ENCRYPTION_ONLY)))
        seen = step(first, "tls-handshake").data["peer_certificate"]["sha256"]

        store_command = [
            *CLI, "store", "127.0.0.1", str(proxy.port), str(STUDY[0]),
            "--calling-aet", CALLING_AE, "--called-aet", "PACS", "--tls", "encryption-only",
        ]  # fmt: skip
        pinned = subprocess.run(
            [*store_command, "--pinned-fingerprint", seen], check=False, capture_output=True, text=True, timeout=60
        )
        wrong_pin = subprocess.run(
            [*store_command, "--pinned-fingerprint", pki["other"].fingerprint],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert first.ok
    assert step(first, "tls-handshake").outcome == Outcome.WARNING
    assert seen == pki["dmz"].fingerprint
    assert pinned.returncode == 0, pinned.stderr
    assert wrong_pin.returncode == 1
    assert "different from the pinned one" in wrong_pin.stdout + wrong_pin.stderr
    assert len(inside.received()) == 1


# Orthanc as a DICOM router in the DMZ


def test_orthanc_router_forwards_same_pixels(tmp_path, pki, inside):
    with orthanc_router(tmp_path / "orthanc", pki["dmz"], pki["client-ca"].cert, ("PACS", inside.port)) as router:
        assert_echo_passes(echo(endpoint(router.port, "DMZROUTER", active(pki["dmz"]))), pki["dmz"])
        store_study(endpoint(router.port, "DMZROUTER", active(pki["dmz"])))
        received = wait_for_files(inside, len(STUDY))

    assert_same_pixels(STUDY, received)


def test_orthanc_router_client_certificate(tmp_path, pki, inside):
    trusted = pki["client-ca"].cert
    folder = tmp_path / "orthanc"
    with orthanc_router(folder, pki["dmz"], trusted, ("PACS", inside.port), client_certificate_required=True) as router:
        without = echo(endpoint(router.port, "DMZROUTER", active(pki["dmz"])))
        with_client = echo(endpoint(router.port, "DMZROUTER", active(pki["dmz"], client=pki["client"])))

    assert not without.ok
    assert "requires a client certificate" in step(without, "tls-handshake").detail
    assert_echo_passes(with_client, pki["dmz"])


# Source address seen by the front end


def test_bind_address_store_through_nginx(tmp_path, pki, inside):
    require_egress_address()
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port) as proxy:
        store_command = [
            *CLI, "store", "127.0.0.1", str(proxy.port), str(STUDY[0]),
            "--calling-aet", CALLING_AE, "--called-aet", "PACS",
            "--tls", "active", "--scp-cert", str(pki["dmz"].cert), "--bind-address", EGRESS_ADDRESS,
        ]  # fmt: skip
        run = subprocess.run(store_command, check=False, capture_output=True, text=True, timeout=60)
        sources = [source_address(line) for line in access_log_lines(proxy, 1)]

    assert run.returncode == 0, run.stderr
    assert sources == [EGRESS_ADDRESS]
    assert len(inside.received()) == 1


# NOTE: Echo's TCP step and association use the bind address, but its TLS
# handshake probe (probe_tls) connects from the default source address. A
# firewall that admits only the published address would fail that step.
def test_bind_address_echo_through_nginx(tmp_path, pki, inside):
    require_egress_address()
    with nginx_tls_proxy(tmp_path / "nginx", pki["dmz"], inside.port) as proxy:
        report = echo(endpoint(proxy.port, "PACS", active(pki["dmz"]), bind_address=EGRESS_ADDRESS))
        # Echo opens three connections: the TCP step, the TLS handshake step and the association.
        sources = [source_address(line) for line in access_log_lines(proxy, 3)]

    assert report.ok
    assert sources == [EGRESS_ADDRESS] * 3
