"""parse_instance / validate_dataset on real CT instances and on broken variants of them."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from atlasflow.cli.demo_series import SENTINEL_PATIENT_DATA, write_demo_series
from atlasflow.common.errors import InvalidArgument
from atlasflow.ingest.dicom import (
    CT_SOP_CLASSES,
    DICOM_STATUS,
    InstanceInfo,
    c_store_status,
    parse_instance,
    validate_dataset,
)
from atlasflow.testing.data import TEST_DATA

DATA = TEST_DATA
EXAMPLE_CT = DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
TS_DICOM = DATA / "totalsegmentator/tests/reference_files/example_ct_dicom"
CT3 = DATA / "dcmqi/data/segmentations/ct-3slice"
SINGLES = DATA / "pydicom_ct_singles"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_series(EXAMPLE_CT, tmp_path_factory.mktemp("demo"))[40]


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _reject(data: bytes, reason: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_instance(data)
    err = info.value
    assert err.reason == reason, (err.reason, err.message)
    assert err.domain == "atlasflow.ingest"
    return err


@pytest.mark.parametrize(
    "path, ts",
    [
        (CT3 / "01.dcm", "1.2.840.10008.1.2"),  # implicit VR LE, GE
        (SINGLES / "pydicom-data/693_J2KR.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
        (SINGLES / "pydicom-data/bad_sequence.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG lossless
        (SINGLES / "pylibjpeg-data/JPEGLS/CT1_JLSN.dcm", "1.2.840.10008.1.2.4.81"),  # JPEG-LS
        (SINGLES / "pydicom-data/eCT_Supplemental.dcm", "1.2.840.10008.1.2.1"),  # Enhanced CT
    ],
)
def test_real_ct_instances_are_accepted(path: Path, ts: str) -> None:
    data = path.read_bytes()
    ds, info = parse_instance(data)
    ref = pydicom.dcmread(path)
    assert info == InstanceInfo(
        study_uid=ref.StudyInstanceUID,
        series_uid=ref.SeriesInstanceUID,
        sop_instance_uid=ref.SOPInstanceUID,
        sop_class_uid=ref.SOPClassUID,
        frame_of_reference_uid=str(ref.get("FrameOfReferenceUID", "")),
        modality="CT",
        transfer_syntax_uid=ts,
    )
    assert info.sop_class_uid in CT_SOP_CLASSES


def test_demo_instance_is_accepted(demo_file: Path) -> None:
    ds, info = parse_instance(demo_file.read_bytes())
    assert info.sop_instance_uid == ds.SOPInstanceUID and info.study_uid.startswith("2.25.")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not dicom" * 40,
        b"\x89PNG\r\n\x1a\n" + bytes(300),
        gzip.compress(b"\x5c\x01" + bytes(400)),  # a gzip stream, as a .nii.gz would be
        EXAMPLE_CT.read_bytes()[:4096],  # real NIfTI (gzip) bytes
    ],
    ids=["empty", "text", "png", "gzip", "nifti"],
)
def test_not_dicom(data: bytes) -> None:
    _reject(data, "NOT_DICOM")


def test_preamble_stripped_file_without_meta_is_not_dicom(demo_file: Path) -> None:
    # A bare dataset (no preamble, no File Meta): the transfer syntax would be a guess.
    ds = pydicom.dcmread(demo_file)
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    ds.save_as(bare, implicit_vr=False, little_endian=True)
    assert bare.getvalue()[:2] == b"\x08\x00"  # starts with group 0008
    _reject(bare.getvalue(), "NOT_DICOM")
    # ... while a Part-10 stream that only lacks the preamble is accepted.
    no_preamble = _to_bytes(pydicom.dcmread(demo_file))[128 + 4 :]
    assert no_preamble[:2] == b"\x02\x00"
    assert parse_instance(no_preamble)[1].modality == "CT"


@pytest.mark.parametrize("cut", [-1, -2000, 0.5, 1000, 300, 140])
def test_truncated_native_file_is_corrupt(demo_file: Path, cut: float) -> None:
    data = demo_file.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    _reject(data[:end], "CORRUPT_DICOM")


@pytest.mark.parametrize("cut", [-1, -9, -5000, 0.5])
def test_truncated_jpeg2000_file_is_corrupt(cut: float) -> None:
    data = (SINGLES / "pydicom-data/693_J2KR.dcm").read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else len(data) + cut
    _reject(data[:end], "CORRUPT_DICOM")


def test_broken_jpeg2000_codestream_is_corrupt() -> None:
    data = bytearray((SINGLES / "pydicom-data/693_J2KR.dcm").read_bytes())
    soc = data.find(b"\xff\x4f\xff\x51")  # J2K start of codestream + SIZ marker
    assert soc > 0
    data[soc + 8 : soc + 16] = b"\xff" * 8  # image size fields of SIZ
    err = _reject(bytes(data), "CORRUPT_DICOM")
    assert err.metadata["check"] == "pixel_decode"


def test_pixel_data_cut_short_inside_dataset(demo_file: Path) -> None:
    ds = pydicom.dcmread(demo_file)
    ds.PixelData = ds.PixelData[:-200]  # a well-formed element, just too short
    err = _reject(_to_bytes(ds), "CORRUPT_DICOM")
    assert err.metadata["check"] == "pixel_length"
    assert c_store_status(err) == DICOM_STATUS["CORRUPT_DICOM"]


def test_missing_pixel_data(demo_file: Path) -> None:
    ds = pydicom.dcmread(demo_file)
    del ds.PixelData
    _reject(_to_bytes(ds), "CORRUPT_DICOM")


def test_mr_is_not_ct(demo_file: Path) -> None:
    ds = pydicom.dcmread(demo_file)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.Modality = "MR"
    err = _reject(_to_bytes(ds), "NOT_CT")
    assert err.metadata["check"] == "sop_class"
    assert err.metadata["sop_class_uid"] == MR_IMAGE_STORAGE
    assert c_store_status(err) == 0x0122  # Refused: SOP Class not supported


def test_ct_sop_class_with_mr_modality_is_not_ct(demo_file: Path) -> None:
    ds = pydicom.dcmread(demo_file)
    ds.Modality = "MR"
    err = _reject(_to_bytes(ds), "NOT_CT")
    assert err.metadata["check"] == "modality"
    assert c_store_status(err) == 0xA900  # Data Set does not match SOP Class


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_empty_uid(demo_file: Path, keyword: str) -> None:
    ds = pydicom.dcmread(demo_file)
    setattr(ds, keyword, "")
    err = _reject(_to_bytes(ds), "MISSING_UID")
    assert err.metadata["check"] == keyword


def test_deidentified_series_with_empty_uids_is_rejected() -> None:
    # TotalSegmentator's example series: Study/Series/SOP UIDs present but empty (README).
    path = sorted(TS_DICOM.iterdir())[0]
    err = _reject(path.read_bytes(), "MISSING_UID")
    # the empty (0008,0016) fell back to the File Meta's MediaStorageSOPClassUID (CT)
    assert err.metadata["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"


def test_errors_carry_no_patient_data_nor_instance_uids(demo_file: Path) -> None:
    ds = pydicom.dcmread(demo_file)
    uids = [ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID]
    variants = []
    for change in ("modality", "pixels", "uid"):
        v = pydicom.dcmread(demo_file)
        if change == "modality":
            v.Modality = "MR"
        elif change == "pixels":
            v.PixelData = v.PixelData[:100]
        else:
            v.StudyInstanceUID = ""
        variants.append(_to_bytes(v))
    for data in variants:
        with pytest.raises(InvalidArgument) as info:
            parse_instance(data)
        text = info.value.message + repr(info.value.metadata)
        for secret in [*SENTINEL_PATIENT_DATA.values(), *uids]:
            assert secret not in text


def test_validate_dataset_as_from_c_store(demo_file: Path) -> None:
    # pynetdicom hands over a decoded dataset; the transfer syntax comes from the context.
    ds = pydicom.dcmread(demo_file)
    del ds.file_meta
    with pytest.raises(InvalidArgument) as info:
        validate_dataset(ds)
    assert info.value.reason == "CORRUPT_DICOM"
    info2 = validate_dataset(ds, "1.2.840.10008.1.2.1")
    assert info2.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_status_table_is_in_the_c_store_failure_ranges() -> None:
    assert set(DICOM_STATUS) >= {"NOT_DICOM", "NOT_CT", "CORRUPT_DICOM", "MISSING_UID"}
    # PS3.4 Table B.2-1, C-STORE failures: A7xx Refused: Out of Resources, A9xx Data Set does
    # not match SOP Class, Cxxx Cannot understand; plus the general PS3.7 Annex C failure 0124H
    # Refused: Not Authorized (a study an admin deleted: its tombstone refuses new instances)
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    for reason, status in DICOM_STATUS.items():
        in_ranges = 0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF
        general = STORAGE_SERVICE_CLASS_STATUS.get(status, ("",))[0] == "Failure"
        assert in_ranges or general, reason
    assert DICOM_STATUS["DISK_FULL"] == 0xA700
    assert DICOM_STATUS["STUDY_DELETED"] == 0x0124


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("RescaleSlope", "1e308"), ("RescaleSlope", "NaN"), ("RescaleIntercept", "-inf"), ("RescaleIntercept", "3e9")],
)
def test_rescale_that_cannot_give_finite_hu_is_corrupt(demo_file: Path, keyword: str, value: str) -> None:
    """HU = stored x slope + intercept must stay finite: a crafted slope/intercept is refused at
    reception (0xC220), never assembled into an inf/NaN volume."""
    ds = pydicom.dcmread(demo_file)
    tag = {"RescaleSlope": 0x00281053, "RescaleIntercept": 0x00281052}[keyword]
    with pydicom.config.disable_value_validation():
        ds[tag] = pydicom.DataElement(tag, "DS", value)
        data = _to_bytes(ds)
    err = _reject(data, "CORRUPT_DICOM")
    assert err.metadata["check"] == "rescale" and err.metadata["attribute"] == keyword
    assert c_store_status(err) == 0xC220
