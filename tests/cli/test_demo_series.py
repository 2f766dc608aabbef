"""The demo DICOM series: valid CT Image Storage, exact HU round trip, deterministic UIDs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from atlasflow.cli.demo_series import SENTINEL_PATIENT_DATA, build_demo_datasets, write_demo_series
from atlasflow.ingest.assemble import assemble_series
from atlasflow.ingest.dicom import parse_instance
from atlasflow.testing.data import TEST_DATA

EXAMPLE_CT = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_series(EXAMPLE_CT, tmp_path_factory.mktemp("demo"))


def _reference() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(EXAMPLE_CT)
    return np.asarray(img.dataobj), img.affine


def test_round_trip_is_exact(demo: list[Path]) -> None:
    datasets = [parse_instance(p.read_bytes())[0] for p in demo]
    vol = assemble_series(datasets)
    assert vol.warnings == []
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    data, affine = _reference()
    assert data.shape == (122, 101, 112) and data.min() == -1207 and data.max() == 3382
    assert ours.shape == data.shape
    assert np.array_equal(np.asarray(ours.dataobj), data)
    np.testing.assert_allclose(ours.affine, affine, atol=1e-4, rtol=0)


def test_files_are_valid_ct_image_storage(demo: list[Path]) -> None:
    assert [p.name for p in demo[:2]] == ["IM0001.dcm", "IM0002.dcm"] and len(demo) == 112
    for number, path in enumerate(demo, start=1):
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds, info = parse_instance(raw)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # explicit VR LE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.Modality == "CT" and int(ds.InstanceNumber) == number
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert [float(v) for v in ds.PixelSpacing] == [3.0, 3.0]
        assert float(ds.SliceThickness) == 3.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.Rows, ds.Columns) == (101, 122)
    first, last = pydicom.dcmread(demo[0]), pydicom.dcmread(demo[-1])
    # InstanceNumber 1 is the most cranial slice; LPS z of the NIfTI's top slice
    data, affine = _reference()
    top = affine @ np.array([0, 0, data.shape[2] - 1, 1])
    assert float(first.ImagePositionPatient[2]) == pytest.approx(top[2], abs=1e-4)
    assert float(last.ImagePositionPatient[2]) == pytest.approx(affine[2, 3], abs=1e-4)
    # IPP x/y: RAS voxel (121, 100) is the LPS origin of each slice (x and y negated)
    corner = affine @ np.array([121, 100, 0, 1])
    assert float(last.ImagePositionPatient[0]) == pytest.approx(-corner[0], abs=1e-4)
    assert float(last.ImagePositionPatient[1]) == pytest.approx(-corner[1], abs=1e-4)
    # air below -1024 HU is stored as negative signed pixels
    assert int(first.pixel_array.min()) < 0 or int(last.pixel_array.min()) < 0


def test_sentinel_patient_data(demo: list[Path]) -> None:
    assert SENTINEL_PATIENT_DATA == {
        "PatientName": "DOE^JANE^SENTINEL",
        "PatientID": "MRN-SENTINEL-0042",
        "AccessionNumber": "ACC-SENTINEL-77",
        "PatientBirthDate": "19450101",
    }
    for path in (demo[0], demo[77]):
        ds = pydicom.dcmread(path)
        for keyword, value in SENTINEL_PATIENT_DATA.items():
            assert str(ds.data_element(keyword).value) == value


def test_uids_are_deterministic_and_well_formed(demo: list[Path], tmp_path: Path) -> None:
    again = write_demo_series(EXAMPLE_CT, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in demo]
    other = write_demo_series(EXAMPLE_CT, tmp_path / "other", seed_name="another-seed")
    a, b = pydicom.dcmread(demo[0]), pydicom.dcmread(other[0])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert getattr(a, keyword) != getattr(b, keyword)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in demo]
    uid = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
    sops = {d.SOPInstanceUID for d in datasets}
    assert len(sops) == len(datasets)
    shared = {(d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID) for d in datasets}
    assert len(shared) == 1
    for value in [*sops, *next(iter(shared))]:
        assert uid.match(value) and len(value) <= 64
        assert int(value[5:]) < 2**128


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([0.7, 0.9, 2.5, 1.0]),  # RAS, anisotropic in-plane
        np.array([[-0.8, 0, 0, 10], [0, 0.6, 0, -20], [0, 0, -2.0, 30], [0, 0, 0, 1.0]]),  # LAI
    ],
    ids=["ras-aniso", "lai"],
)
def test_any_axis_aligned_volume_round_trips(affine: np.ndarray, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1500, 3000, size=(9, 7, 5)).astype(np.int32)
    datasets = build_demo_datasets(hu, affine, seed_name="t")
    vol = assemble_series(datasets)
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    ref = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4, rtol=0)


def test_non_integer_hu_is_refused() -> None:
    with pytest.raises(ValueError):
        build_demo_datasets(np.full((2, 2, 2), 0.5), np.eye(4))


def test_dcm2niix_reads_the_demo_like_the_nifti(demo: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "d2n"
    out.mkdir()
    run = subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-b", "n", "-o", str(out), "-f", "x", str(demo[0].parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    img = nib.as_closest_canonical(nib.load(out / "x.nii"))
    data, affine = _reference()
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-3, rtol=0)
    assert np.array_equal(img.get_fdata(), data.astype(np.float64))


def test_script_writes_the_series(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_demo_series.py"), str(tmp_path / "s"), "--nifti", str(EXAMPLE_CT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "s").glob("IM*.dcm"))) == 112
