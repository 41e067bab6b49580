"""Application configuration: data directory, database URL and blob directory.

Each value comes from, in order of precedence, a command-line option, an
environment variable, or a default:

- data directory: `--data-dir`, `PACSBRIDGE_DATA_DIR`, `./pacsbridge-data`
- database URL: `PACSBRIDGE_DATABASE_URL`, else the SQLite file
  `<data dir>/pacsbridge.sqlite3`
- blob directory: always `<data dir>/blobs`
- outbound bind address: `--bind-address`, `PACSBRIDGE_BIND_ADDRESS`, else
  none (the operating system chooses the source address)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

LOGGER = logging.getLogger(__name__)

DATA_DIR_ENV = "PACSBRIDGE_DATA_DIR"
DATABASE_URL_ENV = "PACSBRIDGE_DATABASE_URL"
BIND_ADDRESS_ENV = "PACSBRIDGE_BIND_ADDRESS"
DEFAULT_DATA_DIR = Path("pacsbridge-data")
SQLITE_FILE_NAME = "pacsbridge.sqlite3"
BLOB_DIR_NAME = "blobs"


class ConfigError(RuntimeError):
    """Raised when the data directory or the database URL cannot be used."""


@dataclass(frozen=True)
class AppConfig:
    """Resolved locations of everything pacsbridge stores."""

    data_dir: Path
    database_url: URL
    blob_dir: Path
    # Local IP address that outgoing DICOM connections are sent from, or None.
    bind_address: str | None = None

    @property
    def database_url_for_display(self) -> str:
        """The database URL with any password replaced by `***`, safe for logs and messages."""
        return self.database_url.render_as_string(hide_password=True)


def load_config(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    database_url: str | None = None,
    bind_address: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Resolve the configuration from explicit arguments, then `environ`, then defaults.

    Nothing is created on disk, so call `prepare_data_dir` before writing.
    Raises ConfigError when the database URL cannot be parsed or the bind
    address is not an IP address.
    """
    env = os.environ if environ is None else environ

    if data_dir is None or str(data_dir) == "":
        data_dir = env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    resolved_dir = Path(data_dir).expanduser().absolute()

    if database_url is None:
        database_url = env.get(DATABASE_URL_ENV) or None
    if database_url is None:
        url = URL.create("sqlite", database=str(resolved_dir / SQLITE_FILE_NAME))
    else:
        url = _parse_database_url(database_url)

    if bind_address is None:
        bind_address = env.get(BIND_ADDRESS_ENV) or None
    if bind_address is not None:
        bind_address = check_bind_address(bind_address)

    return AppConfig(
        data_dir=resolved_dir,
        database_url=url,
        blob_dir=resolved_dir / BLOB_DIR_NAME,
        bind_address=bind_address,
    )


def check_bind_address(text: str) -> str:
    """Return `text` as a normalized IPv4 or IPv6 address; raise ConfigError when it is not one."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(
            f"invalid bind address {text!r}: it is not an IPv4 or IPv6 address. Set {BIND_ADDRESS_ENV} "
            "(or --bind-address) to an address of this machine, such as 192.0.2.10, or unset it to let "
            "the operating system choose."
        ) from None


def _parse_database_url(text: str) -> URL:
    try:
        return make_url(text)
    except ArgumentError as exc:
        # The URL may contain a password, so the message repeats only its scheme.
        scheme = text.split(":", 1)[0] if ":" in text else "(none)"
        raise ConfigError(
            f"invalid database URL (scheme {scheme!r}): it cannot be parsed. "
            f"Set {DATABASE_URL_ENV} to a URL such as postgresql+psycopg://user@db-host:5432/pacsbridge, "
            "or unset it to use the SQLite file in the data directory."
        ) from exc


def prepare_data_dir(config: AppConfig) -> None:
    """Create the data and blob directories if missing and check that they are writable.

    Raises ConfigError naming the directory when it cannot be created or written.
    """
    for directory in (config.data_dir, config.blob_dir):
        _create_writable_dir(directory)


def _create_writable_dir(directory: Path) -> None:
    fix = f"Choose another directory with --data-dir or {DATA_DIR_ENV}, or fix its permissions."
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} exists but is not a directory. {fix}")
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            LOGGER.info("Created directory %s", directory)
        # Creating a file tests what later writes need, while os.access
        # would check the real instead of the effective user ID.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(
            f"directory {str(directory)!r} cannot be created or written "
            f"({exc.strerror or exc}). {fix}"
        ) from exc
