"""Entry point of the `pacsbridge` command."""

from __future__ import annotations

import logging
import os
import warnings

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


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("PACSBRIDGE_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pydicom reports every non-conformant value of vendor files as a warning;
    # they are not actionable on the command line, so they stay out of the output; per-file reasons are printed instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom\..*")
    app()


if __name__ == "__main__":
    main()
