"""A folder of instance files addressed by the SHA-256 of their content.

A file is written to a temporary name in the same folder, flushed to disk and
renamed into place, so a reader sees either the whole file or none. The same
bytes always land at the same path, so storing them twice is a no-op. A blob
whose database transaction then fails stays behind unreferenced; it is
harmless and the next upload of the same bytes reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_CHUNK = 1024 * 1024


class BlobNotFoundError(FileNotFoundError):
    """Raised when a blob that the database refers to is missing from the folder."""


class BlobStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_for(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / sha256[2:4] / sha256

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy `source` into the store; return its SHA-256 (hex) and size in bytes."""
        digest = hashlib.sha256()
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        try:
            size = 0
            with os.fdopen(handle, "wb") as out, source.open("rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            target = self.path_for(sha256)
            if target.exists():
                return sha256, size
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, target)
            _fsync_folder(target.parent)
            return sha256, size
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def open_path(self, sha256: str) -> Path:
        """Return the path of a stored blob; raise BlobNotFoundError naming the hash if it is gone."""
        path = self.path_for(sha256)
        if not path.is_file():
            raise BlobNotFoundError(
                f"blob {sha256} is missing from {self.folder}: restore the blob folder from backup"
            )
        return path

    def copy_to(self, sha256: str, destination: Path) -> None:
        shutil.copyfile(self.open_path(sha256), destination)


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry itself is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
