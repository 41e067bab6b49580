"""Tests of the repair rules on real samples and on files cut or altered from them."""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, require_tool
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.repair import (
    US_MULTIFRAME_IMAGE_STORAGE,
    ImageGeometry,
    detect_planar_configuration,
    pixel_data_facts,
    repair_file,
    repair_long_uids,
    replacement_uid,
)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LONG_STUDY_UID = "1.2.826.0.1.3680043.2.1125." + "1234567890." * 4 + "7"
LONG_SERIES_UID = LONG_STUDY_UID + ".2"


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def cut_file(source: Path, target: Path, remove_bytes: int) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[:-remove_bytes])
    return target


# -- UIDs over 64 characters -----------------------------------------------------------


def test_replacement_uid_is_valid_and_stable() -> None:
    new = replacement_uid(LONG_STUDY_UID)
    assert new == replacement_uid(LONG_STUDY_UID)
    assert new.startswith("2.25.")
    assert len(new) <= 64
    assert UID_PATTERN.match(new)
    assert new != replacement_uid(LONG_SERIES_UID)


def dataset_with_long_uids() -> Dataset:
    ds = read(SAMPLES / "US1_UNCR.dcm")
    ds.StudyInstanceUID = LONG_STUDY_UID
    ds.SeriesInstanceUID = LONG_SERIES_UID
    ds.FrameOfReferenceUID = LONG_STUDY_UID + ".3"
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    reference.ReferencedSOPInstanceUID = LONG_SERIES_UID + ".4"
    ds.ReferencedImageSequence = Sequence([reference])
    return ds


def test_long_uids_replaced_everywhere() -> None:
    ds = dataset_with_long_uids()
    sop_instance = ds.SOPInstanceUID
    repairs, mapping = repair_long_uids(ds)

    assert ds.StudyInstanceUID == replacement_uid(LONG_STUDY_UID)
    assert ds.SeriesInstanceUID == replacement_uid(LONG_SERIES_UID)
    assert ds.FrameOfReferenceUID == replacement_uid(LONG_STUDY_UID + ".3")
    reference = ds.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == replacement_uid(LONG_SERIES_UID + ".4")
    assert reference.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
    assert ds.SOPInstanceUID == sop_instance
    assert len(mapping) == 4
    assert "StudyInstanceUID replaced: UID longer than 64 characters" in repairs


def test_long_uid_repairs_name_no_values() -> None:
    repairs, _ = repair_long_uids(dataset_with_long_uids())
    for repair in repairs:
        assert "1.2.826" not in repair


def test_two_instances_map_uid_alike() -> None:
    first = dataset_with_long_uids()
    second = dataset_with_long_uids()
    second.SOPInstanceUID = "1.2.3.4"
    _, first_map = repair_long_uids(first)
    _, second_map = repair_long_uids(second)
    assert first_map[LONG_STUDY_UID] == second_map[LONG_STUDY_UID]
    assert first.StudyInstanceUID == second.StudyInstanceUID


def test_long_sop_instance_uid_in_file_meta() -> None:
    ds = read(SAMPLES / "US1_UNCR.dcm")
    ds.SOPInstanceUID = LONG_STUDY_UID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = LONG_STUDY_UID + ".9"
    repair_long_uids(ds)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len(ds.SOPInstanceUID) <= 64


def test_long_class_uid_rejected() -> None:
    ds = read(SAMPLES / "US1_UNCR.dcm")
    ds.SOPClassUID = LONG_STUDY_UID
    with pytest.raises(PreparationError, match=r"SOPClassUID \(0008,0016\)"):
        repair_long_uids(ds)


def test_short_uids_untouched() -> None:
    ds = read(SAMPLES / "US1_UNCR.dcm")
    repairs, mapping = repair_long_uids(ds)
    assert repairs == []
    assert mapping == {}


# -- Odd lengths and stray items -------------------------------------------------------


def test_odd_fragment_and_stray_item_of_gh364() -> None:
    header, facts, result = repair_file(SAMPLES / "GH364.dcm")
    assert facts.fragment_lengths[0] % 2 == 1
    assert "Pixel Data fragments padded to even length" in result.repairs
    assert "stray Item (FFFE,E000) removed from the top level" in result.repairs
    assert not [tag for tag in header.keys() if tag.group == 0xFFFE]  # noqa: SIM118


def test_odd_native_pixel_data(tmp_path: Path) -> None:
    ds = read(SAMPLES / "chrRuss.dcm")
    ds.Rows = 3
    ds.Columns = 3
    ds.PixelData = bytes(range(10))
    path = tmp_path / "odd.dcm"
    ds.save_as(path)
    # Pixel Data is the last element: make its length 9 and drop the pad byte.
    data = bytearray(path.read_bytes()[:-1])
    length_offset = len(data) - 9 - 4
    assert data[length_offset : length_offset + 4] == (10).to_bytes(4, "little")
    data[length_offset : length_offset + 4] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    _, facts, result = repair_file(path)
    assert facts.declared_length == 9
    assert result.repairs == ["Pixel Data padded to even length"]
    assert result.frame_count == 1


def test_fragments_walked_by_length() -> None:
    # A fragment of this file contains the bytes of a Sequence Delimitation Item.
    facts = pixel_data_facts(SAMPLES / "JPEG2000-embedded-sequence-delimiter.dcm")
    assert facts.fragment_lengths == (250,)
    assert not facts.truncated
    assert not facts.delimiter_missing


def test_no_pixel_data_gives_no_facts() -> None:
    assert pixel_data_facts(SAMPLES / "chrJapMulti.dcm") is None


# -- Single-frame class with several frames --------------------------------------------


def test_ultrasound_image_with_two_frames() -> None:
    header, _, result = repair_file(SAMPLES / "OBXXXX1A_2frame.dcm")
    assert header.SOPClassUID == US_MULTIFRAME_IMAGE_STORAGE
    assert header.file_meta.MediaStorageSOPClassUID == US_MULTIFRAME_IMAGE_STORAGE
    assert header.FrameIncrementPointer == pydicom.tag.Tag("FrameLabelVector")
    assert list(header.FrameLabelVector) == ["1", "2"]
    assert "multi-frame-class" in result.conversions
    assert result.frame_count == 2


def test_ultrasound_image_with_frame_time(tmp_path: Path) -> None:
    ds = read(SAMPLES / "OBXXXX1A_2frame.dcm")
    ds.FrameTime = 40
    path = tmp_path / "frame-time.dcm"
    ds.save_as(path)
    header, _, _ = repair_file(path)
    assert header.FrameIncrementPointer == pydicom.tag.Tag("FrameTime")
    assert "FrameLabelVector" not in header


def dciodvfy_errors(path: Path) -> set[str]:
    output = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = (output.stdout + output.stderr).splitlines()
    return {line for line in lines if line.startswith("Error")}


@pytest.mark.dicom3tools
def test_multiframe_repair_removes_errors(tmp_path: Path) -> None:
    source = SAMPLES / "OBXXXX1A_2frame.dcm"
    header, _, _ = repair_file(source)
    header["PixelData"] = read(source)["PixelData"]
    repaired = tmp_path / "repaired.dcm"
    header.save_as(repaired)

    before = dciodvfy_errors(source)
    after = dciodvfy_errors(repaired)
    assert after < before
    assert not [line for line in after if "FrameIncrementPointer" in line]


def test_secondary_capture_with_two_frames_rejected(tmp_path: Path) -> None:
    ds = read(SAMPLES / "chrRuss.dcm")
    ds.Rows = 16
    ds.NumberOfFrames = 2
    path = tmp_path / "sc.dcm"
    ds.save_as(path)
    with pytest.raises(PreparationError, match="Secondary Capture Image Storage") as error:
        repair_file(path)
    assert "separate instances" in error.value.action


# -- Planar Configuration --------------------------------------------------------------


def rgb_file(tmp_path: Path, planar_data: bool, declared: int) -> Path:
    ds = read(SAMPLES / "US1_UNCR.dcm")
    pixels = ds.pixel_array
    ds.PixelData = pixels.transpose(2, 0, 1).tobytes() if planar_data else pixels.tobytes()
    ds.PlanarConfiguration = declared
    path = tmp_path / f"planar-{int(planar_data)}-declared-{declared}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(("planar_data", "declared"), [(True, 0), (False, 1)])
def test_wrong_planar_configuration_corrected(tmp_path: Path, planar_data: bool, declared: int) -> None:
    header, _, result = repair_file(rgb_file(tmp_path, planar_data, declared))
    assert header.PlanarConfiguration == int(planar_data)
    assert result.repairs == ["Planar Configuration corrected to match the pixel data layout"]


@pytest.mark.parametrize(("planar_data", "declared"), [(True, 1), (False, 0)])
def test_right_planar_configuration_kept(tmp_path: Path, planar_data: bool, declared: int) -> None:
    header, _, result = repair_file(rgb_file(tmp_path, planar_data, declared))
    assert header.PlanarConfiguration == declared
    assert result.repairs == []


def test_planar_sample_kept() -> None:
    # This big endian sample is stored by plane and declares Planar Configuration 1.
    header, _, result = repair_file(SAMPLES / "ExplVR_BigEnd.dcm")
    assert header.PlanarConfiguration == 1
    assert result.repairs == []


def test_flat_frame_undecided() -> None:
    geometry = ImageGeometry(8, 8, 3, 8, "RGB", 1)
    assert detect_planar_configuration(bytes(8 * 8 * 3), geometry) is None


# -- Fewer frames than declared --------------------------------------------------------


def test_native_frames_fewer_than_declared(tmp_path: Path) -> None:
    ds = read(SAMPLES / "OBXXXX1A_rle_2frame.dcm")
    ds.decompress()
    ds.SOPClassUID = US_MULTIFRAME_IMAGE_STORAGE
    ds.NumberOfFrames = 3
    path = tmp_path / "declared-3.dcm"
    ds.save_as(path)

    header, _, result = repair_file(path)
    assert header.NumberOfFrames == 2
    assert result.frame_count == 2
    assert "frames-dropped" in result.conversions


def test_native_file_cut_inside_frame(tmp_path: Path) -> None:
    path = cut_file(SAMPLES / "OBXXXX1A_2frame.dcm", tmp_path / "cut.dcm", 1000)
    header, facts, result = repair_file(path)
    assert facts.truncated
    assert header.NumberOfFrames == 1
    assert result.frame_count == 1
    assert "incomplete last frame of Pixel Data left out" in result.repairs
    # One frame left, so the single-frame class stays right.
    assert "multi-frame-class" not in result.conversions


def test_truncated_single_frame_rejected() -> None:
    with pytest.raises(PreparationError, match="contains no complete frame: the file ends inside it"):
        repair_file(SAMPLES / "MR_truncated.dcm")


def test_encapsulated_file_cut_inside_fragment(tmp_path: Path) -> None:
    source = SAMPLES / "orthanc-Issue16.dcm"
    path = cut_file(source, tmp_path / "cut.dcm", 5000)
    header, facts, result = repair_file(path)
    assert facts.truncated
    assert result.frame_count < 34
    assert header.NumberOfFrames == result.frame_count
    assert "frames-dropped" in result.conversions


def test_missing_sequence_delimiter_repaired() -> None:
    header, facts, result = repair_file(SAMPLES / "emri_small_jpeg_2k_lossless_too_short.dcm")
    assert facts.delimiter_missing
    assert result.frame_count == 10
    assert header.NumberOfFrames == 10
    assert result.repairs == ["Sequence Delimitation Item added after the Pixel Data fragments"]


def test_sample_frames_all_present() -> None:
    _, _, result = repair_file(SAMPLES / "orthanc-Issue16.dcm")
    assert result.frame_count == 34
    assert result.repairs == []


def test_native_frame_count_uses_ybr_422_size() -> None:
    _, facts, result = repair_file(SAMPLES / "YBR_422.dcm")
    assert facts.declared_length == 555 * 800 * 2
    assert result.frame_count == 1
    assert result.repairs == []


# -- Invalid headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("badVR.dcm", r"Number of Frames \(0028,0008\) is not an integer"),
        ("3gb-bulk-data-truncated.dcm", r"Rows \(0028,0010\)"),
        ("no_meta.dcm", "cannot be read as DICOM"),
        (
            "GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",
            "cannot be read as DICOM",
        ),
    ],
)
def test_invalid_input_rejected(name: str, reason: str) -> None:
    with pytest.raises(PreparationError, match=reason) as error:
        repair_file(SAMPLES / name)
    assert error.value.action


def test_repaired_header_is_writable(tmp_path: Path) -> None:
    header, _, _ = repair_file(SAMPLES / "GH364.dcm")
    header["PixelData"] = read(SAMPLES / "GH364.dcm")["PixelData"]
    header.save_as(tmp_path / "written.dcm")
    assert read(tmp_path / "written.dcm").Rows == 768
