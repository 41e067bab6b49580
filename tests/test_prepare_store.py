"""Preparation end to end: `store_instances` with compression, monochrome, time zone and character set
settings, received by DCMTK storescp, decoded by dcmdjpeg and checked by dciodvfy."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1

from conftest import SAMPLES
from pacsbridge.connections.settings import Compression, MonochromeMode
from pacsbridge.dicomnet.association import Endpoint
from pacsbridge.dicomnet.store import store_instances
from pacsbridge.ingest.files import collect_instances
from pacsbridge.ingest.testimages import write_test_study
from pacsbridge.prepare.plan import Preparation

CLI = [sys.executable, "-m", "pacsbridge.cli.main"]
B_MODE_ONLY_BASELINE = Preparation(
    image_compression=Compression.JPEG_BASELINE,
    loop_compression=Compression.JPEG_LOSSLESS,
    monochrome=MonochromeMode.B_MODE_ONLY,
    timezone="Asia/Tokyo",
    character_set="ISO_IR 192",
)


def endpoint(scp) -> Endpoint:
    return Endpoint("127.0.0.1", scp.port, "PACSBRIDGE", scp.ae_title, acse_timeout=10, dimse_timeout=30)


def received_by_uid(folder: Path) -> dict[str, Path]:
    return {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in folder.iterdir()}


def dcmdjpeg(path: Path, tmp_path: Path) -> np.ndarray:
    """Decode `path` with DCMTK, an independent decoder, and return its pixels."""
    out = tmp_path / f"dcmdjpeg-{path.name}"
    subprocess.run(["dcmdjpeg", str(path), str(out)], check=True, capture_output=True)
    return dcmread(out).pixel_array


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """The synthetic study: a grey B-mode still, a colour Doppler still and a grey B-mode loop, all RGB."""
    paths = write_test_study(tmp_path_factory.mktemp("study"))
    by_kind = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1))
        if frames > 1:
            by_kind["loop"] = path
        elif ds.UltrasoundColorDataPresent:
            by_kind["doppler"] = path
        else:
            by_kind["b-mode"] = path
    return by_kind


@pytest.mark.dcmtk
def test_study_prepared_for_jpeg_pacs(start_storescp, study, tmp_path):
    scp = start_storescp("+xa")
    instances, _ = collect_instances(list(study.values()))
    result = store_instances(endpoint(scp), instances, preparation=B_MODE_ONLY_BASELINE)
    assert result.all_stored, [o.meaning for o in result.outcomes if not o.stored]
    outcomes = {o.path: o for o in result.outcomes}
    arrived = received_by_uid(scp.folder)

    # The grey B-mode still: lossy and monochrome, so a derived instance with a deterministic UID.
    b_mode = outcomes[study["b-mode"]]
    assert b_mode.sent_sop_instance_uid and b_mode.sent_sop_instance_uid.startswith("2.25.")
    still = dcmread(arrived[b_mode.sent_sop_instance_uid])
    assert still.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert still.PhotometricInterpretation == "MONOCHROME2"
    assert still.SamplesPerPixel == 1
    assert "PlanarConfiguration" not in still
    assert still.LossyImageCompression == "01"
    assert still.SourceImageSequence[-1].ReferencedSOPInstanceUID == b_mode.sop_instance_uid
    source = dcmread(study["b-mode"]).pixel_array[..., 0]
    assert psnr(dcmdjpeg(arrived[b_mode.sent_sop_instance_uid], tmp_path), source) >= 40

    # The Doppler still keeps its colour, as YBR_FULL_422 from the 4:2:2 frame header.
    doppler = outcomes[study["doppler"]]
    colour = dcmread(arrived[doppler.sent_sop_instance_uid])
    assert colour.PhotometricInterpretation == "YBR_FULL_422"
    assert colour.SamplesPerPixel == 3

    # The loop: JPEG Lossless of the grey channel, pixel-identical after DCMTK decodes it.
    loop = outcomes[study["loop"]]
    assert loop.sent_sop_instance_uid  # monochrome makes it a derived instance
    cine = dcmread(arrived[loop.sent_sop_instance_uid])
    assert cine.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert cine.PhotometricInterpretation == "MONOCHROME2"
    assert "LossyImageCompression" not in cine or cine.LossyImageCompression == "00"
    original = dcmread(study["loop"]).pixel_array[..., 0]
    assert np.array_equal(dcmdjpeg(arrived[loop.sent_sop_instance_uid], tmp_path), original)

    # Times converted to Tokyo at the instant the study was made; text declared as UTF-8.
    for path in arrived.values():
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.TimezoneOffsetFromUTC == "+0900"
        assert ds.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.dicom3tools
def test_prepared_objects_add_no_dciodvfy_errors(start_storescp, study):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed")
    scp = start_storescp("+xa")
    instances, _ = collect_instances(list(study.values()))
    assert store_instances(endpoint(scp), instances, preparation=B_MODE_ONLY_BASELINE).all_stored
    for path in scp.received():
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.dcmtk
def test_derived_uids_same_on_resend(start_storescp, study):
    first = start_storescp("+xa")
    second = start_storescp("+xa")
    instances, _ = collect_instances([study["b-mode"]])
    uids = [
        store_instances(endpoint(scp), instances, preparation=B_MODE_ONLY_BASELINE).outcomes[0].sent_sop_instance_uid
        for scp in (first, second)
    ]
    assert uids[0] == uids[1]


@pytest.mark.dcmtk
def test_refused_jpeg_falls_back_uncompressed(start_storescp, study):
    scp = start_storescp()  # uncompressed transfer syntaxes only
    instances, _ = collect_instances([study["doppler"]])
    preparation = Preparation(image_compression=Compression.JPEG_BASELINE)
    outcome = store_instances(endpoint(scp), instances, preparation=preparation).outcomes[0]
    assert outcome.stored
    assert outcome.sent_transfer_syntax == ExplicitVRLittleEndian
    assert any("JPEG Baseline" in note and "not accepted" in note for note in outcome.notes)
    # Nothing lossy happened, so the instance keeps its UID.
    assert outcome.sent_sop_instance_uid is None
    assert str(dcmread(scp.received()[0]).SOPInstanceUID) == outcome.sop_instance_uid


@pytest.mark.dcmtk
def test_wanted_form_passes_byte_for_byte(start_storescp):
    scp = start_storescp("+xa")
    sample = SAMPLES / "US_Philips_3EAF5680_8b_YBR_jpeg.dcm"
    instances, _ = collect_instances([sample])
    preparation = Preparation(image_compression=Compression.JPEG_BASELINE, loop_compression=Compression.JPEG_BASELINE)
    outcome = store_instances(endpoint(scp), instances, preparation=preparation).outcomes[0]
    assert outcome.stored and outcome.conversion == "as-is"
    assert dcmread(scp.received()[0]).PixelData == dcmread(sample).PixelData


@pytest.mark.dcmtk
def test_lossy_source_is_not_compressed_again(start_storescp):
    scp = start_storescp()  # uncompressed only: the Baseline source must be decoded, never re-encoded
    sample = SAMPLES / "US_Philips_3EAF5680_8b_YBR_jpeg.dcm"
    instances, _ = collect_instances([sample])
    preparation = Preparation(image_compression=Compression.JPEG_LOSSLESS)
    outcome = store_instances(endpoint(scp), instances, preparation=preparation).outcomes[0]
    assert outcome.stored
    assert outcome.sent_transfer_syntax == ExplicitVRLittleEndian
    assert outcome.sent_sop_instance_uid is None
    received = dcmread(scp.received()[0])
    assert received.LossyImageCompression == "01"


@pytest.mark.dcmtk
def test_store_command_takes_the_preparation_options(start_storescp, study):
    scp = start_storescp("+xa")
    run = subprocess.run(
        [
            *CLI,
            "store",
            "127.0.0.1",
            str(scp.port),
            str(study["doppler"]),
            "--calling-aet",
            "PACSBRIDGE",
            "--called-aet",
            scp.ae_title,
            "--image-compression",
            "jpeg-baseline",
            "--jpeg-quality",
            "85",
            "--monochrome",
            "b-mode-only",
            "--timezone",
            "America/New_York",
            "--charset",
            "ISO_IR 100",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    received = dcmread(scp.received()[0])
    assert received.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert "quality 85" in str(received.DerivationDescription)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--jpeg-quality", "0", "--jpeg-quality"),
        ("--timezone", "Mars/Olympus", "--timezone"),
        ("--charset", "LATIN1", "--charset"),
        ("--image-compression", "jpeg2000", "--image-compression"),
    ],
)
def test_store_command_rejects_bad_preparation_options(tmp_path, option, value, expected):
    run = subprocess.run(
        [*CLI, "store", "127.0.0.1", "104", str(tmp_path), "--calling-aet", "A", "--called-aet", "B", option, value],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert expected in run.stderr


VENDOR_SAMPLES = [
    "US1_UNCR.dcm",
    "US-PAL-8-10x-echo.dcm",
    "YBR_FULL-RLE.dcm",
    "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
    "OBXXXX1A_2frame.dcm",
    "gdcm-US-ALOKA-16.dcm",
]


def error_kinds(path: Path) -> set[str]:
    """Return dciodvfy's errors without the values, so errors at the same place compare equal."""
    return {line.split(" - ")[-1].split("=")[0].strip() + line.split(" - ")[1] for line in dciodvfy_errors(path)}


@pytest.mark.dicom3tools
@pytest.mark.parametrize("compression", [Compression.NONE, Compression.JPEG_LOSSLESS, Compression.JPEG_BASELINE])
@pytest.mark.parametrize("name", VENDOR_SAMPLES)
def test_vendor_sample_gains_no_dciodvfy_errors(tmp_path, name, compression):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed")
    from pacsbridge.prepare.pipeline import plan_instance, prepare_instance

    source = SAMPLES / name
    instances, _ = collect_instances([source])
    preparation = Preparation(
        image_compression=compression,
        loop_compression=compression,
        monochrome=MonochromeMode.B_MODE_ONLY,
        timezone="Europe/Berlin",
        character_set="ISO_IR 192",
    )
    plan = plan_instance(instances[0], preparation)
    offered = [str(syntax) for syntax in plan.candidates.syntaxes]
    prepared = prepare_instance(plan, preparation, offered, tmp_path, {})
    if prepared.payload == source:
        return  # sent as it is: nothing added
    # A derived instance names its source in Source Image Sequence, so an invalid source UID shows there again.
    added = {
        error for error in error_kinds(prepared.payload) if "SourceImageSequence" not in error or "UID" not in error
    } - error_kinds(source)
    assert added == set()


@pytest.mark.dcmtk
def test_worker_applies_the_connection_settings(start_storescp, study, tmp_path):
    from forward_helpers import add_archive, add_pacs, open_test_database, store_study

    from pacsbridge.db import close_database
    from pacsbridge.forward.policy import ForwardingPolicy
    from pacsbridge.forward.worker import Worker
    from pacsbridge.ingest.blobstore import BlobStore

    scp = start_storescp("+xa")
    config, sessions = open_test_database(tmp_path / "data")
    blobs = BlobStore(config.blob_dir)
    try:
        with sessions.begin() as session:
            add_pacs(
                session,
                "PACS",
                scp.port,
                image_compression=Compression.JPEG_BASELINE,
                loop_compression=Compression.JPEG_LOSSLESS,
                jpeg_quality=80,
                monochrome=MonochromeMode.B_MODE_ONLY,
                timezone="America/Los_Angeles",
                character_set="ISO_IR 192",
            )
            add_archive(session, "ward", ["PACS"], is_test=True)
            store_study(session, blobs, "ward", list(study.values()))
        summary = Worker(sessions, blobs, policy=ForwardingPolicy(poll_seconds=0.1)).run(drain=True)
        assert summary.all_stored
        syntaxes = sorted(
            str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) for path in scp.received()
        )
        assert syntaxes == sorted([JPEGBaseline8Bit, JPEGBaseline8Bit, JPEGLosslessSV1])
        from sqlalchemy import select

        from pacsbridge.db.forwarding import DeliveryAttempt

        with sessions.begin() as session:
            details = [attempt.detail or "" for attempt in session.scalars(select(DeliveryAttempt))]
        assert any("new SOP Instance UID 2.25." in detail for detail in details)

        # The admin's view of each stored delivery shows how it was prepared.
        from pacsbridge.forward.status import list_studies

        with sessions.begin() as session:
            views = [delivery for study_view in list_studies(session) for delivery in study_view.deliveries]
        assert all("transcoded to JPEG" in view.detail for view in views), [view.detail for view in views]
        assert all("times converted to America/Los_Angeles" in view.detail for view in views)
    finally:
        close_database(sessions)


@pytest.mark.dcmtk
def test_undecodable_file_goes_in_its_own_syntax(start_storescp):
    scp = start_storescp("+xa")
    sample = SAMPLES / "JPEG2000-embedded-sequence-delimiter.dcm"
    instances, _ = collect_instances([sample])
    preparation = Preparation(image_compression=Compression.NONE)
    outcome = store_instances(endpoint(scp), instances, preparation=preparation).outcomes[0]
    assert outcome.stored, outcome.meaning
    assert outcome.sent_transfer_syntax == str(dcmread(sample, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert "sent in its received transfer syntax" in outcome.notes[0]


def test_undecodable_rejected_syntax_fails(start_storescp):
    scp = start_storescp()  # uncompressed only
    instances, _ = collect_instances([SAMPLES / "JPEG2000-embedded-sequence-delimiter.dcm"])
    preparation = Preparation(image_compression=Compression.NONE)
    outcome = store_instances(endpoint(scp), instances, preparation=preparation).outcomes[0]
    assert not outcome.stored
    assert "JPEG 2000" in outcome.meaning


@pytest.mark.dcmtk
def test_references_follow_a_derived_instance(start_storescp, study, tmp_path):
    """A report sent with the image it references points at the image's new UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    image = dcmread(study["b-mode"], stop_before_pixels=True)
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedSOPSequence = [reference]
    evidence = Dataset()
    evidence.StudyInstanceUID = image.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [series]
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.SOPInstanceUID = generate_uid()
    report.StudyInstanceUID = image.StudyInstanceUID
    report.SeriesInstanceUID = generate_uid()
    report.Modality = "SR"
    report.CurrentRequestedProcedureEvidenceSequence = [evidence]
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report_path = tmp_path / "report.dcm"
    report.save_as(report_path, enforce_file_format=True)

    scp = start_storescp("+xa")
    # The report comes first on the command line; images are sent first anyway.
    instances, _ = collect_instances([report_path, study["b-mode"]])
    result = store_instances(endpoint(scp), instances, preparation=B_MODE_ONLY_BASELINE)
    assert result.all_stored
    new_uid = next(o.sent_sop_instance_uid for o in result.outcomes if o.path == study["b-mode"])
    received = dcmread(received_by_uid(scp.folder)[str(report.SOPInstanceUID)])
    referenced = received.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == new_uid


@pytest.mark.dcmtk
def test_duplicate_file_keeps_its_source_reference(start_storescp, study, tmp_path):
    copy = tmp_path / "copy.dcm"
    shutil.copyfile(study["b-mode"], copy)
    scp = start_storescp("+xa")
    instances, _ = collect_instances([study["b-mode"], copy])
    result = store_instances(endpoint(scp), instances, preparation=B_MODE_ONLY_BASELINE)
    assert result.all_stored
    source_uid = str(dcmread(study["b-mode"], stop_before_pixels=True).SOPInstanceUID)
    for outcome in result.outcomes:
        assert outcome.sent_sop_instance_uid != source_uid
    for path in scp.received():
        received = dcmread(path, stop_before_pixels=True)
        assert received.SourceImageSequence[-1].ReferencedSOPInstanceUID == source_uid


@pytest.mark.dcmtk
def test_single_frame_class_repair_names_its_source(start_storescp):
    scp = start_storescp("+xa")
    sample = SAMPLES / "OBXXXX1A_2frame.dcm"
    instances, _ = collect_instances([sample])
    outcome = store_instances(endpoint(scp), instances).outcomes[0]
    assert outcome.stored
    received = dcmread(scp.received()[0], stop_before_pixels=True)
    assert received.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    source = received.SourceImageSequence[-1]
    assert source.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    assert source.ReferencedSOPInstanceUID == outcome.sop_instance_uid
    assert "multi-frame class" in received.DerivationDescription


def test_jpeg_extended_relabelled_when_baseline_wanted():
    from fake_peers import storage_peer
    from pydicom.uid import JPEGExtended12Bit

    received = []
    sample = SAMPLES / "JPEGExtended_3s_1f_u_08_08.dcm"
    with storage_peer(transfer_syntaxes=[JPEGBaseline8Bit, JPEGExtended12Bit], received=received) as port:
        instances, _ = collect_instances([sample])
        preparation = Preparation(image_compression=Compression.JPEG_BASELINE)
        outcome = store_instances(Endpoint("127.0.0.1", port, "PB", "FAKEPACS"), instances, preparation=preparation)
    assert outcome.outcomes[0].conversion == "relabelled"
    assert received[0].file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert received[0].PixelData == dcmread(sample).PixelData


@pytest.mark.dcmtk
def test_jpeg_loop_missing_frames_sent_as_received(start_storescp, tmp_path):
    """Complete frames of a lossy loop keep their codestreams: no second lossy step is needed."""
    from pydicom.encaps import encapsulate, generate_frames

    source = dcmread(SAMPLES / "orthanc-Issue16.dcm")
    declared = int(source.NumberOfFrames)
    frames = list(generate_frames(source.PixelData, number_of_frames=declared))
    source.PixelData = encapsulate(frames[: declared - 4], has_bot=False)
    short = tmp_path / "short.dcm"
    source.save_as(short)

    scp = start_storescp("+xa")
    instances, rejected = collect_instances([short])
    assert not rejected
    outcome = store_instances(endpoint(scp), instances).outcomes[0]
    assert outcome.stored, outcome.meaning
    assert outcome.sent_transfer_syntax == source.file_meta.TransferSyntaxUID
    received = dcmread(scp.received()[0])
    assert int(received.NumberOfFrames) == declared - 4
    sent = list(generate_frames(received.PixelData, number_of_frames=declared - 4))
    assert [frame.rstrip(b"\x00") for frame in sent] == [frame.rstrip(b"\x00") for frame in frames[: declared - 4]]
    assert received.SOPInstanceUID != source.SOPInstanceUID  # frames were dropped: a derived instance


def test_over_long_uid_replaced_once(tmp_path):
    from pacsbridge.prepare.pipeline import plan_instance, prepare_instance
    from pacsbridge.prepare.repair import replacement_uid

    ds = dcmread(SAMPLES / "US1_UNCR.dcm")
    long_uid = "1.2.3." + "4" * 70
    ds.SOPInstanceUID = long_uid
    ds.file_meta.MediaStorageSOPInstanceUID = long_uid
    path = tmp_path / "long.dcm"
    ds.save_as(path)
    instances, _ = collect_instances([path])
    plan = plan_instance(instances[0], Preparation())
    prepared = prepare_instance(plan, Preparation(), [str(s) for s in plan.candidates.syntaxes], tmp_path, {})
    assert prepared.sop_instance_uid == replacement_uid(long_uid)
