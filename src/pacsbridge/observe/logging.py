"""Logging set-up that keeps patient data out of the logs.

pacsbridge's own messages carry UIDs, ids and counts only. pynetdicom's DEBUG
output prints whole identifiers and data sets (patient names, IDs, birth
dates), so its loggers are held at INFO or above whatever level is asked for.
Above INFO, pynetdicom is silenced: its errors repeat what pacsbridge reports
in its own words. pydicom reports each non-conformant value of vendor files as
a warning, which is noise for operators, so only its critical messages pass.
"""

from __future__ import annotations

import logging
import warnings

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_level(name: str) -> int:
    """Return the logging level called `name`; raise ValueError naming the valid levels."""
    if name.upper() not in LEVELS:
        raise ValueError(f"log level {name!r} is not known: use one of {', '.join(LEVELS)}")
    return logging.getLevelName(name.upper())


def configure_logging(level: str | int = "WARNING") -> None:
    """Configure the root logger at `level` and hold chatty libraries at safe levels."""
    if isinstance(level, str):
        level = parse_level(level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    pynetdicom_level = logging.INFO if level <= logging.INFO else logging.CRITICAL
    logging.getLogger("pynetdicom").setLevel(max(level, pynetdicom_level))
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    # Alembic reports every migration context at INFO on each start; keep that for DEBUG.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING) if level > logging.DEBUG else level)
    warnings.filterwarnings("ignore", module=r"pydicom\..*")
