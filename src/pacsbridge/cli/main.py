"""Entry point of the `pacsbridge` command."""

from __future__ import annotations

import os

# Importing a command module registers its commands on `app`.
from pacsbridge.cli import (  # noqa: F401
    connections_cmd,
    demo_cmd,
    echo_cmd,
    store_cmd,
    test_images_cmd,
    worklist_cmd,
)
from pacsbridge.cli.app import app
from pacsbridge.observe.logging import configure_logging


def main() -> None:
    configure_logging(os.environ.get("PACSBRIDGE_LOG_LEVEL", "WARNING"))
    app()


if __name__ == "__main__":
    main()
