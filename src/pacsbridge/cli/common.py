"""Options and helpers shared by the commands that talk to a DICOM peer."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from pacsbridge.connections.aetitle import check_ae_title
from pacsbridge.connections.problems import Problem, Severity
from pacsbridge.connections.settings import (
    DEFAULT_TIMEOUT_SECONDS,
    check_host,
    check_port,
    check_timeout,
)
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.tls.context import TlsMode, TlsSettings

HostArg = Annotated[str, typer.Argument(help="Host name or IP address of the SCP.")]
PortArg = Annotated[int, typer.Argument(help="TCP port of the SCP.")]
CallingAetOpt = Annotated[str, typer.Option("--calling-aet", help="Our AE title, as the SCP knows it.")]
CalledAetOpt = Annotated[str, typer.Option("--called-aet", help="The SCP's AE title.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
AcseTimeoutOpt = Annotated[
    float, typer.Option("--acse-timeout", help="Seconds to wait for association set-up and release.")
]
DimseTimeoutOpt = Annotated[float, typer.Option("--dimse-timeout", help="Seconds to wait for each DIMSE response.")]
ConnectionTimeoutOpt = Annotated[
    float, typer.Option("--connection-timeout", help="Seconds to wait for the TCP connection.")
]
BindAddressOpt = Annotated[
    str | None,
    typer.Option("--bind-address", help="Local address to send from, when the firewall allows only one."),
]

TlsOpt = Annotated[
    TlsMode | None,
    typer.Option(
        "--tls",
        help="Use DICOM-TLS: 'active' verifies the SCP against --scp-cert; 'encryption-only' "
        "encrypts and prints the SCP certificate's fingerprint. Without it, plain DICOM (unsecured).",
    ),
]
ScpCertOpt = Annotated[
    Path | None,
    typer.Option("--scp-cert", help="The SCP's certificate or chain (PEM, Base64 .cer or DER), the trust anchor."),
]
ClientCertOpt = Annotated[
    Path | None, typer.Option("--client-cert", help="Our client certificate (PEM), for SCPs that require one.")
]
ClientKeyOpt = Annotated[Path | None, typer.Option("--client-key", help="The private key of --client-cert (PEM).")]
ServerNameOpt = Annotated[
    str | None, typer.Option("--server-name", help="TLS server name to send and check, instead of HOST.")
]
PinnedFingerprintOpt = Annotated[
    str | None,
    typer.Option("--pinned-fingerprint", help="With --tls encryption-only: the confirmed SHA-256 fingerprint (hex)."),
]
CheckHostnameOpt = Annotated[
    bool, typer.Option("--check-hostname", help="With --tls active: also check that the certificate names the host.")
]
LegacyCiphersOpt = Annotated[
    bool, typer.Option("--legacy-ciphers", help="Allow older CBC cipher suites for old TLS stacks (weaker).")
]

# Exit codes: 1 for a failed operation, 2 for invalid input (as Click uses for usage errors).
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        label = "error" if problem.severity == Severity.ERROR else "warning"
        typer.echo(f"{label}: {problem.message}", err=True)


def build_endpoint(
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    *,
    acse_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    dimse_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    connection_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    bind_address: str | None = None,
    tls: TlsSettings | None = None,
) -> Endpoint:
    """Validate the command-line target and return it as an `Endpoint`; exit 2 on invalid input."""
    problems = (
        check_ae_title("--calling-aet", calling_aet)
        + check_ae_title("--called-aet", called_aet)
        + check_host(host)
        + check_port(port)
        + check_timeout("--acse-timeout", acse_timeout)
        + check_timeout("--dimse-timeout", dimse_timeout)
        + check_timeout("--connection-timeout", connection_timeout)
    )
    print_problems(problems)
    if any(problem.severity == Severity.ERROR for problem in problems):
        raise typer.Exit(EXIT_INVALID_INPUT)
    return Endpoint(
        host=host,
        port=port,
        calling_ae_title=calling_aet,
        called_ae_title=called_aet,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        connection_timeout=connection_timeout,
        bind_address=bind_address,
        tls=tls,
    )


def tls_from_options(
    mode: TlsMode | None,
    scp_cert: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    server_name: str | None,
    pinned_fingerprint: str | None = None,
    check_hostname: bool = False,
    legacy_ciphers: bool = False,
) -> TlsSettings | None:
    """Return the TLS settings the options ask for, or None for plain DICOM; exit 2 on invalid input."""
    from pacsbridge.connections.settings import normalize_fingerprint
    from pacsbridge.tls.certificates import (
        KEY_WITHOUT_CERTIFICATE,
        MAX_UPLOAD_BYTES,
        CertificateError,
        check_key_matches_certificate,
        load_private_key_pem,
        parse_certificate_upload,
    )

    if mode is None:
        given = [
            name
            for name, value in (
                ("--scp-cert", scp_cert),
                ("--client-cert", client_cert),
                ("--client-key", client_key),
                ("--server-name", server_name),
                ("--pinned-fingerprint", pinned_fingerprint),
            )
            if value
        ]
        if given:
            fail(f"error: {', '.join(given)} needs --tls active or --tls encryption-only.", EXIT_INVALID_INPUT)
        return None
    if (client_cert is None) != (client_key is None):
        fail("error: a client certificate needs both --client-cert FILE and --client-key FILE.", EXIT_INVALID_INPUT)
    pem = None
    if scp_cert is not None:
        pem = read_scp_certificate(scp_cert)
    if mode == TlsMode.ACTIVE and pem is None:
        fail(
            "error: --tls active verifies the SCP against its certificate: give it with --scp-cert FILE, "
            "or use --tls encryption-only.",
            EXIT_INVALID_INPUT,
        )
    if pinned_fingerprint is not None:
        normalized = normalize_fingerprint(pinned_fingerprint)
        if normalized is None:
            fail(
                f"error: --pinned-fingerprint {pinned_fingerprint!r} is not a SHA-256 fingerprint. Use the 64 hex "
                "digits that Echo printed, with or without colons.",
                EXIT_INVALID_INPUT,
            )
        pinned_fingerprint = normalized
    for option, path in (("--client-cert", client_cert), ("--client-key", client_key)):
        if path is not None and not path.is_file():
            fail(f"error: {option} {path}: file not found.", EXIT_INVALID_INPUT)
    if client_cert is not None and client_key is not None:
        # Checked before connecting, so that a wrong file is named in plain words and not reported as
        # OpenSSL text during the TLS handshake.
        try:
            cert_data = client_cert.read_bytes()[: MAX_UPLOAD_BYTES + 1]
            key_data = client_key.read_bytes()[: MAX_UPLOAD_BYTES + 1]
        except OSError as exc:
            fail(f"error: {exc.filename}: cannot be read ({exc.strerror or exc}).", EXIT_INVALID_INPUT)
        try:
            # Python's ssl module also reads a certificate file that contains the key, so a key is skipped here.
            upload = parse_certificate_upload(cert_data, skip_private_keys=True)
        except CertificateError as exc:
            fix = "Give the client certificate as a PEM file" if exc.reason == KEY_WITHOUT_CERTIFICATE else exc.fix
            fail(f"error: --client-cert {client_cert}: {exc.reason}. {fix}.", EXIT_INVALID_INPUT)
        if upload.source_format != "pem":
            fail(
                f"error: --client-cert {client_cert}: is not a PEM certificate, and the TLS library reads PEM only. "
                f"Convert it, for example with 'openssl x509 -inform DER -in {client_cert} -out client.pem'.",
                EXIT_INVALID_INPUT,
            )
        if b"PRIVATE KEY-----" not in key_data:
            fail(
                f"error: --client-key {client_key}: not a PEM private key. Give the key file of the client "
                "certificate, whose first line ends with 'PRIVATE KEY-----'.",
                EXIT_INVALID_INPUT,
            )
        try:
            key = load_private_key_pem(key_data)
        except CertificateError as exc:
            fail(f"error: --client-key {client_key}: {exc}", EXIT_INVALID_INPUT)
        try:
            check_key_matches_certificate(key, upload.certificates[0])
        except CertificateError:
            fail(
                f"error: --client-key {client_key}: the key does not belong to the certificate in --client-cert "
                f"{client_cert}. Give the key that the certificate was issued for.",
                EXIT_INVALID_INPUT,
            )
    return TlsSettings(
        mode=mode,
        scp_certificate_pem=pem,
        pinned_fingerprint=pinned_fingerprint,
        client_certificate=client_cert,
        client_key=client_key,
        server_name=server_name,
        check_hostname=check_hostname,
        legacy_ciphers=legacy_ciphers,
    )


def read_scp_certificate(path: Path) -> str:
    """Read an SCP certificate file as PEM; exit 2 with the reason when it is not a certificate."""
    from pacsbridge.tls.certificates import CertificateError, parse_certificate_upload

    try:
        data = path.read_bytes()
    except OSError as exc:
        fail(f"error: --scp-cert {path}: {exc.strerror or exc}.", EXIT_INVALID_INPUT)
    try:
        upload = parse_certificate_upload(data)
    except CertificateError as exc:
        fail(f"error: --scp-cert {path}: {exc}", EXIT_INVALID_INPUT)
    if upload.converted_from_der:
        typer.echo(f"note: --scp-cert {path} was DER and has been converted to PEM.", err=True)
    return upload.pem


def announce_encryption_only_peer(endpoint: Endpoint) -> None:
    """Print the fingerprint of the SCP's certificate in encryption-only mode; exit 1 if TLS fails."""
    from pacsbridge.dicomnet.association import probe_endpoint_tls
    from pacsbridge.tls.certificates import colon_fingerprint
    from pacsbridge.tls.handshake import TlsFailure

    if endpoint.tls is None or endpoint.tls.mode != TlsMode.ENCRYPTION_ONLY:
        return
    try:
        result = probe_endpoint_tls(endpoint)
    except TlsFailure as exc:
        fail(f"error: {exc.failure.summary} {exc.failure.action}")
    if result.peer is not None:
        typer.echo(
            f"SCP certificate: {result.peer.subject}, SHA-256 {colon_fingerprint(result.peer.fingerprint)} "
            f"({result.trust}; {result.protocol})",
            err=True,
        )


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def command_actor() -> str:
    """Return the name recorded as actor in audit events: the operating system user running the command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        # No login name in the environment and no passwd entry, as in some containers.
        return "cli:unknown"
