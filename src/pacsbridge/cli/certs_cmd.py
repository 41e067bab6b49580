"""`pacsbridge certs`: create keys, CSRs, certificates and PKCS#12 bundles for DICOM-TLS, and show certificates.

No command overwrites an existing file unless --force is given. Private keys
and PKCS#12 bundles get mode 0600. Errors print "error: <file or value>:
<reason>. <fix>" on stderr. The exit status is 2 for invalid input (option
values, missing or wrong input files, existing output files) and 1 when
writing fails.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec as ec_keys

from pacsbridge.cli.app import app
from pacsbridge.cli.common import EXIT_FAILED, EXIT_INVALID_INPUT, fail, print_json
from pacsbridge.tls.certificates import (
    DEFAULT_VALIDITY_DAYS,
    EXPIRY_WARNING_DAYS,
    KEY_WITHOUT_CERTIFICATE,
    LATEST_NOT_AFTER,
    MAX_UPLOAD_BYTES,
    CertificateError,
    CertificateInfo,
    PrivateKey,
    build_csr,
    build_pkcs12,
    certificate_pem,
    check_key_matches_certificate,
    csr_pem,
    describe_certificate,
    generate_private_key,
    load_private_key_pem,
    parse_certificate_upload,
    private_key_pem,
    self_sign,
    write_output_file,
)

DEFAULT_COMMON_NAME = "pacsbridge"
# A password file needs one line, so anything larger is the wrong file.
MAX_PASSWORD_FILE_BYTES = 64 * 1024
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

certs_app = typer.Typer(
    help="Create keys and self-signed certificates for DICOM-TLS, and show certificate details.",
    no_args_is_help=True,
)
app.add_typer(certs_app, name="certs")

CommonNameOpt = Annotated[
    str, typer.Option("--cn", metavar="NAME", help="Common name (CN) of the certificate subject.")
]
AltNamesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--san",
        metavar="NAME_OR_IP",
        show_default=False,
        help="DNS name or IP address for the subjectAltName. Repeat for more (default: the common name).",
    ),
]
DaysOpt = Annotated[int, typer.Option("--days", metavar="N", help="Validity of the certificate in days.")]
EcOpt = Annotated[bool, typer.Option("--ec", help="Create an EC P-256 key instead of RSA 2048.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace output files that already exist.")]
KeyOpt = Annotated[Path, typer.Option("--key", metavar="KEY", help="PEM file with the private key.")]
OutArg = Annotated[Path, typer.Argument(metavar="OUT", help="File to write.")]


def _fail_invalid(subject: object, message: str) -> NoReturn:
    fail(f"error: {subject}: {message}", EXIT_INVALID_INPUT)


def _read_input(path: Path, max_bytes: int) -> bytes:
    """Read up to `max_bytes` + 1 bytes of `path`, so that callers can reject larger files.

    Exits with status 2 if the file cannot be read.
    """
    try:
        with path.open("rb") as file:
            return file.read(max_bytes + 1)
    except OSError as exc:
        _fail_invalid(path, f"cannot be read ({exc.strerror or exc}). Give the path of an existing file")


def _read_password(path: Path) -> bytes:
    """Return the first line of the password file without its line break.

    A trailing carriage return is removed as well, for files written on Windows.
    Exits with status 2 if the line is empty or the file cannot be read. The
    password itself never appears in a message.
    """
    data = _read_input(path, MAX_PASSWORD_FILE_BYTES)
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        _fail_invalid(
            path,
            f"is larger than {MAX_PASSWORD_FILE_BYTES} bytes, too large for a password file. "
            "Give a file with the password on its first line",
        )
    password = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not password:
        _fail_invalid(
            path,
            "has an empty first line, and an empty PKCS#12 password is not allowed. "
            "Write the password on the first line of the file",
        )
    return password


def _load_key(path: Path) -> PrivateKey:
    try:
        return load_private_key_pem(_read_input(path, MAX_UPLOAD_BYTES))
    except CertificateError as exc:
        _fail_invalid(path, str(exc))


def _load_single_certificate(path: Path) -> x509.Certificate:
    try:
        upload = parse_certificate_upload(_read_input(path, MAX_UPLOAD_BYTES))
    except CertificateError as exc:
        _fail_invalid(path, str(exc))
    if len(upload.certificates) != 1:
        _fail_invalid(
            path,
            f"contains {len(upload.certificates)} certificates. Give a file with only the certificate of the key",
        )
    return upload.certificates[0]


def _check_not_existing(paths: list[Path], force: bool) -> None:
    if force:
        return
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        _fail_invalid(
            ", ".join(existing),
            "already exists. Give --force to replace it, or choose another output path"
            if len(existing) == 1
            else "already exist. Give --force to replace them, or choose another output directory",
        )


def _write(path: Path, data: bytes, *, mode: int, force: bool, description: str) -> None:
    try:
        write_output_file(path, data, mode=mode, overwrite=force)
    except FileExistsError:
        _fail_invalid(path, "already exists. Give --force to replace it, or choose another output path")
    except OSError as exc:
        fail(
            f"error: {path}: cannot be written ({exc.strerror or exc}). Check the directory and its permissions",
            EXIT_FAILED,
        )
    mode_note = f", mode {mode:04o}" if mode == PRIVATE_MODE else ""
    typer.echo(f"wrote {path} ({description}{mode_note})")


def _key_description(key: PrivateKey) -> str:
    if isinstance(key, ec_keys.EllipticCurvePrivateKey):
        return f"private key, EC {key.curve.name}"
    return f"private key, RSA {key.key_size}"


def _check_days(days: int) -> None:
    """Exit with status 2 unless --days is a validity that X.509 can express, before any file is written."""
    if days < 1:
        _fail_invalid(f"--days {days}", "is not a positive number of days. Give 1 or more")
    now = dt.datetime.now(dt.UTC)
    max_days = (LATEST_NOT_AFTER - now).days
    if days > max_days:
        _fail_invalid(
            f"--days {days}",
            f"ends the validity after the year 9999, which X.509 cannot express. Give at most {max_days}",
        )


def _create_certificate(key: PrivateKey, common_name: str, days: int, alt_names: list[str] | None) -> x509.Certificate:
    try:
        return self_sign(key, common_name, days=days, alt_names=alt_names)
    except CertificateError as exc:
        _fail_invalid("certificate", str(exc))


def _create_csr(key: PrivateKey, common_name: str, alt_names: list[str] | None) -> x509.CertificateSigningRequest:
    try:
        return build_csr(key, common_name, alt_names=alt_names)
    except CertificateError as exc:
        _fail_invalid("certificate signing request", str(exc))


def _format_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_line(info: CertificateInfo) -> str:
    if info.expired:
        return f"status: EXPIRED on {_format_time(info.not_after)}"
    if info.not_yet_valid:
        return f"status: NOT YET VALID, valid from {_format_time(info.not_before)}"
    if info.expires_soon:
        return (
            f"status: EXPIRES SOON, in {info.days_left} days on {_format_time(info.not_after)} "
            f"(warning threshold: {EXPIRY_WARNING_DAYS} days)"
        )
    return f"status: valid, {info.days_left} days left"


def _print_certificate(info: CertificateInfo) -> None:
    typer.echo(f"subject: {info.subject}")
    typer.echo(f"issuer: {info.issuer}" + (" (self-signed)" if info.self_signed else ""))
    typer.echo(f"subject alt names: {', '.join(info.subject_alt_names) or '(none)'}")
    typer.echo(f"valid from: {_format_time(info.not_before)}")
    typer.echo(f"valid until: {_format_time(info.not_after)}")
    typer.echo(f"SHA-256 fingerprint: {info.sha256_fingerprint_colons}")
    key_text = f"{info.key_type} {info.key_size or ''}".strip() + (f" ({info.key_curve})" if info.key_curve else "")
    typer.echo(f"key: {key_text}")
    typer.echo(f"serial number: {info.serial_number_hex}")
    typer.echo(f"CA: {'yes' if info.is_ca else 'no'}")
    typer.echo(_status_line(info))


@certs_app.command("create")
def create_command(
    outdir: Annotated[Path, typer.Argument(metavar="OUTDIR", help="Directory for the files, created if missing.")],
    common_name: CommonNameOpt = DEFAULT_COMMON_NAME,
    days: DaysOpt = DEFAULT_VALIDITY_DAYS,
    ec: EcOpt = False,
    alt_names: AltNamesOpt = None,
    pkcs12_password_file: Annotated[
        Path | None,
        typer.Option(
            "--pkcs12-password-file",
            metavar="FILE",
            help="File whose first line is the password for bundle.pfx. Without it no bundle.pfx is written.",
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write key.pem, csr.pem, cert.pem (self-signed) and optionally bundle.pfx into OUTDIR."""
    _check_days(days)
    password = _read_password(pkcs12_password_file) if pkcs12_password_file is not None else None
    if outdir.exists() and not outdir.is_dir():
        _fail_invalid(outdir, "is not a directory. Give a directory path for OUTDIR")
    key_path, csr_path, cert_path, bundle_path = (
        outdir / "key.pem",
        outdir / "csr.pem",
        outdir / "cert.pem",
        outdir / "bundle.pfx",
    )
    _check_not_existing([key_path, csr_path, cert_path] + ([bundle_path] if password else []), force)

    key = generate_private_key(ec=ec)
    certificate = _create_certificate(key, common_name, days, alt_names)
    csr = _create_csr(key, common_name, alt_names)
    bundle = build_pkcs12(key, certificate, password) if password else None

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(
            f"error: {outdir}: cannot be created ({exc.strerror or exc}). Check the path and its permissions",
            EXIT_FAILED,
        )
    _write(key_path, private_key_pem(key), mode=PRIVATE_MODE, force=force, description=_key_description(key))
    _write(csr_path, csr_pem(csr), mode=PUBLIC_MODE, force=force, description="certificate signing request")
    _write(
        cert_path, certificate_pem(certificate), mode=PUBLIC_MODE, force=force, description="self-signed certificate"
    )
    if bundle is not None:
        _write(
            bundle_path, bundle, mode=PRIVATE_MODE, force=force, description="PKCS#12 bundle with key and certificate"
        )
    _print_certificate(describe_certificate(certificate))


@certs_app.command("key")
def key_command(out: OutArg, ec: EcOpt = False, force: ForceOpt = False) -> None:
    """Write a new private key in unencrypted PKCS#8 PEM form with mode 0600."""
    _check_not_existing([out], force)
    key = generate_private_key(ec=ec)
    _write(out, private_key_pem(key), mode=PRIVATE_MODE, force=force, description=_key_description(key))


@certs_app.command("csr")
def csr_command(
    out: OutArg,
    key_path: KeyOpt,
    common_name: CommonNameOpt = DEFAULT_COMMON_NAME,
    alt_names: AltNamesOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a certificate signing request (CSR) for the key, for a hospital certificate authority."""
    _check_not_existing([out], force)
    csr = _create_csr(_load_key(key_path), common_name, alt_names)
    _write(out, csr_pem(csr), mode=PUBLIC_MODE, force=force, description="certificate signing request")


@certs_app.command("self-signed")
def self_signed_command(
    out: OutArg,
    key_path: KeyOpt,
    common_name: CommonNameOpt = DEFAULT_COMMON_NAME,
    days: DaysOpt = DEFAULT_VALIDITY_DAYS,
    alt_names: AltNamesOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a self-signed certificate for the key."""
    _check_days(days)
    _check_not_existing([out], force)
    certificate = _create_certificate(_load_key(key_path), common_name, days, alt_names)
    _write(out, certificate_pem(certificate), mode=PUBLIC_MODE, force=force, description="self-signed certificate")
    _print_certificate(describe_certificate(certificate))


@certs_app.command("pkcs12")
def pkcs12_command(
    out: OutArg,
    key_path: KeyOpt,
    cert_path: Annotated[Path, typer.Option("--cert", metavar="CERT", help="Certificate of the key (PEM or DER).")],
    password_file: Annotated[
        Path, typer.Option("--password-file", metavar="FILE", help="File whose first line is the PKCS#12 password.")
    ],
    friendly_name: Annotated[
        str | None,
        typer.Option("--name", metavar="NAME", help="Friendly name in the bundle (default: the certificate's CN)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write key and certificate as a password-protected PKCS#12 bundle (AES-256, PBKDF2-SHA256) with mode 0600."""
    password = _read_password(password_file)
    _check_not_existing([out], force)
    key = _load_key(key_path)
    certificate = _load_single_certificate(cert_path)
    try:
        check_key_matches_certificate(key, certificate)
    except CertificateError as exc:
        _fail_invalid(f"{key_path} and {cert_path}", str(exc))
    bundle = build_pkcs12(key, certificate, password, friendly_name=friendly_name)
    _write(out, bundle, mode=PRIVATE_MODE, force=force, description="PKCS#12 bundle with key and certificate")


@certs_app.command("show")
def show_command(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="Certificate or chain as PEM, Base64 .cer or DER. A private key in a PEM file is not displayed.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the details as JSON.")] = False,
) -> None:
    """Print subject, validity, fingerprint and expiry status of each certificate in FILE.

    A PEM file that also contains a private key, such as a combined HAProxy
    certificate and key file, shows its certificates and a note about the key.
    """
    try:
        upload = parse_certificate_upload(_read_input(file, MAX_UPLOAD_BYTES), skip_private_keys=True)
    except CertificateError as exc:
        if exc.reason == KEY_WITHOUT_CERTIFICATE:
            _fail_invalid(
                file,
                "contains a private key, which 'certs show' does not display, and no certificate. "
                "Give a certificate file (PEM, Base64 .cer or DER)",
            )
        _fail_invalid(file, str(exc))
    if upload.skipped_private_key:
        typer.echo(f"note: {file} contains a private key, which 'certs show' does not display.", err=True)
    now = dt.datetime.now(dt.UTC)
    infos = [describe_certificate(certificate, now=now) for certificate in upload.certificates]
    if as_json:
        print_json(
            {
                "file": str(file),
                "format": upload.source_format,
                "converted_from_der": upload.converted_from_der,
                "contains_private_key": upload.skipped_private_key,
                "certificates": [info.as_dict() for info in infos],
            }
        )
        return

    formats = {"pem": "PEM", "base64": "Base64 without BEGIN/END lines", "der": "DER, converted to PEM"}
    typer.echo(f"{file}: {len(infos)} certificate(s), {formats[upload.source_format]}")
    for number, info in enumerate(infos, start=1):
        typer.echo("")
        typer.echo(f"certificate {number} of {len(infos)}")
        _print_certificate(info)
