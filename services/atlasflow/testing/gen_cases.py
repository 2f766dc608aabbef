"""Derive the CT cases that tests/data lacks from REAL slices (tests and benchmarks use it).

Every generator writes Part-10 files into a directory the caller gives (a pytest tmp dir;
nothing big is ever committed) and returns that directory. Source of real pixels: the
TotalSegmentator 20-slice abdominal series (JPEG 2000, 512x512, 12-bit unsigned, intercept
-1024, HFS, 2 mm spacing; see its README) and the bundled demo series (122x101, 3 mm).

* `write_long_series(out, n)`: n slices of 512x512 explicit-VR little endian (uncompressed),
  the 20 real slices tiled back and forth (0..19, 19..0, ...) at 2 mm, one series.
* `write_reencoded(out, syntax)`: the 20 real slices re-encoded losslessly as RLE Lossless or
  JPEG-LS Lossless (pydicom's RLE encoder, pyjpegls for JPEG-LS).
* `write_position(src, out, position)`: a series rewritten as if acquired in another patient
  position (HFP, FFP, HFDL, HFDR, FFDL, FFDR, FFS): the pixel array is rotated/flipped in
  plane and (0020,0037) ImageOrientationPatient + (0020,0032) ImagePositionPatient rewritten
  so that every voxel keeps its patient-space position: the anatomy, hence the volume after
  reorientation to RAS, is unchanged, while the stored layout and the affine are not.
* `write_enhanced(src, out)`: the series as ONE Legacy Converted Enhanced CT instance
  (highdicom `LegacyConvertedEnhancedCTImage`), real HU, per-frame positions.
* `write_tilted(src, out, degrees)`: a gantry tilt about the patient's left-right axis revealed
  only by orientation + position (no (0018,1120)): columns cosine and slice origins sheared
  consistently; pixels unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from atlasflow.testing.data import TEST_DATA

TS_DICOM = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct_dicom"
PREFIX = "2.25."


def read_series(src: Path) -> list[Dataset]:
    """All Part-10 files of `src`, sorted by position along +z (LPS)."""
    datasets = [pydicom.dcmread(p) for p in sorted(Path(src).iterdir()) if p.is_file()]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def _native(ds: Dataset) -> Dataset:
    """Decode pixel data in place and store it as explicit VR little endian."""
    arr = ds.pixel_array
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsStored = ds.BitsAllocated if ds.BitsStored > ds.BitsAllocated else ds.BitsStored
    return ds


def _new_ids(ds: Dataset, study: str, series: str, for_uid: str, number: int) -> None:
    sop = generate_uid(prefix=None)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = for_uid
    ds.SOPInstanceUID = sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = number


def _save(ds: Dataset, out: Path, k: int) -> None:
    ds.save_as(out / f"IM{k:05d}.dcm", enforce_file_format=True)


def write_long_series(out: Path, n: int, src: Path = TS_DICOM) -> Path:
    """`n` native 512x512 slices tiled from the 20 real slices (back and forth), 2 mm apart."""
    out.mkdir(parents=True, exist_ok=True)
    base = [_native(d) for d in read_series(src)]
    study, series, for_uid = (generate_uid(prefix=None) for _ in range(3))
    z0 = float(base[0].ImagePositionPatient[2])
    period = 2 * len(base)
    for k in range(n):
        m = k % period
        ds = base[m if m < len(base) else period - 1 - m]
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], round(z0 + 2.0 * k, 4)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        _new_ids(ds, study, series, for_uid, n - k)
        _save(ds, out, k)
    return out


def write_reencoded(out: Path, syntax: str, src: Path = TS_DICOM, count: int = 20) -> Path:
    """The first `count` real slices re-encoded losslessly (`syntax`: "rle" or "jpegls")."""
    uid = {"rle": RLELossless, "jpegls": JPEGLSLossless}[syntax]
    out.mkdir(parents=True, exist_ok=True)
    study, series, for_uid = (generate_uid(prefix=None) for _ in range(3))
    for k, ds in enumerate(read_series(src)[:count]):
        _native(ds)
        ds.compress(uid, encoding_plugin="pydicom" if syntax == "rle" else "pyjpegls")
        _new_ids(ds, study, series, for_uid, k + 1)
        _save(ds, out, k)
    return out


def _in_plane(ds: Dataset, op: str) -> None:
    """Apply one in-plane operation to pixels + geometry, keeping patient positions.

    op: "flip_cols" (Q[j, i] = P[j, C-1-i]), "flip_rows", "transpose" (Q[i, j] = P[j, i]).
    World position of pixel (row j, column i) = IPP + i * dc * r + j * dr * c (LPS).
    """
    arr = ds.pixel_array
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    r, c = iop[:3], iop[3:]
    o = np.array([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    rows, cols = arr.shape
    if op == "flip_cols":
        arr = arr[:, ::-1]
        o = o + (cols - 1) * dc * r
        r = -r
    elif op == "flip_rows":
        arr = arr[::-1, :]
        o = o + (rows - 1) * dr * c
        c = -c
    elif op == "transpose":
        arr = arr.T
        r, c = c, r
        dr, dc = dc, dr
    else:  # pragma: no cover - programming error
        raise ValueError(op)
    arr = np.ascontiguousarray(arr)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.ImageOrientationPatient = [round(float(v), 8) for v in (*r, *c)]
    ds.ImagePositionPatient = [round(float(v), 6) for v in o]
    ds.PixelSpacing = [dr, dc]


#: Patient position -> in-plane operations applied to an HFS series. 90-degree rotations
#: (decubitus) = transpose + one flip; 180 degrees (prone) = both flips; feet-first = a
#: left-right mirror of the head-first image (slice normal reversed).
POSITIONS: dict[str, tuple[str, ...]] = {
    "FFS": ("flip_cols",),
    "HFP": ("flip_rows", "flip_cols"),
    "FFP": ("flip_rows",),
    "HFDR": ("transpose", "flip_cols"),
    "HFDL": ("transpose", "flip_rows"),
    "FFDR": ("transpose",),
    "FFDL": ("transpose", "flip_rows", "flip_cols"),
}


def write_position(src: Path, out: Path, position: str) -> Path:
    """`src` rewritten as acquired in `position` (a key of `POSITIONS`), same anatomy."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, for_uid = (generate_uid(prefix=None) for _ in range(3))
    for k, ds in enumerate(read_series(src)):
        _native(ds)
        for op in POSITIONS[position]:
            _in_plane(ds, op)
        ds.PatientPosition = position
        _new_ids(ds, study, series, for_uid, k + 1)
        _save(ds, out, k)
    return out


def write_tilted(src: Path, out: Path, degrees: float) -> Path:
    """Gantry tilt of `degrees` about the left-right axis, visible only in IOP + IPP.

    The column cosine becomes (0, cos t, -sin t) (LPS) for an axial HFS series; slice origins
    keep their table positions along z (as a tilted gantry acquires them), so the stack
    direction (z) leaves the slice normal by `degrees`. Pixel data is unchanged.
    """
    out.mkdir(parents=True, exist_ok=True)
    study, series, for_uid = (generate_uid(prefix=None) for _ in range(3))
    t = np.deg2rad(degrees)
    for k, ds in enumerate(read_series(src)):
        _native(ds)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        assert np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-4), "needs an axial HFS series"
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(np.cos(t), 8), round(-np.sin(t), 8)]
        ds.GantryDetectorTilt = None if k % 2 else degrees  # present on some slices only
        if ds.GantryDetectorTilt is None:
            del ds.GantryDetectorTilt
        _new_ids(ds, study, series, for_uid, k + 1)
        _save(ds, out, k)
    return out


def write_enhanced(src: Path, out: Path) -> Path:
    """`src` (single-frame CT) as one Legacy Converted Enhanced CT instance `out/enhanced.dcm`."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    out.mkdir(parents=True, exist_ok=True)
    datasets = [_native(d) for d in read_series(src)]
    study, series, for_uid = (generate_uid(prefix=None) for _ in range(3))
    for k, ds in enumerate(datasets):
        _new_ids(ds, study, series, for_uid, k + 1)
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "ReferringPhysicianName",
        ):
            if kw not in ds or ds.get(kw) in (None, ""):
                setattr(ds, kw, {"PatientSex": "O", "StudyID": "1", "PatientBirthDate": "19000101"}.get(kw, "ANON"))
        for kw in ("StudyDate", "SeriesDate", "ContentDate"):
            if not ds.get(kw):
                setattr(ds, kw, "20240101")
        for kw in ("StudyTime", "SeriesTime", "ContentTime"):
            if not ds.get(kw):
                setattr(ds, kw, "120000")
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(prefix=None),
        series_number=901,
        sop_instance_uid=generate_uid(prefix=None),
        instance_number=1,
    )
    enhanced.save_as(out / "enhanced.dcm", enforce_file_format=True)
    return out


GENERATORS: dict[str, Callable[..., Path]] = {
    "long": write_long_series,
    "reencoded": write_reencoded,
    "position": write_position,
    "tilted": write_tilted,
    "enhanced": write_enhanced,
}

if __name__ == "__main__":  # python -m atlasflow.testing.gen_cases long OUT_DIR 300
    kind, target, *rest = sys.argv[1:]
    if kind == "long":
        write_long_series(Path(target), int(rest[0]) if rest else 300)
    else:
        raise SystemExit("usage: gen_cases.py long OUT_DIR [N]")
