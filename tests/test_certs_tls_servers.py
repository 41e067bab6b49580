"""Certificates from `pacsbridge certs create`, served by nginx, HAProxy and stunnel on loopback ports.

Each server runs in the foreground with its own configuration, logs and pid
file in a temporary directory. The client is Python's ssl module with
cert.pem as the only trust anchor and host name checking off, as pacsbridge
connects to a PACS. Each handshake must succeed, and the peer certificate
must be ours.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from typer.testing import CliRunner

import pacsbridge.cli.certs_cmd  # noqa: F401  (registers the commands on the app)
from pacsbridge.cli.app import app
from pacsbridge.tls.certificates import parse_certificate_upload, sha256_fingerprint

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
DEBIAN_PACKAGES = "nginx-light libnginx-mod-stream haproxy stunnel4"


@dataclass(frozen=True)
class Material:
    directory: Path
    key: Path
    cert: Path
    fingerprint: str


def create_material(directory: Path, *options: str) -> Material:
    result = CliRunner().invoke(
        app, ["certs", "create", str(directory), "--cn", "pacsbridge.test", "--san", "127.0.0.1", *options]
    )
    assert result.exit_code == 0, result.output
    cert = directory / "cert.pem"
    fingerprint = sha256_fingerprint(parse_certificate_upload(cert.read_bytes()).certificates[0])
    return Material(directory, directory / "key.pem", cert, fingerprint)


@pytest.fixture(scope="module", params=["rsa", "ec"])
def material(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Material:
    options = ["--ec"] if request.param == "ec" else []
    return create_material(tmp_path_factory.mktemp(f"tls-{request.param}") / "out", *options)


@pytest.fixture(scope="module")
def other_material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    """A second certificate, to check that the client rejects a server it does not trust."""
    return create_material(tmp_path_factory.mktemp("tls-other") / "out", "--ec")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian packages: {DEBIAN_PACKAGES})")
    return path


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[list[str], int, Path], None]]:
    """Start TLS server commands that listen on 127.0.0.1:port, and stop each one after the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], port: int, log_path: Path) -> None:
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp_path)
        processes.append(process)
        try:
            wait_for_port(port, process)
        except RuntimeError as exc:
            log_text = log_path.read_text(errors="replace")
            pytest.fail(f"{command[0]} did not start: {exc}\n{log_text}")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def handshake(port: int, cafile: Path, *, strict: bool = False) -> tuple[str, str | None]:
    """Connect with TLS to 127.0.0.1:port, trusting only `cafile`.

    Returns the SHA-256 fingerprint of the peer certificate and the TLS version.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(cafile))
    if strict:
        # The two flags that create_default_context sets from Python 3.13 on.
        context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock) as tls:
            peer_der = tls.getpeercert(binary_form=True)
            version = tls.version()
    assert peer_der is not None
    return hashlib.sha256(peer_der).hexdigest(), version


def check_server(port: int, material: Material, other_material: Material) -> None:
    fingerprint, version = handshake(port, material.cert)
    assert fingerprint == material.fingerprint
    assert version in ("TLSv1.2", "TLSv1.3")

    strict_fingerprint, _ = handshake(port, material.cert, strict=True)
    assert strict_fingerprint == material.fingerprint

    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, other_material.cert)


def test_nginx_http(
    material: Material, other_material: Material, tmp_path: Path, start_server: Callable[..., None]
) -> None:
    nginx = require_tool("nginx")
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/client_body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {material.cert};
        ssl_certificate_key {material.key};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    command = [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config), "-g", "daemon off;"]

    start_server(command, port, tmp_path / "nginx-output.log")

    check_server(port, material, other_material)


def test_nginx_stream(
    material: Material, other_material: Material, tmp_path: Path, start_server: Callable[..., None]
) -> None:
    nginx = require_tool("nginx")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip(f"{NGINX_STREAM_MODULE} is missing (Debian package libnginx-mod-stream)")
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"""
load_module {NGINX_STREAM_MODULE};
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 16; }}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {material.cert};
        ssl_certificate_key {material.key};
        return "ok\\n";
    }}
}}
"""
    )
    command = [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config), "-g", "daemon off;"]

    start_server(command, port, tmp_path / "nginx-output.log")

    check_server(port, material, other_material)


def test_haproxy(
    material: Material, other_material: Material, tmp_path: Path, start_server: Callable[..., None]
) -> None:
    haproxy = require_tool("haproxy")
    port = free_port()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(material.cert.read_bytes() + material.key.read_bytes())
    combined.chmod(0o600)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
global
    log stderr format raw local0 info

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 5s
    timeout server 5s

frontend tls
    bind 127.0.0.1:{port} ssl crt {combined}
    http-request return status 200 content-type text/plain string ok
"""
    )
    check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    # -db keeps HAProxy in the foreground.
    start_server([haproxy, "-db", "-f", str(config)], port, tmp_path / "haproxy.log")

    check_server(port, material, other_material)


def test_stunnel(
    material: Material, other_material: Material, tmp_path: Path, start_server: Callable[..., None]
) -> None:
    stunnel = shutil.which("stunnel4") or require_tool("stunnel")
    port = free_port()
    config = tmp_path / "stunnel.conf"
    # stunnel runs /bin/echo for each connection, so no backend server is needed.
    config.write_text(
        f"""
foreground = yes
pid = {tmp_path}/stunnel.pid
output = {tmp_path}/stunnel.log
debug = info

[tls]
accept = 127.0.0.1:{port}
cert = {material.cert}
key = {material.key}
exec = /bin/echo
execArgs = echo ok
"""
    )

    start_server([stunnel, str(config)], port, tmp_path / "stunnel-output.log")

    check_server(port, material, other_material)
