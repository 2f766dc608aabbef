"""assemble_series against dcm2niix (the reference converter) and the series policy cases."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from atlasflow.cli.demo_series import write_demo_series
from atlasflow.common.errors import InvalidArgument
from atlasflow.ingest.assemble import Volume, assemble_series
from atlasflow.testing.data import TEST_DATA

DATA = TEST_DATA
EXAMPLE_CT = DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
TS_DICOM = DATA / "totalsegmentator/tests/reference_files/example_ct_dicom"
CT3 = DATA / "dcmqi/data/segmentations/ct-3slice"
D2N = DATA / "dicom2nifti_ct_headers/tests/data/failing"
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_series(EXAMPLE_CT, out)
    return out


def _read(directory: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(directory.iterdir()) if p.is_file()]


def _canonical(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(array, affine))


def _dcm2niix(src: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    run = subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-b", "n", "-o", str(out), "-f", "x", str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    files = sorted(out.glob("*.nii"))
    assert len(files) == 1, (files, run.stdout)
    return nib.load(files[0])


@pytest.mark.parametrize(
    "source, shape",
    [
        ("demo", (122, 101, 112)),  # explicit VR, signed int16, intercept -1024, HFS
        (TS_DICOM, (512, 512, 20)),  # JPEG 2000, uint16, empty UIDs, thickness != spacing
        (CT3, (512, 512, 3)),  # implicit VR, feet-first, instance order reversed vs z
    ],
    ids=["demo", "totalseg-j2k", "dcmqi-ffs"],
)
def test_matches_dcm2niix(source: object, shape: tuple[int, int, int], demo_dir: Path, tmp_path: Path) -> None:
    src = demo_dir if source == "demo" else Path(str(source))
    vol = assemble_series(_read(src))
    assert vol.array.shape == shape
    assert vol.array.dtype == np.int16
    assert np.linalg.det(vol.affine[:3, :3]) > 0
    ref = nib.as_closest_canonical(_dcm2niix(src, tmp_path / "d2n"))
    ours = _canonical(vol.array, vol.affine)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3, rtol=0)
    # get_fdata applies dcm2niix's scl_slope/scl_inter when it stores raw values.
    ref_hu = ref.get_fdata(dtype=np.float64)
    assert np.array_equal(np.asarray(ours.dataobj).astype(np.float64), ref_hu)


def test_input_order_does_not_matter(tmp_path: Path) -> None:
    datasets = _read(TS_DICOM)
    ordered = assemble_series(datasets)
    shuffled = list(datasets)
    random.Random(7).shuffle(shuffled)
    again = assemble_series(shuffled)
    assert np.array_equal(ordered.array, again.array)
    assert np.array_equal(ordered.affine, again.affine)
    # slices sorted by position along the normal, not by InstanceNumber (267 = most cranial)
    assert ordered.affine[2, 2] > 0
    z0 = float(ordered.affine[2, 3])
    lowest = min(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    assert z0 == pytest.approx(float(lowest.ImagePositionPatient[2]))
    assert int(lowest.InstanceNumber) == 286


def test_ffs_affine_is_stated_in_dicom_order() -> None:
    vol = assemble_series(_read(CT3))
    # IOP 1\0\0\0\1\0, PixelSpacing 0.810547, IPP z -128.69..-126.69 (README)
    expected = np.array(
        [
            [-0.810547, 0, 0, 235.199997],
            [0, -0.810547, 0, 226.800003],
            [0, 0, 1.0, -128.690002],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-5)
    assert any("thickness" in w for w in vol.warnings)


@pytest.mark.parametrize(
    "case, check",
    [
        ("gantrytilting/001", "gantry_tilt"),
        ("notavolume/001", "duplicate_position"),
        ("sliceincrement/001", "slice_gap"),
        ("sliceincrement/002", "gantry_tilt"),  # tilt and a missing slice: tilt found first
    ],
)
def test_dicom2nifti_failing_cases_are_rejected(case: str, check: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        assemble_series(_read(D2N / case))
    assert info.value.reason == "INCONSISTENT_SERIES"
    assert info.value.metadata["check"] == check


def _demo(demo_dir: Path) -> list[Dataset]:
    return _read(demo_dir)


def test_mixed_orientation_is_rejected(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(InvalidArgument) as info:
        assemble_series(datasets)
    assert info.value.metadata["check"] == "orientation"


def test_mixed_size_is_rejected(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    ds = datasets[3]
    ds.Rows = 50
    ds.PixelData = ds.PixelData[: 50 * int(ds.Columns) * 2]
    with pytest.raises(InvalidArgument) as info:
        assemble_series(datasets)
    assert info.value.metadata["check"] == "size"


def test_mixed_series_is_rejected(demo_dir: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        assemble_series(_demo(demo_dir)[:3] + _read(CT3))
    assert info.value.reason == "INCONSISTENT_SERIES"


def test_duplicate_position_is_rejected(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    datasets.append(copy.deepcopy(datasets[10]))
    with pytest.raises(InvalidArgument) as info:
        assemble_series(datasets)
    assert info.value.metadata["check"] == "duplicate_position"


def test_missing_slice_is_rejected(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    del datasets[50]
    with pytest.raises(InvalidArgument) as info:
        assemble_series(datasets)
    assert info.value.metadata["check"] == "slice_gap"


def test_small_spacing_jitter_warns_and_uses_mean_spacing(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    reference = assemble_series(datasets)
    assert reference.warnings == []
    middle = datasets[40]
    ipp = [float(v) for v in middle.ImagePositionPatient]
    middle.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.3]  # 10 % of the 3 mm gap
    vol = assemble_series(datasets)
    assert len(vol.warnings) == 1 and "non-uniform" in vol.warnings[0]
    assert "0.3000 mm" in vol.warnings[0]  # largest position error stated
    np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-9)
    assert np.array_equal(vol.array, reference.array)


def test_fractional_rescale_gives_float32(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)[:4]
    for ds in datasets:
        ds.RescaleSlope = "0.5"
    vol = assemble_series(datasets)
    assert vol.array.dtype == np.float32
    assert any("float32" in w for w in vol.warnings)
    stored = datasets[0].pixel_array.astype(np.float64)  # most cranial = last slice
    expected = stored * 0.5 - 1024.0
    assert np.array_equal(vol.array[:, :, -1].T.astype(np.float64), expected)


def test_wide_integer_range_gives_int32(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)[:3]
    for ds in datasets:
        ds.RescaleSlope = "20"
    vol = assemble_series(datasets)
    assert vol.array.dtype == np.int32
    stored = datasets[0].pixel_array.astype(np.int64)
    assert np.array_equal(vol.array[:, :, -1].T, stored * 20 - 1024)


def test_single_slice_uses_thickness(demo_dir: Path) -> None:
    vol = assemble_series(_demo(demo_dir)[:1])
    assert vol.array.shape == (122, 101, 1)
    assert vol.affine[2, 2] == pytest.approx(3.0)
    assert any("single slice" in w for w in vol.warnings)


def test_empty_and_multiframe() -> None:
    with pytest.raises(InvalidArgument) as info:
        assemble_series([])
    assert info.value.reason == "EMPTY_SERIES"
    enhanced = pydicom.dcmread(DATA / "pydicom_ct_singles/pydicom-data/eCT_Supplemental.dcm")
    with pytest.raises(InvalidArgument) as info:
        assemble_series([enhanced])
    assert info.value.reason == "UNSUPPORTED_MULTIFRAME"


def test_volume_layout_is_x_columns_y_rows(demo_dir: Path) -> None:
    datasets = _demo(demo_dir)
    vol: Volume = assemble_series(datasets)
    lowest = min(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = lowest.pixel_array.astype(np.int32) - 1024  # (rows, columns)
    assert np.array_equal(vol.array[:, :, 0], pixels.T)


def test_anisotropic_pixel_spacing_matches_dcm2niix(demo_dir: Path, tmp_path: Path) -> None:
    # (0028,0030) is row spacing\column spacing: make them differ so an axis swap shows.
    src = tmp_path / "aniso"
    src.mkdir()
    for path in sorted(demo_dir.iterdir()):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = ["2.0", "3.5"]
        ds.save_as(src / path.name, enforce_file_format=True)
    vol = assemble_series(_read(src))
    np.testing.assert_allclose(np.abs(np.diag(vol.affine)[:3]), [3.5, 2.0, 3.0])
    ref = nib.as_closest_canonical(_dcm2niix(src, tmp_path / "d2n"))
    ours = _canonical(vol.array, vol.affine)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3, rtol=0)
    assert np.array_equal(np.asarray(ours.dataobj).astype(np.float64), ref.get_fdata())
