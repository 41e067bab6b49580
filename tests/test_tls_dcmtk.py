"""DICOM-TLS against DCMTK storescp: trust modes, pinning, client certificates and the classification of failures."""

import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import SAMPLES
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.echo import Outcome, echo
from pacsbridge.dicomnet.store import store_instances
from pacsbridge.ingest.files import collect_instances
from pacsbridge.tls.context import TlsMode, TlsSettings
from tls_material import load_signer, make_identity

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]


@pytest.fixture
def pki(tmp_path: Path):
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = make_identity(folder, "client-ca", common_name="pacsbridge test CA", is_ca=True, valid_days=30)
    return {
        "server": make_identity(folder, "server", common_name="pacs.hospital.test"),
        "other": make_identity(folder, "other", common_name="someone else"),
        "expired": make_identity(folder, "expired", valid_days=10, starts_days_ago=40),
        "soon": make_identity(folder, "soon", valid_days=11, starts_days_ago=1),
        "client-ca": ca,
        "client": make_identity(folder, "client", common_name="PACSBRIDGE", issuer=load_signer(ca)),
    }


def tls_scp(start_storescp, identity, *peer_options):
    return start_storescp("+tls", str(identity.key), str(identity.cert), *(peer_options or ("-ic",)))


def steps(report):
    return {step.name: step for step in report.steps}


def endpoint(port, tls):
    return Endpoint("127.0.0.1", port, "PACSBRIDGE", "STORESCP", tls=tls)


def test_active_mode_echo_and_store(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    tls = TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["server"].pem)
    report = echo(endpoint(scp.port, tls))
    assert report.ok
    assert report.secured
    handshake = steps(report)["tls-handshake"]
    assert handshake.outcome == Outcome.PASSED
    assert handshake.data["protocol"] in ("TLSv1.2", "TLSv1.3")
    assert "pacs.hospital.test" in handshake.detail
    assert handshake.data["peer_certificate"]["sha256"] == pki["server"].fingerprint

    instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
    result = store_instances(endpoint(scp.port, tls), instances)
    assert result.all_stored
    assert len(scp.received()) == 1


def test_encryption_only_shows_fingerprint_then_pins(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    first = echo(endpoint(scp.port, TlsSettings(TlsMode.ENCRYPTION_ONLY)))
    assert first.ok
    handshake = steps(first)["tls-handshake"]
    assert handshake.outcome == Outcome.WARNING
    assert "confirm" in handshake.action
    seen = handshake.data["peer_certificate"]["sha256"]
    assert seen == pki["server"].fingerprint

    pinned = echo(endpoint(scp.port, TlsSettings(TlsMode.ENCRYPTION_ONLY, pinned_fingerprint=seen)))
    assert steps(pinned)["tls-handshake"].outcome == Outcome.PASSED


def test_changed_certificate_stops_sending(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    tls = TlsSettings(TlsMode.ENCRYPTION_ONLY, pinned_fingerprint=pki["other"].fingerprint)
    report = echo(endpoint(scp.port, tls))
    assert not report.ok
    assert "different from the pinned one" in steps(report)["tls-handshake"].detail

    instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
    result = store_instances(endpoint(scp.port, tls), instances)
    assert not result.outcomes[0].stored
    assert "different from the pinned one" in result.outcomes[0].meaning
    assert scp.received() == []


def test_unpinned_encryption_only_refused_where_pin_required(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    forwarding = Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", "STORESCP", tls=TlsSettings(TlsMode.ENCRYPTION_ONLY), require_pin=True)
    instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
    result = store_instances(forwarding, instances)
    assert not result.outcomes[0].stored
    assert "not been confirmed" in result.outcomes[0].meaning
    assert scp.received() == []


def test_untrusted_certificate(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    report = echo(endpoint(scp.port, TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["other"].pem)))
    assert not report.ok
    detail = steps(report)["tls-handshake"].detail
    assert "untrusted" in detail
    assert "The SCP presents: subject CN=pacs.hospital.test" in detail


def test_expired_certificate(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["expired"])
    report = echo(endpoint(scp.port, TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["expired"].pem)))
    assert not report.ok
    assert "expired" in steps(report)["tls-handshake"].detail


def test_certificate_expiring_soon_is_flagged(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["soon"])
    report = echo(endpoint(scp.port, TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["soon"].pem)))
    assert report.ok
    handshake = steps(report)["tls-handshake"]
    assert handshake.outcome == Outcome.WARNING
    assert "expires within 30 days" in handshake.action


def test_hostname_check_is_optional(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    strict = TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["server"].pem, check_hostname=True, server_name="pacs.internal")
    report = echo(endpoint(scp.port, strict))
    detail = steps(report)["tls-handshake"].detail
    assert "does not name pacs.internal" in detail
    assert "names localhost, 127.0.0.1" in detail
    fixed = TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["server"].pem, check_hostname=True, server_name="localhost")
    assert echo(endpoint(scp.port, fixed)).ok


def test_client_certificate_required_but_missing(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"], "-rc", "+cf", str(pki["client-ca"].cert))
    report = echo(endpoint(scp.port, TlsSettings(TlsMode.ACTIVE, scp_certificate_pem=pki["server"].pem)))
    assert not report.ok
    assert "requires a client certificate" in steps(report)["tls-handshake"].detail


def test_client_certificate_accepted(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"], "-rc", "+cf", str(pki["client-ca"].cert))
    tls = TlsSettings(
        TlsMode.ACTIVE,
        scp_certificate_pem=pki["server"].pem,
        client_certificate=pki["client"].cert,
        client_key=pki["client"].key,
    )
    assert echo(endpoint(scp.port, tls)).ok
    instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
    assert store_instances(endpoint(scp.port, tls), instances).all_stored


def test_client_certificate_not_trusted_by_scp(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"], "-rc", "+cf", str(pki["other"].cert))
    tls = TlsSettings(
        TlsMode.ACTIVE,
        scp_certificate_pem=pki["server"].pem,
        client_certificate=pki["client"].cert,
        client_key=pki["client"].key,
    )
    report = echo(endpoint(scp.port, tls))
    assert not report.ok
    assert "did not accept our client certificate" in steps(report)["tls-handshake"].detail


def test_tls_to_plain_port(start_storescp):
    scp = start_storescp()
    report = echo(endpoint(scp.port, TlsSettings(TlsMode.ENCRYPTION_ONLY)))
    assert not report.ok
    assert "does not speak TLS" in steps(report)["tls-handshake"].detail


def test_plain_to_tls_port_suggests_tls(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    report = echo(Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", "STORESCP", acse_timeout=3))
    assert not report.ok
    association = steps(report)["association"]
    assert association.outcome == Outcome.FAILED
    assert "expects DICOM-TLS" in association.detail
    assert "--tls" in association.action


def test_no_common_cipher(tmp_path, pki):
    """A server limited to a cipher outside BCP 195 (static RSA key exchange, no forward secrecy)."""
    rsa_server = tmp_path / "rsa.pem"
    key = tmp_path / "rsa.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(rsa_server),
         "-days", "5", "-subj", "/CN=legacy"],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA256")
    context.load_cert_chain(rsa_server, key)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        # Echo connects twice: once for the TCP step, once for the handshake.
        for _ in range(2):
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    report = echo(endpoint(port, TlsSettings(TlsMode.ENCRYPTION_ONLY)))
    listener.close()
    assert not report.ok
    assert "no TLS protocol version or cipher suite in common" in steps(report)["tls-handshake"].detail


def test_cli_encryption_only_prints_fingerprint(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    run = subprocess.run(
        [*CLI, "store", "127.0.0.1", str(scp.port), str(SAMPLES / "US1_UNCR.dcm"), "--calling-aet", "PB",
         "--called-aet", "STORESCP", "--tls", "encryption-only"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    display = ":".join(pki["server"].fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert display in run.stderr


def test_cli_echo_active_json(start_storescp, pki):
    scp = tls_scp(start_storescp, pki["server"])
    run = subprocess.run(
        [*CLI, "echo", "127.0.0.1", str(scp.port), "--calling-aet", "PB", "--called-aet", "STORESCP", "--tls",
         "active", "--scp-cert", str(pki["server"].cert), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["secured"] is True
    assert [step["name"] for step in data["steps"]] == ["tcp-connect", "tls-handshake", "association", "c-echo", "release"]


def test_cli_active_without_certificate_exit_2():
    run = subprocess.run(
        [*CLI, "echo", "127.0.0.1", "2762", "--calling-aet", "PB", "--called-aet", "X", "--tls", "active"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--scp-cert" in run.stderr
