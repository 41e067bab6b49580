"""`pacsbridge store`: send DICOM files to a storage SCP by C-STORE."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from pydicom.uid import UID

from pacsbridge.cli.app import app
from pacsbridge.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
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
    announce_encryption_only_peer,
    build_endpoint,
    fail,
    print_json,
    tls_from_options,
)
from pacsbridge.connections.charset import check_character_set
from pacsbridge.connections.problems import Problem, Severity
from pacsbridge.connections.settings import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_TIMEOUT_SECONDS,
    Compression,
    MonochromeMode,
    check_jpeg_quality,
    check_timezone,
)
from pacsbridge.dicomnet.store import StoreOutcome, store_instances
from pacsbridge.ingest.files import collect_instances, find_duplicate_uids
from pacsbridge.prepare.plan import Preparation

PathsArg = Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")]
_COMPRESSION_CHOICES = "|".join(member.value for member in Compression)
ImageCompressionOpt = Annotated[
    Compression,
    typer.Option(
        "--image-compression",
        metavar=_COMPRESSION_CHOICES,
        help="Compression of still images: as-received sends them unchanged.",
    ),
]
LoopCompressionOpt = Annotated[
    Compression,
    typer.Option(
        "--loop-compression",
        metavar=_COMPRESSION_CHOICES,
        help="Compression of cine loops (several frames): as-received sends them unchanged.",
    ),
]
JpegQualityOpt = Annotated[
    int,
    typer.Option("--jpeg-quality", metavar="N", help="JPEG Baseline quality from 1 to 100."),
]
MonochromeOpt = Annotated[
    MonochromeMode,
    typer.Option(
        "--monochrome",
        metavar="never|b-mode-only",
        help="b-mode-only stores colour images whose content is grey as MONOCHROME2.",
    ),
]
TimezoneOpt = Annotated[
    str | None,
    typer.Option(
        "--timezone",
        metavar="ZONE",
        help="IANA time zone of the SCP: dates and times whose instant is known are converted to it. "
        "Not given: times go as received.",
    ),
]
CharsetOpt = Annotated[
    str | None,
    typer.Option(
        "--charset",
        metavar="TERM",
        help="Specific Character Set of the SCP, such as 'ISO_IR 100' or 'ISO_IR 192': text is encoded in it. "
        "Not given: text goes as received.",
    ),
]


def preparation_from_options(
    image_compression: Compression,
    loop_compression: Compression,
    jpeg_quality: int,
    monochrome: MonochromeMode,
    timezone: str | None,
    charset: str | None,
) -> Preparation:
    """Check the preparation options and return them as a `Preparation`; exit 2 naming each bad value."""
    problems: list[Problem] = check_jpeg_quality(
        jpeg_quality, used=Compression.JPEG_BASELINE in (image_compression, loop_compression)
    )
    if timezone is not None:
        problems += check_timezone(timezone)
    if charset is not None:
        problems += check_character_set("charset", charset)
    options = {"jpeg_quality": "--jpeg-quality", "timezone": "--timezone", "charset": "--charset"}
    for problem in problems:
        label = "error" if problem.severity == Severity.ERROR else "warning"
        typer.echo(
            f"{label}: {options.get(problem.field, problem.field)} {problem.value!r} {problem.reason}. {problem.fix}",
            err=True,
        )
    if any(problem.severity == Severity.ERROR for problem in problems):
        raise typer.Exit(EXIT_INVALID_INPUT)
    return Preparation(
        image_compression=image_compression,
        loop_compression=loop_compression,
        jpeg_quality=jpeg_quality,
        monochrome=monochrome,
        timezone=timezone,
        character_set=charset,
    )


def format_outcome(outcome: StoreOutcome) -> str:
    status = "----" if outcome.status is None else f"0x{outcome.status:04X}"
    how = ""
    if outcome.conversion and outcome.conversion != "as-is" and outcome.sent_transfer_syntax:
        how = f", {outcome.conversion} as {UID(outcome.sent_transfer_syntax).name}"
    line = f"{outcome.category.value.upper():<8} {status}  {outcome.path}  {outcome.sop_instance_uid}  {outcome.meaning}{how}"
    for note in outcome.notes:
        line += f"\n         Note: {note}"
    if outcome.failure is not None and outcome.failure.action:
        line += f"\n         What to do: {outcome.failure.action}"
    return line


@app.command("store")
def store_command(
    host: HostArg,
    port: PortArg,
    paths: PathsArg,
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
    image_compression: ImageCompressionOpt = Compression.AS_RECEIVED,
    loop_compression: LoopCompressionOpt = Compression.AS_RECEIVED,
    jpeg_quality: JpegQualityOpt = DEFAULT_JPEG_QUALITY,
    monochrome: MonochromeOpt = MonochromeMode.NEVER,
    timezone: TimezoneOpt = None,
    charset: CharsetOpt = None,
) -> None:
    """Send DICOM files to a PACS by C-STORE over one association and print each outcome.

    The preparation options work as on a stored connection; without them the
    files go as received.

    Exits 0 only when every instance was stored (success or warning status).
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
    preparation = preparation_from_options(
        image_compression, loop_compression, jpeg_quality, monochrome, timezone, charset
    )
    announce_encryption_only_peer(endpoint)
    missing = [path for path in paths if not path.exists()]
    if missing:
        fail(f"error: {', '.join(map(str, missing))}: file or folder not found.", EXIT_INVALID_INPUT)
    instances, rejected = collect_instances(paths)
    for bad in rejected:
        typer.echo(f"error: {bad.path}: {bad.reason}", err=True)
    for uid, duplicates in find_duplicate_uids(instances).items():
        typer.echo(
            f"warning: {len(duplicates)} files share SOP Instance UID {uid}: "
            f"{', '.join(map(str, duplicates))}; the PACS keeps only one of them.",
            err=True,
        )
    if not instances:
        fail("error: no DICOM files to send; give DICOM files or folders that contain them.")

    show_progress = sys.stdout.isatty() and not json_output
    outcomes: list[StoreOutcome] = []
    if show_progress:
        with typer.progressbar(length=len(instances), label="Sending", file=sys.stderr) as bar:

            def on_outcome(outcome: StoreOutcome) -> None:
                outcomes.append(outcome)
                bar.update(1)

            result = store_instances(endpoint, instances, preparation=preparation, on_outcome=on_outcome)
    else:
        result = store_instances(endpoint, instances, preparation=preparation)

    if json_output:
        data = result.as_dict()
        data["all_stored"] = result.all_stored and not rejected
        data["rejected"] = len(rejected)
        data["rejected_files"] = [bad.as_dict() for bad in rejected]
        print_json(data)
    else:
        for outcome in result.outcomes:
            typer.echo(format_outcome(outcome))
        stored = sum(outcome.stored for outcome in result.outcomes)
        typer.echo(
            f"{stored} of {len(result.outcomes)} instances stored at {endpoint.address}"
            + (f"; {len(rejected)} files rejected before sending" if rejected else "")
            + "."
        )
    if not result.all_stored or rejected:
        raise typer.Exit(EXIT_FAILED)
