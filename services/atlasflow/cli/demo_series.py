"""Build a valid, deterministic, SYNTHETIC-identity CT DICOM series from a NIfTI CT volume.

The demo (``atlasflow demo``) and the tests need a real DICOM series to push through ingest.
`write_demo_series` turns a NIfTI CT (by default TotalSegmentator's ``example_ct.nii.gz``:
122x101x112 voxels, 3 mm, RAS, HU -1207..3382) into one single-frame CT Image Storage
instance per axial slice:

* Part-10 files, Explicit VR Little Endian, File Meta with group length, media storage UIDs;
* axial slices in the standard patient frame: (0020,0037) ImageOrientationPatient
  1\\0\\0\\0\\1\\0 (rows run to patient left, columns to posterior) when the NIfTI is
  axis-aligned; the NIfTI is first reoriented to the closest LPS axes, so any axis-aligned
  input works; a sheared or oblique affine is written as the oblique IOP it implies;
* (0020,0032) ImagePositionPatient per slice in LPS, (0028,0030) PixelSpacing as
  row spacing\\column spacing, (0018,0050) SliceThickness = slice spacing;
* pixels int16 signed ((0028,0103) PixelRepresentation 1), stored = HU - intercept with
  (0028,1052) RescaleIntercept -1024 and (0028,1053) RescaleSlope 1: HU round-trips exactly
  (the stored value is negative below -1024 HU, e.g. air at -1207 HU);
* (0020,0013) InstanceNumber 1 is the most cranial slice (as many scanners number them), so
  instance order runs against ascending z: readers must sort by position;
* deterministic UIDs ``2.25.<uuid5(DEMO_UID_NAMESPACE, seed_name + "/<role>").int>`` for the
  study, series, frame of reference and each SOP instance; fixed dates and times, so the same
  `seed_name` gives byte-identical files. The UIDs depend only on `seed_name`: pass another
  `seed_name` for a different volume;
* synthetic sentinel patient data (`SENTINEL_PATIENT_DATA`) that later tests search for in
  logs, spans, metrics and exports to prove it never leaks.

Array logic (`build_demo_datasets`) is separate from file I/O (`write_demo_series`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

#: Synthetic patient identity written into every demo instance. Never real; tests grep logs,
#: spans, metrics and exports for these strings.
SENTINEL_PATIENT_DATA: dict[str, str] = {
    "PatientName": "DOE^JANE^SENTINEL",
    "PatientID": "MRN-SENTINEL-0042",
    "AccessionNumber": "ACC-SENTINEL-77",
    "PatientBirthDate": "19450101",
}

#: uuid5 namespace of the demo UIDs (itself uuid5(NAMESPACE_URL, "urn:atlasflow:demo-series")).
DEMO_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:atlasflow:demo-series")

#: Default source volume; override with the ATLASFLOW_DEMO_CT environment variable.
DEFAULT_DEMO_NIFTI = Path(
    os.environ.get(
        "ATLASFLOW_DEMO_CT",
        str(Path(__file__).parent / "data" / "example_ct.nii.gz"),  # bundled, see data/README.md
    )
)

RESCALE_INTERCEPT = -1024
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def demo_uid(seed_name: str, role: str) -> str:
    """``2.25.<decimal of uuid5(DEMO_UID_NAMESPACE, seed_name + "/" + role)>`` (<= 44 chars)."""
    return "2.25." + str(uuid.uuid5(DEMO_UID_NAMESPACE, f"{seed_name}/{role}").int)


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def build_demo_datasets(hu: np.ndarray, affine: np.ndarray, *, seed_name: str = "atlasflow-demo") -> list[Dataset]:
    """One CT Image Storage dataset (with file meta) per slice, in InstanceNumber order.

    hu: (X, Y, Z) integer HU array; affine: (4, 4) voxel -> RAS+ mm. Raises ValueError when
    the values are not integers or do not fit int16 after subtracting the intercept.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {hu.shape}")
    if not np.all(np.isfinite(hu)) or not np.array_equal(hu, np.round(hu)):
        raise ValueError("HU values must be integers to round-trip exactly")
    # Reorient voxel axes to the closest LPS directions: i -> +x (L), j -> +y (P), k -> +z (S).
    img = nib.Nifti1Image(hu, np.asarray(affine, dtype=np.float64))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS")
    )
    img = img.as_reoriented(ornt)
    data = np.asarray(img.dataobj)
    lps = _LPS_FROM_RAS @ img.affine
    stored = data.astype(np.int64) - RESCALE_INTERCEPT
    if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
        raise ValueError("HU range does not fit signed 16-bit storage with intercept -1024")
    stored = stored.astype("<i2")

    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = np.linalg.norm(col_step), np.linalg.norm(row_step)
    slice_spacing = float(np.linalg.norm(slice_step))
    units = np.stack([col_step / col_spacing, row_step / row_spacing, slice_step / slice_spacing])
    if np.max(np.abs(units @ units.T - np.eye(3))) > 1e-5:
        raise ValueError("sheared affine: voxel axes are not orthogonal")
    iop = [*units[0], *units[1]]
    nx, ny, nz = data.shape

    study_uid = demo_uid(seed_name, "study")
    series_uid = demo_uid(seed_name, "series")
    for_uid = demo_uid(seed_name, "frame-of-reference")
    normal = np.cross(iop[:3], iop[3:])
    datasets: list[Dataset] = []
    # InstanceNumber 1 = most cranial slice (highest k after LPS reorientation).
    for number, k in enumerate(range(nz - 1, -1, -1), start=1):
        sop_uid = demo_uid(seed_name, f"instance/{number}")
        ipp = (lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ATLASFLOW_DEMO"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        # SOP Common
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = "20240101"
        ds.InstanceCreationTime = "120000"
        # Patient (synthetic sentinels)
        for keyword, value in SENTINEL_PATIENT_DATA.items():
            setattr(ds, keyword, value)
        ds.PatientSex = "O"
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "DEMO1"
        ds.StudyDescription = "atlasflow demo CT (synthetic identity)"
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = "20240101"
        ds.SeriesTime = "120000"
        ds.SeriesDescription = "demo abdomen 3 mm"
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "atlasflow"
        ds.ManufacturerModelName = "demo_series"
        # General Image / CT Image
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20240101"
        ds.ContentTime = "120000"
        ds.KVP = ""
        ds.BurnedInAnnotation = "NO"
        ds.ImageComments = "SYNTHETIC patient identity; pixels from a public test CT"
        # Image Plane
        ds.ImageOrientationPatient = [_ds(float(v)) for v in iop]
        ds.ImagePositionPatient = [_ds(float(v)) for v in ipp]
        ds.PixelSpacing = [_ds(float(row_spacing)), _ds(float(col_spacing))]
        ds.SliceThickness = _ds(slice_spacing)
        ds.SliceLocation = _ds(float(ipp @ normal))
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        # rows = j (y, posterior), columns = i (x, left): pixel[r, c] = data[c, r, k]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds["PixelData"].VR = "OW"
        datasets.append(ds)
    return datasets


def write_demo_series(nifti_path: Path, out_dir: Path, *, seed_name: str = "atlasflow-demo") -> list[Path]:
    """Write the demo series built from `nifti_path` into `out_dir` (created if needed).

    Returns the file paths ``IM0001.dcm``... in InstanceNumber order (1 = most cranial).
    """
    img = cast(nib.Nifti1Image, nib.load(str(nifti_path)))
    hu = np.asanyarray(img.dataobj)  # applies scl_slope/scl_inter when set
    datasets = build_demo_datasets(hu, img.affine, seed_name=seed_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"IM{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``make_demo_series.py [--nifti PATH] [--seed NAME] OUT_DIR``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--nifti", type=Path, default=DEFAULT_DEMO_NIFTI)
    parser.add_argument("--seed", default="atlasflow-demo")
    args = parser.parse_args(argv)
    paths = write_demo_series(args.nifti, args.out_dir, seed_name=args.seed)
    print(f"wrote {len(paths)} CT instances to {args.out_dir}")
    return 0
