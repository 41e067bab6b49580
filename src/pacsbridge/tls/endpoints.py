"""Endpoints of stored connections, with their TLS settings and SCU client certificate.

Python's ssl module (and so pynetdicom) loads a client certificate and key
only from file paths. The decrypted key therefore goes into an anonymous
in-memory file (memfd_create, Linux) that is opened through /proc/self/fd.
It never reaches a disk and disappears when it is closed or the process ends,
even on SIGKILL. Only this process, root and processes that may trace it can
open it. Where memfd_create or /proc is missing, a file with mode 0600 in a
new directory with mode 0700 is used and deleted afterwards. A killed process
can leave that file behind.

Usage, with the database work done before the network I/O:

    identity = prepare_client_identity(session, record, secret_key)  # None without SCU authentication
    with stored_endpoint(to_settings(record), identity) as endpoint:
        echo(endpoint)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from pacsbridge.connections import ConnectionSettings, ScuAuthentication, TlsMode
from pacsbridge.db.models import ConnectionRecord
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.tls.certificates import private_key_pem
from pacsbridge.tls.client_ca import (
    ClientCertificateError,
    ClientIdentity,
    ensure_client_certificate,
    load_client_identity,
)
from pacsbridge.tls.secret_key import SecretKey, load_secret_key

_PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class ClientKeyFiles:
    """Paths of a client certificate and its private key, valid inside `client_key_files` only."""

    certificate: Path
    key: Path


def uses_client_certificate(settings: ConnectionSettings) -> bool:
    """Return whether the connection authenticates with a client certificate (SCU authentication over TLS)."""
    return settings.tls_mode != TlsMode.INACTIVE and settings.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE


def endpoint_for(
    settings: ConnectionSettings,
    *,
    client_identity: ClientKeyFiles | None = None,
    bind_address: str | None = None,
    require_pin: bool = False,
) -> Endpoint:
    """Build the Endpoint of a connection: TLS from its settings (None when inactive), plus the client certificate.

    Raises ClientCertificateError when SCU authentication is on but no
    `client_identity` is given, so that nothing connects without it unnoticed.
    """
    if uses_client_certificate(settings) and client_identity is None:
        raise ClientCertificateError(
            f"connection {settings.name!r} authenticates with a client certificate, but none was given"
        )
    certificate = client_identity.certificate if client_identity and settings.tls_mode != TlsMode.INACTIVE else None
    key = client_identity.key if client_identity and settings.tls_mode != TlsMode.INACTIVE else None
    return Endpoint.from_settings(
        settings,
        bind_address=bind_address,
        client_certificate=certificate,
        client_key=key,
        require_pin=require_pin,
    )


def prepare_client_identity(
    session: Session, record: ConnectionRecord, secret_key: SecretKey | None = None
) -> ClientIdentity | None:
    """Return the decrypted active client certificate of `record`, or None without SCU authentication.

    Issues the first certificate when the connection has none. `secret_key`
    defaults to PACSBRIDGE_SECRET_KEY, and SecretKeyError reports it missing or wrong.
    """
    enabled = record.tls_mode != TlsMode.INACTIVE and record.scu_authentication == ScuAuthentication.CLIENT_CERTIFICATE
    if not enabled:
        return None
    key = secret_key or load_secret_key()
    certificate, _ = ensure_client_certificate(session, record, key)
    return load_client_identity(certificate, key)


@contextlib.contextmanager
def client_key_files(identity: ClientIdentity, *, in_memory: bool = True) -> Iterator[ClientKeyFiles]:
    """Provide the certificate and decrypted key as PEM files for the block, and remove them afterwards.

    `in_memory` chooses memfd files where the platform has them, and False
    forces the temporary-directory fallback.
    """
    key_pem = private_key_pem(identity.private_key)
    if in_memory and hasattr(os, "memfd_create") and _PROC_FD.is_dir():
        with _memory_file("client-certificate", identity.certificate_pem) as certificate_path:
            with _memory_file("client-key", key_pem) as key_path:
                yield ClientKeyFiles(certificate_path, key_path)
        return
    directory = Path(tempfile.mkdtemp(prefix="pacsbridge-client-"))
    try:
        certificate_path = directory / "client-certificate.pem"
        key_path = directory / "client-key.pem"
        _write_private_file(certificate_path, identity.certificate_pem)
        _write_private_file(key_path, key_pem)
        yield ClientKeyFiles(certificate_path, key_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def stored_endpoint(
    settings: ConnectionSettings,
    identity: ClientIdentity | None,
    *,
    bind_address: str | None = None,
    require_pin: bool = False,
) -> Iterator[Endpoint]:
    """Provide the Endpoint of a connection for the block, with its client key files while the block runs."""
    if identity is None:
        yield endpoint_for(settings, bind_address=bind_address, require_pin=require_pin)
        return
    with client_key_files(identity) as files:
        yield endpoint_for(settings, client_identity=files, bind_address=bind_address, require_pin=require_pin)


@contextlib.contextmanager
def _memory_file(name: str, data: bytes) -> Iterator[Path]:
    descriptor = os.memfd_create(f"pacsbridge-{name}", os.MFD_CLOEXEC)
    try:
        _write_all(descriptor, data)
        # Opening this path re-opens the anonymous file from offset 0.
        yield _PROC_FD / str(descriptor)
    finally:
        os.close(descriptor)


def _write_private_file(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(descriptor, data)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]
