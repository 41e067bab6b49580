"""Entry point of the `pacsbridge` command."""

from __future__ import annotations

import os
import sys

# Importing a command module registers its commands on `app`.
from pacsbridge.cli import (  # noqa: F401
    archives_cmd,
    certs_cmd,
    connections_cmd,
    deliveries_cmd,
    demo_cmd,
    echo_cmd,
    secret_cmd,
    store_cmd,
    test_images_cmd,
    upload_cmd,
    worker_cmd,
    worklist_cmd,
)
from pacsbridge.cli.app import app
from pacsbridge.observe.logging import configure_logging


def main() -> None:
    # A one-shot command prints its own messages; the log adds to them only
    # when asked, so the default level is ERROR.
    try:
        configure_logging(os.environ.get("PACSBRIDGE_LOG_LEVEL", "ERROR"))
    except ValueError as exc:
        print(f"error: PACSBRIDGE_LOG_LEVEL: {exc}.", file=sys.stderr)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
