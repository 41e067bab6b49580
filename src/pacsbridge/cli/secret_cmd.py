"""`pacsbridge secret-key`: print a new key for PACSBRIDGE_SECRET_KEY."""

from __future__ import annotations

import typer

from pacsbridge.cli.app import app
from pacsbridge.tls.secret_key import SECRET_KEY_ENV, generate_secret_key


@app.command("secret-key")
def secret_key_command() -> None:
    """Print a new random key (32 bytes, Base64) for PACSBRIDGE_SECRET_KEY.

    The key encrypts the private keys of client certificates in the database.
    Store it outside the database and its backups: without it, those keys
    cannot be decrypted, and a new key means issuing new client certificates.
    """
    typer.echo(generate_secret_key())
    typer.echo(
        f"Set {SECRET_KEY_ENV} to this value for every pacsbridge process that uses the same database.",
        err=True,
    )
