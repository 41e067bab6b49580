"""TLS front ends for the topology tests: nginx, HAProxy, stunnel and Orthanc.

Each peer listens on a free 127.0.0.1 port with its own configuration, logs
and data in a test folder, and forwards plain DICOM to a peer on loopback.
The configuration text comes from the `*_config` functions, so docs/dmz.md
can show what the tests run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from tls_material import Identity

# The stream module that Debian's libnginx-mod-stream installs.
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# Orthanc calls this Lua function after it has stored each received instance.
ORTHANC_FORWARD_LUA = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'inside')
end
"""


@dataclass(frozen=True)
class Peer:
    """A running front end: the port pacsbridge connects to, and its log files."""

    port: int
    log: Path
    access_log: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def find_binary(name: str, package: str) -> str:
    """Return the path of `name`, also looking in /usr/sbin. Skip the test when it is not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


@contextmanager
def running(command: list[str], port: int, log: Path, *, timeout: float = 15.0) -> Iterator[None]:
    """Start `command`, wait until it listens on `port`, and stop it when the block ends.

    Output goes to `log`. If the process exits before it listens, the error
    contains the end of the log, which usually states the reason.
    """
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, process, timeout=timeout)
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{command[0]} did not start: {exc}\n{tail}") from None
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def nginx_config(
    folder: Path, port: int, identity: Identity, upstream_port: int, client_ca: Path | None = None
) -> str:
    """Return an nginx configuration that terminates TLS on `port` and forwards plain TCP to `upstream_port`."""
    client_lines = ""
    if client_ca is not None:
        client_lines = f"""
        ssl_verify_client on;
        ssl_client_certificate {client_ca};"""
    return f"""\
load_module {NGINX_STREAM_MODULE};
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
worker_processes 1;
events {{ worker_connections 64; }}

stream {{
    log_format dicom '$remote_addr:$remote_port $status $ssl_protocol "$ssl_client_s_dn" $session_time';
    access_log {folder}/access.log dicom;

    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {identity.cert};
        ssl_certificate_key {identity.key};
        ssl_protocols TLSv1.2 TLSv1.3;{client_lines}
        proxy_pass 127.0.0.1:{upstream_port};
    }}
}}
"""


@contextmanager
def nginx_tls_proxy(
    folder: Path, identity: Identity, upstream_port: int, *, client_ca: Path | None = None
) -> Iterator[Peer]:
    """Run nginx (stream module) terminating TLS in front of a plain DICOM peer."""
    binary = find_binary("nginx", "nginx-light")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip(f"{NGINX_STREAM_MODULE} is missing (Debian package libnginx-mod-stream)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder, port, identity, upstream_port, client_ca))
    # -e sets the error log used before the configuration is read, so nginx
    # never writes to /var/log/nginx.
    command = [binary, "-e", str(folder / "error.log"), "-c", str(config), "-g", "daemon off;"]
    access_log = folder / "access.log"
    with running(command, port, folder / "error.log"):
        _clear_readiness_line(access_log)
        yield Peer(port, folder / "error.log", access_log)


def _clear_readiness_line(access_log: Path, timeout: float = 5.0) -> None:
    """Empty the access log once it contains the line of the readiness check's connection.

    The tests then find only their own connections in it. nginx opens the log
    in append mode, so it keeps writing from the start of the emptied file.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if access_log.exists() and access_log.read_text().strip():
            access_log.write_text("")
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not log the readiness check in {access_log} within {timeout} s")


def haproxy_config(port: int, combined_pem: Path, upstream_port: int) -> str:
    """Return an HAProxy configuration that terminates TLS on `port` and forwards TCP to `upstream_port`."""
    return f"""\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 5m
    timeout server 5m

frontend dicom_tls
    bind 127.0.0.1:{port} ssl crt {combined_pem} ssl-min-ver TLSv1.2
    default_backend pacs

backend pacs
    server pacs1 127.0.0.1:{upstream_port}
"""


@contextmanager
def haproxy_tls_proxy(folder: Path, identity: Identity, upstream_port: int) -> Iterator[Peer]:
    """Run HAProxy in TCP mode terminating TLS in front of a plain DICOM peer."""
    binary = find_binary("haproxy", "haproxy")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # HAProxy reads the certificate and its key from one PEM file.
    combined = folder / "server-combined.pem"
    combined.write_text(identity.cert.read_text() + identity.key.read_text())
    combined.chmod(0o600)
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(port, combined, upstream_port))
    with running([binary, "-f", str(config), "-db"], port, folder / "haproxy.log"):
        yield Peer(port, folder / "haproxy.log")


def stunnel_config(folder: Path, port: int, identity: Identity, upstream_port: int) -> str:
    """Return a stunnel configuration that accepts TLS on `port` and connects in plain TCP to `upstream_port`."""
    return f"""\
foreground = yes
pid = {folder}/stunnel.pid
debug = notice

[dicom-tls]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{upstream_port}
cert = {identity.cert}
key = {identity.key}
sslVersionMin = TLSv1.2
"""


@contextmanager
def stunnel_tls_proxy(folder: Path, identity: Identity, upstream_port: int) -> Iterator[Peer]:
    """Run stunnel in server mode terminating TLS in front of a plain DICOM peer."""
    binary = find_binary("stunnel4", "stunnel4")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "stunnel.conf"
    config.write_text(stunnel_config(folder, port, identity, upstream_port))
    # In the foreground, stunnel logs to standard error.
    with running([binary, str(config)], port, folder / "stunnel.log"):
        yield Peer(port, folder / "stunnel.log")


def orthanc_config(
    folder: Path,
    dicom_port: int,
    http_port: int,
    identity: Identity,
    trusted: Path,
    inside: tuple[str, int],
    *,
    ae_title: str,
    client_certificate_required: bool,
) -> dict[str, object]:
    """Return an Orthanc configuration: a DICOM-TLS SCP that forwards each instance to `inside` in plain DICOM.

    `inside` is the (AE title, port) of the plain SCP on 127.0.0.1. Orthanc
    1.10.1 does not start with DICOM-TLS enabled unless
    DicomTlsTrustedCertificates names a readable file, even when client
    certificates are not required.
    """
    return {
        "Name": "pacsbridge-dmz-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [],
        "LuaScripts": [str(folder / "forward.lua")],
        # The REST API is not needed because Lua forwards the instances.
        "HttpServerEnabled": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomCheckCalledAet": True,
        "DicomPort": dicom_port,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(identity.cert),
        "DicomTlsPrivateKey": str(identity.key),
        "DicomTlsTrustedCertificates": str(trusted),
        "DicomTlsRemoteCertificateRequired": client_certificate_required,
        # Orthanc sends to a modality given in this array form in plain DICOM.
        "DicomModalities": {"inside": [inside[0], "127.0.0.1", inside[1]]},
    }


@contextmanager
def orthanc_router(
    folder: Path,
    identity: Identity,
    trusted: Path,
    inside: tuple[str, int],
    *,
    ae_title: str = "DMZROUTER",
    client_certificate_required: bool = False,
) -> Iterator[Peer]:
    """Run Orthanc as a DICOM router: DICOM-TLS in, plain DICOM out to `inside`."""
    binary = find_binary("Orthanc", "orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "forward.lua").write_text(ORTHANC_FORWARD_LUA)
    dicom_port = free_port()
    config = orthanc_config(
        folder,
        dicom_port,
        free_port(),
        identity,
        trusted,
        inside,
        ae_title=ae_title,
        client_certificate_required=client_certificate_required,
    )
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with running([binary, str(config_path)], dicom_port, folder / "orthanc.log", timeout=30.0):
        yield Peer(dicom_port, folder / "orthanc.log")
