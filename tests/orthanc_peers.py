"""Orthanc with its Modality Worklists plugin, as a worklist SCP for tests.

Each Orthanc runs from Debian's package (1.10.1) with a configuration of its
own: a free DICOM port on 127.0.0.1, the HTTP server off, and storage, index
and worklist folders inside the test's temporary folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from peers import write_worklist_file
from pydicom.dataset import Dataset
from tls_peers import find_binary, running

WORKLIST_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")


@dataclass(frozen=True)
class OrthancWorklist:
    """A running Orthanc worklist SCP: its port, AE title, worklist folder and log."""

    port: int
    ae_title: str
    database: Path
    log: Path

    def add_item(self, name: str, item: Dataset) -> Path:
        """Write `item` as `name`.wl, which the plugin reads on each query."""
        return write_worklist_file(item, self.database / f"{name}.wl")


def orthanc_worklist_config(
    folder: Path, dicom_port: int, http_port: int, ae_title: str, calling_ae_titles: tuple[str, ...]
) -> dict[str, object]:
    """Return the configuration of an Orthanc that serves the .wl files in `folder`/worklists.

    The plugin reads only files whose name ends in .wl. DicomCheckCalledAet
    makes Orthanc reject associations to another called AE title, as hospital
    worklist servers do. Orthanc 1.10.1 rejects worklist queries from calling
    AE titles that DicomModalities does not list, so each of
    `calling_ae_titles` is listed there, allowed to query the worklist.
    The plugin encodes its responses in Orthanc's DefaultEncoding, whatever
    the file or the query uses. With the default Latin1, Chinese and Japanese
    names lose their ideographic groups, so this Orthanc responds in UTF-8 (ISO_IR 192).
    """
    modalities = {
        f"scu{index}": {"AET": title, "Host": "127.0.0.1", "Port": 104, "AllowFindWorklist": True}
        for index, title in enumerate(calling_ae_titles)
    }
    return {
        "Name": "pacsbridge-mwl-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [str(WORKLIST_PLUGIN)],
        "Worklists": {"Enable": True, "Database": str(folder / "worklists")},
        # The REST API is not needed, so the HTTP server stays off.
        "HttpServerEnabled": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomCheckCalledAet": True,
        "DicomPort": dicom_port,
        "DicomModalities": modalities,
        "DefaultEncoding": "Utf8",
    }


@contextmanager
def orthanc_worklist(
    folder: Path, *, ae_title: str = "PB_ORTHANC", calling_ae_titles: tuple[str, ...] = ("PB_TEST",)
) -> Iterator[OrthancWorklist]:
    """Run Orthanc with the worklist plugin on a free port. Skip the test when Orthanc or the plugin is missing."""
    binary = find_binary("Orthanc", "orthanc")
    if not WORKLIST_PLUGIN.is_file():
        pytest.skip(f"the Orthanc worklist plugin {WORKLIST_PLUGIN} is not installed (Debian package orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "worklists").mkdir(exist_ok=True)
    dicom_port = free_port()
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(orthanc_worklist_config(folder, dicom_port, free_port(), ae_title, calling_ae_titles), indent=2))
    log = folder / "orthanc.log"
    with running([binary, str(config_path)], dicom_port, log, timeout=30.0):
        yield OrthancWorklist(dicom_port, ae_title, folder / "worklists", log)
