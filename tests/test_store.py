import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)

from conftest import SAMPLES, free_port
from fake_peers import storage_peer
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.status import StatusCategory
from pacsbridge.dicomnet.store import build_contexts, store_instances
from pacsbridge.ingest.files import collect_instances, inspect_file
from pacsbridge.prepare.pipeline import plan_instance
from pacsbridge.prepare.plan import AS_RECEIVED

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]



def received_by_uid(folder: Path) -> dict[str, Path]:
    return {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in folder.iterdir()}


def assert_same_attributes(sent, received):
    for element in sent:
        # Pixel data is compared apart. The file meta, group lengths (gggg,0000)
        # and data set trailing padding (FFFC,FFFC) are the receiver's own.
        if element.tag in (0x7FE00010, 0xFFFCFFFC) or element.tag.group == 0x0002 or element.tag.element == 0:
            continue
        assert element.tag in received, f"{element.tag} missing after transfer"
        assert received[element.tag].value == element.value, f"{element.tag} changed"


def test_build_contexts_one_syntax_each():
    instance = inspect_file(SAMPLES / "JPEGExtended_3s_1f_u_08_08.dcm")
    contexts = build_contexts([plan_instance(instance, AS_RECEIVED)])
    assert all(len(cx.transfer_syntax) == 1 for cx in contexts)
    assert [cx.transfer_syntax[0] for cx in contexts] == [
        JPEGExtended12Bit,
        JPEGBaseline8Bit,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]


def test_build_contexts_for_mixed_classes(ultrasound_samples):
    instances, rejected = collect_instances(ultrasound_samples)
    assert not rejected
    classes = {cx.abstract_syntax for cx in build_contexts([plan_instance(i, AS_RECEIVED) for i in instances])}
    assert "1.2.840.10008.5.1.4.1.1.6.1" in classes  # Ultrasound Image Storage
    assert "1.2.840.10008.5.1.4.1.1.3.1" in classes  # Ultrasound Multi-frame Image Storage
    assert "1.2.840.10008.5.1.4.1.1.6" in classes  # retired Ultrasound Image Storage


def unique_instances(paths):
    """Return the instances of `paths`, one per SOP Instance UID (some samples share one)."""
    instances, rejected = collect_instances(paths)
    assert not rejected
    return list({instance.sop_instance_uid: instance for instance in instances}.values())


def test_samples_arrive_byte_identical_at_storescp(start_storescp, ultrasound_samples):
    scp = start_storescp("+xa")
    instances = unique_instances(ultrasound_samples)
    result = store_instances(Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", scp.ae_title), instances)
    assert result.all_stored, [o.meaning for o in result.outcomes if not o.stored]
    arrived = received_by_uid(scp.folder)
    for instance in instances:
        sent = dcmread(instance.path)
        received = dcmread(arrived[instance.sop_instance_uid])
        assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert_same_attributes(sent, received)
        assert received.PixelData == sent.PixelData, instance.path.name


def test_uncompressed_only_storescp_gets_equal_pixels(start_storescp, ultrasound_samples):
    scp = start_storescp()  # storescp accepts uncompressed syntaxes only by default
    instances = unique_instances(ultrasound_samples)
    result = store_instances(Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", scp.ae_title), instances)
    assert result.all_stored, [o.meaning for o in result.outcomes if not o.stored]
    arrived = received_by_uid(scp.folder)
    compressed = [i for i in instances if i.transfer_syntax_uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.2")]
    assert len(compressed) >= 8
    for instance in compressed:
        outcome = next(o for o in result.outcomes if o.sop_instance_uid == instance.sop_instance_uid)
        assert outcome.conversion == "decoded"
        received = dcmread(arrived[instance.sop_instance_uid])
        assert not received.file_meta.TransferSyntaxUID.is_compressed
        original = dcmread(instance.path)
        assert np.array_equal(received.pixel_array, original.pixel_array), instance.path.name


@pytest.mark.parametrize(
    "name",
    ["JPEGLosslessP14SV1_3s_2f_u_08_08.dcm", "US1_RLE.dcm", "YBR_FULL-RLE.dcm", "US-PAL-8-10x-echo.dcm"],
)
def test_lossless_decoding_matches_dcmtk(start_storescp, tmp_path, name):
    """DCMTK decodes the same lossless source independently; pixels must agree exactly."""
    scp = start_storescp()
    instances, _ = collect_instances([SAMPLES / name])
    result = store_instances(Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", scp.ae_title), instances)
    assert result.all_stored
    received = dcmread(scp.received()[0])
    tool = "dcmdjpeg" if "JPEG" in name else "dcmdrle"
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    reference = tmp_path / "reference.dcm"
    subprocess.run([tool, str(SAMPLES / name), str(reference)], check=True, capture_output=True)
    assert np.array_equal(received.pixel_array, dcmread(reference).pixel_array)


def test_jpeg_extended_relabelled_as_baseline():
    """A JPEG Extended object whose frames are baseline goes out unchanged under Baseline."""
    received = []
    with storage_peer(transfer_syntaxes=[JPEGBaseline8Bit], received=received) as port:
        instances, _ = collect_instances([SAMPLES / "JPEGExtended_3s_1f_u_08_08.dcm"])
        result = store_instances(Endpoint("127.0.0.1", port, "PB", "FAKEPACS"), instances)
    assert result.outcomes[0].stored
    assert result.outcomes[0].conversion == "relabelled"
    assert received[0].file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert received[0].PixelData == dcmread(instances[0].path).PixelData


def test_lossless_only_peer_refuses_lossy_without_uncompressed():
    with storage_peer(transfer_syntaxes=[JPEGLosslessSV1]) as port:
        instances, _ = collect_instances([SAMPLES / "US_Philips_3EAF5680_8b_YBR_jpeg.dcm"])
        result = store_instances(Endpoint("127.0.0.1", port, "PB", "FAKEPACS"), instances)
    outcome = result.outcomes[0]
    assert not outcome.stored
    assert outcome.failure is not None
    assert "not even uncompressed" in outcome.meaning or "none of the proposed" in outcome.meaning


def test_implicit_only_peer_receives_implicit():
    received = []
    with storage_peer(transfer_syntaxes=[ImplicitVRLittleEndian], received=received) as port:
        instances, _ = collect_instances([SAMPLES / "US1_RLE.dcm"])
        result = store_instances(Endpoint("127.0.0.1", port, "PB", "FAKEPACS"), instances)
    assert result.outcomes[0].stored
    assert result.outcomes[0].sent_transfer_syntax == ImplicitVRLittleEndian
    assert np.array_equal(received[0].pixel_array, dcmread(instances[0].path).pixel_array)


@pytest.mark.parametrize(
    ("status", "category", "text"),
    [
        (0xB000, StatusCategory.WARNING, "coercion"),
        (0xB007, StatusCategory.WARNING, "does not match"),
        (0xA701, StatusCategory.FAILURE, "out of resources"),
        (0xA900, StatusCategory.FAILURE, "does not match the SOP class"),
        (0xC001, StatusCategory.FAILURE, "cannot understand"),
        (0x0122, StatusCategory.FAILURE, "SOP class not supported"),
    ],
)
def test_store_status_is_decoded(status, category, text):
    with storage_peer(status_for=lambda ds: status) as port:
        instances, _ = collect_instances([SAMPLES / "US1_UNCR.dcm"])
        result = store_instances(Endpoint("127.0.0.1", port, "PB", "FAKEPACS"), instances)
    outcome = result.outcomes[0]
    assert outcome.status == status
    assert outcome.category == category
    assert text in outcome.meaning


def test_association_failure_gives_every_instance_an_outcome(ultrasound_samples):
    instances, _ = collect_instances(ultrasound_samples[:3])
    result = store_instances(Endpoint("127.0.0.1", free_port(), "PB", "X", connection_timeout=5), instances)
    assert len(result.outcomes) == 3
    assert all(not outcome.stored for outcome in result.outcomes)
    assert all("refused" in outcome.meaning for outcome in result.outcomes)


def test_store_cli_folder_json(start_storescp, tmp_path, ultrasound_samples):
    scp = start_storescp("+xa")
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for sample in ultrasound_samples[:4]:
        shutil.copy(sample, folder / "sub" / sample.name)
    run = subprocess.run(
        [*CLI, "store", "127.0.0.1", str(scp.port), str(folder), "--calling-aet", "PB", "--called-aet", "STORESCP", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["all_stored"] is True
    assert data["stored"] == 4
    assert {item["category"] for item in data["instances"]} == {"success"}


def test_store_cli_non_dicom_file(start_storescp, tmp_path):
    scp = start_storescp()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    run = subprocess.run(
        [*CLI, "store", "127.0.0.1", str(scp.port), str(text_file), str(SAMPLES / "US1_UNCR.dcm"),
         "--calling-aet", "PB", "--called-aet", "STORESCP"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "notes.txt: not a DICOM Part-10 file" in run.stderr
    assert "1 of 1 instances stored" in run.stdout
    assert len(scp.received()) == 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("no_meta.dcm", "not a DICOM Part-10 file"),
        ("MR_truncated.dcm", "pixel data is truncated"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
        ("3gb-bulk-data-truncated.dcm", "invalid"),
        ("GH364.dcm", "malformed data element"),
        ("no_meta_group_length.dcm", "no SOP Class UID"),
    ],
)
def test_broken_files_rejected_with_reason(name, reason):
    instances, rejected = collect_instances([SAMPLES / name])
    assert not instances
    assert reason in rejected[0].reason


def test_store_cli_peer_rejects_called_aet():
    with storage_peer(ae_title="REALPACS", require_called_aet=True) as port:
        run = subprocess.run(
            [*CLI, "store", "127.0.0.1", str(port), str(SAMPLES / "US1_UNCR.dcm"), "--calling-aet", "PB",
             "--called-aet", "WRONG"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 1
    assert "called AE title not recognized" in run.stdout
