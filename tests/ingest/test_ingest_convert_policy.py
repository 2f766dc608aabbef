"""Conversion policy units: fast header reader == pydicom, grouping/splitting, Volume metadata
(padding, resampled, filled, source frames), REPAIR on in-memory datasets, NIfTI header."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from atlasflow.cli.demo_series import write_demo_series
from atlasflow.common.errors import InvalidArgument
from atlasflow.ingest.assemble import assemble_series
from atlasflow.ingest.convert import convert, main
from atlasflow.ingest.geometry import REPAIR, STRICT
from atlasflow.ingest.nifti_writer import nifti_header, write_nifti
from atlasflow.ingest.scan import _fast_frames, scan
from atlasflow.testing.data import TEST_DATA

D2N = TEST_DATA / "dicom2nifti_ct_headers/tests/data/failing"
CT3 = TEST_DATA / "dcmqi/data/segmentations/ct-3slice"
EXAMPLE_CT = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
FIELDS = (
    "rows",
    "cols",
    "ipp",
    "iop",
    "pixel_spacing",
    "slope",
    "intercept",
    "series_uid",
    "frame_of_reference_uid",
    "sop_instance_uid",
    "frame_number",
    "thickness_mm",
    "spacing_between_slices_mm",
    "padding",
    "bits_stored",
    "signed",
    "rescale_type",
    "gantry_tilt_deg",
    "multiframe",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_series(EXAMPLE_CT, out)
    return out


def _read(directory: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(directory.iterdir())]


def test_fast_reader_equals_pydicom(demo: Path) -> None:
    roots = [TEST_DATA, demo]
    fast, slow = scan(roots), scan(roots, use_fast=False)
    assert [f.file for f in fast.frames] == [f.file for f in slow.frames]
    n_fast = 0
    for a, b in zip(fast.frames, slow.frames):
        n_fast += _fast_frames(a.file) is not None
        for name in FIELDS:
            x, y = getattr(a.ref, name), getattr(b.ref, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, (a.file, name)
        assert (a.series_number, a.localizer) == (b.series_number, b.localizer)
        assert np.array_equal(a.ref.source.read(), b.ref.source.read())
    assert n_fast >= 112 + 3 + 16  # demo, dcmqi, dicom2nifti: native files take the fast path
    assert _fast_frames(TEST_DATA / "pydicom_ct_singles/pydicom-data/693_J2KR.dcm") is None


def test_padding_metadata_and_mask() -> None:
    vol = assemble_series(_read(CT3))
    assert vol.padding_hu == (-3024.0, -3024.0)  # PixelPaddingValue -2000, intercept -1024
    mask = vol.padding_mask()
    assert mask is not None and mask.shape == vol.array.shape
    assert mask.any() and np.all(vol.array[mask] == -3024) and not vol.resampled
    assert vol.source_frames and all(s is not None for s in vol.source_frames)


def test_repair_tilt_and_gap_in_memory() -> None:
    with pytest.raises(InvalidArgument):
        assemble_series(_read(D2N / "sliceincrement/002"), STRICT)
    vol = assemble_series(_read(D2N / "sliceincrement/002"), REPAIR)
    assert vol.resampled and vol.filled_slices == (3,)
    assert vol.tilt_deg == pytest.approx(15.5, abs=0.05)
    assert vol.source_frames[3] is None and sum(s is not None for s in vol.source_frames) == 4
    assert vol.array.shape == (512, 514, 5)


def test_repair_multiframe_in_memory() -> None:
    ds = pydicom.dcmread(TEST_DATA / "pydicom_ct_singles/pydicom-data/eCT_Supplemental.dcm")
    vol = assemble_series([ds], REPAIR)
    assert vol.array.shape == (512, 512, 2)
    # IOP -1\\0\\0\\0\\1\\0: normal r x c = (0, 0, -1) LPS, frames 10 mm apart along it
    assert vol.affine[2, 2] == pytest.approx(-10.0)
    assert [s[1] for s in vol.source_frames if s] == [1, 2] or [s[1] for s in vol.source_frames if s] == [2, 1]
    assert any("RescaleType US" in w for w in vol.warnings)
    stored = ds.pixel_array  # (frames, rows, cols); shared rescale: intercept -1024
    by_z = sorted(
        range(2),
        key=lambda k: -float(ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient[2]),
    )
    for z, k in enumerate(by_z):
        assert np.array_equal(vol.array[:, :, z].T, stored[k].astype(np.int32) - 1024)


def test_two_series_localizer_and_mixed_size_are_split(demo: Path, tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    for p in sorted(demo.iterdir())[:10]:
        shutil.copy(p, src / p.name)
    for p in CT3.iterdir():  # a second series
        shutil.copy(p, src / f"ct3_{p.name}")
    first = pydicom.dcmread(sorted(demo.iterdir())[0])
    scout = copy.deepcopy(first)  # a localizer in the demo series
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = "2.25.1"
    scout.save_as(src / "scout.dcm", enforce_file_format=True)
    small = copy.deepcopy(first)  # same series, another size: split apart
    small.Rows, small.Columns = 10, 10
    small.PixelData = small.PixelData[: 10 * 10 * 2]
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = "2.25.2"
    small.save_as(src / "small.dcm", enforce_file_format=True)
    (src / "notes.txt").write_text("not DICOM")
    lines: list[str] = []
    results = convert([src], tmp_path / "out.nii.gz", log=lines.append)
    written = sorted(r.path.name for r in results if r.path is not None)
    assert written == ["out_1.nii.gz", "out_2.nii.gz", "out_3.nii.gz"]
    text = "\n".join(lines)
    assert "1 localizer frame(s) dropped" in text and "split" in text
    assert "skipped 1 file(s): not DICOM" in text
    shapes = sorted(nib.load(r.path).shape for r in results if r.path is not None)
    assert shapes == [(10, 10, 1), (122, 101, 10), (512, 512, 3)]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing"), str(tmp_path / "o.nii")]) == 2
    assert "input not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(tmp_path / "o.nii")]) == 2
    assert "no CT image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(empty), str(tmp_path / "o.txt")])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_writer_round_trip(suffix: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 3000, size=(7, 5, 3)).astype(np.int16)
    rot = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)  # det +1, oblique-free
    affine = np.eye(4)
    affine[:3, :3] = rot * [0.7, 0.8, 2.5]
    affine[:3, 3] = [10.5, -20.25, 30.0]
    path = tmp_path / f"x{suffix}"
    write_nifti(path, np.asfortranarray(array), affine)
    img = nib.load(path)
    assert np.array_equal(np.asarray(img.dataobj), array)
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)  # quaternion agrees
    assert len(nifti_header(array.shape, array.dtype, affine)) == 352
