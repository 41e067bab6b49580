"""Tests of the synthetic ultrasound test study and the `pacsbridge test-images` command."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage
from typer.testing import CliRunner

from pacsbridge.cli.main import app
from pacsbridge.ingest.testimages import (
    LOOP_FRAME_COUNT,
    TEST_DATA_LABEL,
    TestPatient,
    write_test_study,
)

GIVEN_STUDY_UID = "1.2.826.0.1.3680043.10.1137.42.7"
GIVEN_ACCESSION = "ACC-2024-0042"
GIVEN_PATIENT = TestPatient(
    family_name="DEMO",
    given_name="WORKLIST",
    patient_id="PB-TEST-MWL-7",
    issuer_of_patient_id="PACSBRIDGE-DEMO",
    birth_date=date(1980, 2, 29),
    sex="F",
)
GIVEN_NOW = datetime(2024, 5, 1, 10, 0, 0, tzinfo=timezone(timedelta(hours=2)))


def read_all(paths: list[Path]) -> list[Dataset]:
    return [dcmread(path) for path in paths]


@pytest.fixture(scope="module")
def default_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_test_study(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def default_study(default_paths: list[Path]) -> list[Dataset]:
    return read_all(default_paths)


@pytest.fixture(scope="module")
def given_study(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = write_test_study(
        tmp_path_factory.mktemp("given"),
        patient=GIVEN_PATIENT,
        study_instance_uid=GIVEN_STUDY_UID,
        accession_number=GIVEN_ACCESSION,
        now=GIVEN_NOW,
    )
    return read_all(paths)


def rgb_pixels(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    assert pixels.shape[-1] == 3
    return pixels


# --- Files and SOP classes ----------------------------------------------------------


def test_study_writes_three_files(default_paths):
    assert len(default_paths) == 3
    for path in default_paths:
        assert path.is_file()
        assert path.suffix == ".dcm"
    assert len({path.parent for path in default_paths}) == 1


def test_study_leaves_no_partial_files(default_paths):
    leftovers = [path.name for path in default_paths[0].parent.iterdir() if path.suffix != ".dcm"]
    assert leftovers == []


def test_sop_classes_and_frame_counts(default_study):
    b_mode, doppler, loop = default_study
    assert b_mode.SOPClassUID == UltrasoundImageStorage
    assert doppler.SOPClassUID == UltrasoundImageStorage
    assert loop.SOPClassUID == UltrasoundMultiFrameImageStorage
    assert "NumberOfFrames" not in b_mode
    assert "NumberOfFrames" not in doppler
    assert int(loop.NumberOfFrames) == LOOP_FRAME_COUNT


def test_loop_has_at_least_30_frames(default_study):
    loop = default_study[2]
    assert int(loop.NumberOfFrames) >= 30
    assert loop.pixel_array.shape[0] == int(loop.NumberOfFrames)


def test_loop_has_cine_timing(default_study):
    loop = default_study[2]
    assert loop.FrameIncrementPointer == 0x00181063  # Frame Time
    assert float(loop.FrameTime) > 0
    assert int(loop.CineRate) == round(1000 / float(loop.FrameTime))
    assert int(loop.RecommendedDisplayFrameRate) == int(loop.CineRate)
    assert float(loop.EffectiveDuration) == pytest.approx(int(loop.NumberOfFrames) * float(loop.FrameTime) / 1000)


def test_files_use_explicit_little_endian(default_study):
    for ds in default_study:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_pixels_are_native_8_bit_rgb(default_study):
    for ds in default_study:
        assert ds.SamplesPerPixel == 3
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.PlanarConfiguration == 0
        assert ds.BitsAllocated == 8
        assert ds.BitsStored == 8
        assert ds.HighBit == 7
        assert ds.PixelRepresentation == 0
        frames = int(ds.get("NumberOfFrames", 1))
        assert len(ds.PixelData) == frames * ds.Rows * ds.Columns * 3


# --- Study structure and UIDs ---------------------------------------------------------


def test_objects_share_study_and_series(default_study):
    assert len({ds.StudyInstanceUID for ds in default_study}) == 1
    assert len({ds.SeriesInstanceUID for ds in default_study}) == 1
    assert len({ds.SOPInstanceUID for ds in default_study}) == 3
    assert [int(ds.InstanceNumber) for ds in default_study] == [1, 2, 3]
    assert {ds.Modality for ds in default_study} == {"US"}


def test_uids_are_valid(default_study):
    for ds in default_study:
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID(uid).is_valid, uid
            assert len(uid) <= 64, uid


def test_new_study_each_call(default_study, tmp_path):
    other = read_all(write_test_study(tmp_path))
    assert other[0].StudyInstanceUID != default_study[0].StudyInstanceUID
    assert other[0].SOPInstanceUID != default_study[0].SOPInstanceUID


def test_rewrite_overwrites_earlier_files(tmp_path):
    first = read_all(write_test_study(tmp_path))
    second = read_all(write_test_study(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        Path(ds.filename).name for ds in second
    )
    assert first[0].StudyInstanceUID != second[0].StudyInstanceUID


def test_outdir_is_created(tmp_path):
    outdir = tmp_path / "new" / "nested"
    paths = write_test_study(outdir)
    assert all(path.parent == outdir for path in paths)


# --- Marked as test data ----------------------------------------------------------------


def test_default_study_marked_as_test_data(default_study):
    for ds in default_study:
        assert str(ds.PatientName) == "TEST^PACSBRIDGE"
        assert ds.PatientID.startswith("PB-TEST-")
        assert TEST_DATA_LABEL in ds.StudyDescription
        assert TEST_DATA_LABEL in ds.SeriesDescription
        assert "synthetic" in ds.PatientComments.lower()
        assert "synthetic" in ds.ImageComments.lower()
        assert ds.BurnedInAnnotation == "NO"


def test_equipment_is_pacsbridge(default_study):
    for ds in default_study:
        assert ds.Manufacturer == "pacsbridge"
        assert ds.SoftwareVersions


# --- Given patient, accession number, UID and time ------------------------------------------


def test_given_patient_is_used(given_study):
    for ds in given_study:
        assert str(ds.PatientName) == "DEMO^WORKLIST"
        assert ds.PatientID == "PB-TEST-MWL-7"
        assert ds.IssuerOfPatientID == "PACSBRIDGE-DEMO"
        assert ds.PatientBirthDate == "19800229"
        assert ds.PatientSex == "F"


def test_given_accession_and_study_uid_are_used(given_study):
    for ds in given_study:
        assert ds.AccessionNumber == GIVEN_ACCESSION
        assert ds.StudyInstanceUID == GIVEN_STUDY_UID
    assert given_study[0].SeriesInstanceUID != GIVEN_STUDY_UID


def test_given_study_still_marked_as_test_data(given_study):
    for ds in given_study:
        assert TEST_DATA_LABEL in ds.StudyDescription
        assert TEST_DATA_LABEL in ds.SeriesDescription
        assert "synthetic" in ds.ImageComments.lower()


def test_given_time_sets_dates_and_offset(given_study):
    b_mode, doppler, loop = given_study
    assert b_mode.StudyDate == "20240501"
    assert b_mode.StudyTime == "095940"
    assert [ds.ContentTime for ds in given_study] == ["095940", "095950", "100000"]
    assert loop.AcquisitionDateTime == "20240501100000"
    for ds in given_study:
        assert ds.TimezoneOffsetFromUTC == "+0200"
        assert ds.InstanceCreationDate == "20240501"
        assert ds.InstanceCreationTime == "100000"


def test_negative_timezone_offset(tmp_path):
    now = datetime(2024, 1, 15, 8, 30, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
    ds = dcmread(write_test_study(tmp_path, now=now)[0], stop_before_pixels=True)
    assert ds.TimezoneOffsetFromUTC == "-0330"


def test_generated_accession_number_fits_sh(default_study):
    accession = default_study[0].AccessionNumber
    assert accession.startswith("PBT")
    assert len(accession) <= 16
    assert {ds.AccessionNumber for ds in default_study} == {accession}


def test_generated_accession_numbers_differ(tmp_path):
    first = dcmread(write_test_study(tmp_path / "a")[0], stop_before_pixels=True)
    second = dcmread(write_test_study(tmp_path / "b")[0], stop_before_pixels=True)
    assert first.AccessionNumber != second.AccessionNumber


def test_latin1_patient_uses_iso_ir_100(given_study, default_study):
    assert given_study[0].SpecificCharacterSet == "ISO_IR 100"
    assert default_study[0].SpecificCharacterSet == "ISO_IR 100"


def test_non_latin1_patient_uses_utf8(tmp_path):
    patient = TestPatient(family_name="Ŝvejk", given_name="Jiří", patient_id="PB-TEST-UTF8")
    ds = dcmread(write_test_study(tmp_path, patient=patient)[0], stop_before_pixels=True)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Ŝvejk^Jiří"


# --- Invalid input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "study_uid",
    ["", "1.2.3.abc", "1.2.03.4", "1." + "2" * 70],
)
def test_invalid_study_uid_rejected(tmp_path, study_uid):
    with pytest.raises(ValueError, match="study_instance_uid"):
        write_test_study(tmp_path, study_instance_uid=study_uid)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("accession", ["A" * 17, "ACC\\1", "ACC\n1"])
def test_invalid_accession_rejected(tmp_path, accession):
    with pytest.raises(ValueError, match="accession_number"):
        write_test_study(tmp_path, accession_number=accession)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sex": "X"}, "sex"),
        ({"family_name": "A^B"}, "family_name"),
        ({"given_name": "x" * 65}, "given_name"),
        ({"patient_id": "ID\\2"}, "patient_id"),
        ({"issuer_of_patient_id": "I" * 65}, "issuer_of_patient_id"),
        ({"family_name": "", "given_name": ""}, "both empty"),
    ],
)
def test_invalid_patient_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        TestPatient(**fields)


# --- Pixel content -----------------------------------------------------------------------


def test_b_mode_still_is_gray(default_study):
    pixels = rgb_pixels(default_study[0])
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 1], pixels[..., 2])
    assert default_study[0].UltrasoundColorDataPresent == 0


def test_loop_frames_are_gray(default_study):
    pixels = rgb_pixels(default_study[2])
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 1], pixels[..., 2])
    assert default_study[2].UltrasoundColorDataPresent == 0


def test_doppler_still_has_red_and_blue_flow(default_study):
    ds = default_study[1]
    # Only the sector counts, because the velocity color bar left of it is red and blue too.
    left_of_sector = ds.SequenceOfUltrasoundRegions[0].RegionLocationMinX0
    pixels = rgb_pixels(ds)[:, left_of_sector:].astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    color = (red != green) | (green != blue)
    assert color.sum() > 500
    assert ((red > 100) & (blue == 0)).sum() > 100
    assert ((blue > 100) & (red == 0)).sum() > 100
    assert ds.UltrasoundColorDataPresent == 1


def test_b_mode_still_looks_like_a_sector(default_study):
    gray = rgb_pixels(default_study[0])[..., 0]
    rows, columns = gray.shape
    # Left of the fan at mid-height, the image is black.
    assert gray[rows // 2, : columns // 20].max() == 0
    assert gray[rows // 2, columns // 2] > 0
    assert 40 < gray[gray > 0].mean() < 200
    # Speckle: the sector is textured, not flat.
    assert gray[rows // 2 - 20 : rows // 2 + 20, columns // 2 - 20 : columns // 2 + 20].std() > 10


def test_loop_frames_move(default_study):
    frames = rgb_pixels(default_study[2])[..., 0].astype(int)
    quarter = LOOP_FRAME_COUNT // 4

    def difference(first: int, second: int) -> float:
        return float(np.abs(frames[first] - frames[second]).mean())

    # The organs move furthest a quarter period after frame 0.
    assert difference(0, quarter) > 1.5 * difference(0, 1)


def test_loop_wraps_smoothly(default_study):
    frames = rgb_pixels(default_study[2])[..., 0].astype(int)
    steps = [np.abs(frames[i + 1] - frames[i]).mean() for i in range(LOOP_FRAME_COUNT - 1)]
    wrap = np.abs(frames[0] - frames[-1]).mean()
    assert wrap <= 1.5 * max(steps)


def test_pixels_are_deterministic_for_same_seed(tmp_path):
    first = read_all(write_test_study(tmp_path / "a", seed=7))
    second = read_all(write_test_study(tmp_path / "b", seed=7))
    for first_ds, second_ds in zip(first, second, strict=True):
        assert first_ds.PixelData == second_ds.PixelData


def test_default_seed_is_deterministic(default_study, tmp_path):
    again = read_all(write_test_study(tmp_path))
    for first_ds, again_ds in zip(default_study, again, strict=True):
        assert first_ds.PixelData == again_ds.PixelData


def test_pixels_differ_for_other_seed(tmp_path):
    first = read_all(write_test_study(tmp_path / "a", seed=7))
    second = read_all(write_test_study(tmp_path / "b", seed=8))
    for first_ds, second_ds in zip(first, second, strict=True):
        assert first_ds.PixelData != second_ds.PixelData


# --- US Region Calibration --------------------------------------------------------------


def test_regions_lie_inside_image(default_study):
    for ds in default_study:
        assert len(ds.SequenceOfUltrasoundRegions) >= 1
        for region in ds.SequenceOfUltrasoundRegions:
            assert 0 <= region.RegionLocationMinX0 < region.RegionLocationMaxX1 < ds.Columns
            assert 0 <= region.RegionLocationMinY0 < region.RegionLocationMaxY1 < ds.Rows
            assert region.PhysicalUnitsXDirection == 3  # cm
            assert region.PhysicalUnitsYDirection == 3
            assert region.PhysicalDeltaX > 0
            assert region.PhysicalDeltaX == region.PhysicalDeltaY


def test_region_covers_the_sector(default_study):
    ds = default_study[0]
    region = ds.SequenceOfUltrasoundRegions[0]
    gray = rgb_pixels(ds)[..., 0]
    inside = gray[
        region.RegionLocationMinY0 : region.RegionLocationMaxY1 + 1,
        region.RegionLocationMinX0 : region.RegionLocationMaxX1 + 1,
    ]
    # Everything except the depth ticks and the orientation marker lies in the region.
    assert (inside > 0).sum() > 0.95 * (gray > 0).sum()


def test_region_depth_matches_16_cm_scan(default_study):
    for ds in (default_study[0], default_study[2]):
        region = ds.SequenceOfUltrasoundRegions[0]
        depth_pixels = region.RegionLocationMaxY1 - (region.RegionLocationMinY0 + region.ReferencePixelY0)
        assert depth_pixels * region.PhysicalDeltaY == pytest.approx(16.0, abs=0.1)


def test_doppler_has_color_flow_region(default_study):
    tissue, color = default_study[1].SequenceOfUltrasoundRegions
    assert tissue.RegionDataType == 1
    assert color.RegionDataType == 2
    # Color pixels overwrite tissue pixels, so only the color region is high priority.
    assert tissue.RegionFlags & 1 == 1
    assert color.RegionFlags & 1 == 0
    assert tissue.RegionLocationMinX0 <= color.RegionLocationMinX0
    assert color.RegionLocationMaxX1 <= tissue.RegionLocationMaxX1


def test_color_pixels_lie_in_color_region(default_study):
    ds = default_study[1]
    color_region = ds.SequenceOfUltrasoundRegions[1]
    pixels = rgb_pixels(ds).astype(int)
    color = (pixels[..., 0] != pixels[..., 1]) | (pixels[..., 1] != pixels[..., 2])
    # The velocity color bar at the left edge lies outside the regions.
    left_of_sector = ds.SequenceOfUltrasoundRegions[0].RegionLocationMinX0
    rows, columns = np.nonzero(color[:, left_of_sector:])
    columns = columns + left_of_sector
    assert rows.min() >= color_region.RegionLocationMinY0
    assert rows.max() <= color_region.RegionLocationMaxY1
    assert columns.min() >= color_region.RegionLocationMinX0
    assert columns.max() <= color_region.RegionLocationMaxX1


# --- dciodvfy (dicom3tools) ----------------------------------------------------------------


@pytest.mark.dicom3tools
@pytest.mark.parametrize("index", [0, 1, 2], ids=["b-mode", "color-doppler", "loop"])
def test_dciodvfy_reports_no_errors(default_paths, index):
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    run = subprocess.run([dciodvfy, str(default_paths[index])], capture_output=True, text=True, timeout=60)
    # dciodvfy writes its findings to stderr, one per line, starting with Error or Warning.
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
    expected_iod = "USMultiFrameImage" if index == 2 else "USImage"
    assert expected_iod in lines


# --- CLI -------------------------------------------------------------------------------------


def test_cli_writes_study(tmp_path):
    outdir = tmp_path / "cli-out"
    result = CliRunner().invoke(app, ["test-images", str(outdir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        path, sop_class_name, frames, sop_instance_uid = line.split("\t")
        ds = dcmread(path, stop_before_pixels=True)
        assert Path(path).parent == outdir
        assert sop_class_name == UID(ds.SOPClassUID).name
        assert frames == f"frames={int(ds.get('NumberOfFrames', 1))}"
        assert sop_instance_uid == ds.SOPInstanceUID
    assert "Multi-frame" in lines[2]
    assert lines[2].split("\t")[2] == f"frames={LOOP_FRAME_COUNT}"


def test_cli_rejects_file_as_outdir(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["test-images", str(blocker / "study")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: failed to write test images to ")
    assert str(blocker / "study") in result.stderr
    assert "not a folder" in result.stderr


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only folders")
def test_cli_rejects_read_only_outdir(tmp_path):
    outdir = tmp_path / "read-only"
    outdir.mkdir()
    outdir.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["test-images", str(outdir)])
    finally:
        outdir.chmod(0o700)
    assert result.exit_code == 1
    assert "error: failed to write test images" in result.stderr
    assert "Permission denied" in result.stderr
