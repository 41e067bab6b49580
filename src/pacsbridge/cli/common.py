"""Options and helpers shared by the commands that talk to a DICOM peer."""

from __future__ import annotations

import json
import sys
from typing import Annotated, NoReturn

import typer

from pacsbridge.connections.aetitle import check_ae_title
from pacsbridge.connections.problems import Problem, Severity
from pacsbridge.connections.settings import DEFAULT_TIMEOUT_SECONDS, check_host, check_port, check_timeout
from pacsbridge.dicomnet.association import Endpoint

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
) -> Endpoint:
    """Validate the command-line target and return it as an `Endpoint`; exit 2 on invalid input."""
    problems = (
        check_ae_title("calling AE title (--calling-aet)", calling_aet)
        + check_ae_title("called AE title (--called-aet)", called_aet)
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
    )


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
