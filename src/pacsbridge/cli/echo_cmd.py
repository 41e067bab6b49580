"""`pacsbridge echo`: test a DICOM connection step by step."""

from __future__ import annotations

import typer

from pacsbridge.cli.app import app
from pacsbridge.cli.common import (
    EXIT_FAILED,
    AcseTimeoutOpt,
    BindAddressOpt,
    CalledAetOpt,
    CallingAetOpt,
    CheckHostnameOpt,
    ClientCertOpt,
    ClientKeyOpt,
    ConnectionTimeoutOpt,
    DimseTimeoutOpt,
    HostArg,
    JsonOpt,
    LegacyCiphersOpt,
    PinnedFingerprintOpt,
    PortArg,
    ScpCertOpt,
    ServerNameOpt,
    TlsOpt,
    build_endpoint,
    print_json,
    tls_from_options,
)
from pacsbridge.connections.settings import DEFAULT_TIMEOUT_SECONDS
from pacsbridge.dicomnet.echo import EchoReport, EchoStep, Outcome, echo

_MARKS = {
    Outcome.PASSED: "PASS",
    Outcome.WARNING: "WARN",
    Outcome.FAILED: "FAIL",
    Outcome.SKIPPED: "SKIP",
}


def format_step(step: EchoStep) -> str:
    line = f"[{_MARKS[step.outcome]}] {step.title:<16} {step.duration_ms:8.1f} ms  {step.detail}"
    if step.action:
        line += f"\n{'':>31}What to do: {step.action}"
    return line


def format_report(report: EchoReport) -> str:
    security = "TLS" if report.secured else "unsecured (no TLS)"
    verdict = "Echo succeeded." if report.ok else "Echo failed."
    return (
        f"Echo {report.calling_ae_title} -> {report.called_ae_title} at {report.host}:{report.port}, {security}\n"
        + "\n".join(format_step(step) for step in report.steps)
        + f"\n{verdict}"
    )


@app.command("echo")
def echo_command(
    host: HostArg,
    port: PortArg,
    calling_aet: CallingAetOpt,
    called_aet: CalledAetOpt,
    json_output: JsonOpt = False,
    acse_timeout: AcseTimeoutOpt = DEFAULT_TIMEOUT_SECONDS,
    dimse_timeout: DimseTimeoutOpt = DEFAULT_TIMEOUT_SECONDS,
    connection_timeout: ConnectionTimeoutOpt = DEFAULT_TIMEOUT_SECONDS,
    bind_address: BindAddressOpt = None,
    tls: TlsOpt = None,
    scp_cert: ScpCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    server_name: ServerNameOpt = None,
    pinned_fingerprint: PinnedFingerprintOpt = None,
    check_hostname: CheckHostnameOpt = False,
    legacy_ciphers: LegacyCiphersOpt = False,
) -> None:
    """Test a connection: TCP connect, association, C-ECHO and release, each reported.

    Exits 0 only when the association was accepted and C-ECHO succeeded.
    Connect and association waits are capped at 15 s.
    """
    endpoint = build_endpoint(
        host,
        port,
        calling_aet,
        called_aet,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        connection_timeout=connection_timeout,
        bind_address=bind_address,
        tls=tls_from_options(
            tls, scp_cert, client_cert, client_key, server_name, pinned_fingerprint, check_hostname, legacy_ciphers
        ),
    )
    report = echo(endpoint)
    if json_output:
        print_json(report.as_dict())
    else:
        typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
