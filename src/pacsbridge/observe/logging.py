"""Logging set-up that keeps patient data out of the logs.

pacsbridge's own messages carry UIDs, ids and counts only. pynetdicom's DEBUG
output prints whole identifiers and data sets (patient names, IDs, birth
dates), so its loggers are held at INFO or above whatever level is asked for.
pydicom reports each non-conformant value of vendor files as a warning, which
is noise for operators, so only its critical messages pass.
"""

from __future__ import annotations

import logging
import warnings

_LIBRARY_FLOORS = {
    "pynetdicom": logging.INFO,
    "pydicom": logging.CRITICAL,
}


def configure_logging(level: str | int = "WARNING") -> None:
    """Configure the root logger at `level` and hold chatty libraries at safe levels."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name, floor in _LIBRARY_FLOORS.items():
        logging.getLogger(name).setLevel(max(level, floor))
    warnings.filterwarnings("ignore", module=r"pydicom\..*")
