"""`pacsbridge secret-key`: print a new key for PACSBRIDGE_SECRET_KEY."""

from __future__ import annotations

import typer

from pacsbridge.cli.app import app
from pacsbridge.tls.secret_key import SECRET_KEY_ENV, generate_secret_key


@app.command("secret-key")
def secret_key_command() -> None:
    """Print a new random key (32 bytes, Base64) for PACSBRIDGE_SECRET_KEY.

    The key encrypts the private keys of the organization CA and the client
    certificates in the database. Store it outside the database and its
    backups, because those keys cannot be decrypted without it. If it is lost,
    set a new key and run 'pacsbridge connections reissue-client-certs --yes',
    which creates a new CA and new client certificates. Each hospital then has
    to trust the new CA certificate.
    """
    typer.echo(generate_secret_key())
    typer.echo(
        f"Set {SECRET_KEY_ENV} to this value for every pacsbridge process that uses the same database.",
        err=True,
    )
