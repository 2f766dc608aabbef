"""Assemble one single-frame CT series into a volume: HU array (X, Y, Z) + RAS+ affine (no I/O).

Geometry (PS3.3 C.7.6.2, Image Plane module):

* (0020,0037) ImageOrientationPatient gives the row cosine r (direction of increasing column
  index) and the column cosine c (direction of increasing row index), in DICOM LPS.
* The slice normal is n = r x c. Slices are ordered by d = (0020,0032) ImagePositionPatient . n,
  ascending, never by (0020,0013) InstanceNumber (which scanners number either way).
* Voxel (i, j, k): i = column index (X), j = row index (Y), k = slice index in that order (Z).
  LPS affine columns: r * column spacing, c * row spacing, n * slice spacing, origin = IPP of
  the first slice; (0028,0030) PixelSpacing is (row spacing = between rows, column spacing =
  between columns). RAS+ affine = diag(-1, -1, 1, 1) @ LPS affine (NIfTI convention). The
  array is kept in this DICOM order (not reoriented): compare with other converters after
  ``nibabel.as_closest_canonical``. With n = r x c the affine always has a positive determinant.

Values: HU = stored * (0028,1053) RescaleSlope + (0028,1052) RescaleIntercept, per slice
(default slope 1, intercept 0). The array is int16 when every slope and intercept is an integer
and every HU fits int16 (all CT seen so far); int32 when integers exceed int16 (warning);
float32 when a slope or intercept is fractional (warning; never rounded). (0028,0120)
PixelPaddingValue is not masked: padding keeps its rescaled value (as dcm2niix does).

Policy (reason INCONSISTENT_SERIES unless said otherwise; metadata ``check`` names the test):

* no datasets: EMPTY_SERIES; pixel data that does not decode: CORRUPT_DICOM.
* multi-frame instances (Enhanced CT, NumberOfFrames > 1): UNSUPPORTED_MULTIFRAME (missing
  feature: per-frame functional groups are not read yet).
* differing SeriesInstanceUID or FrameOfReferenceUID, Rows/Columns, PixelSpacing (> 1e-4 mm),
  ImageOrientationPatient (> 1e-4 per cosine component), missing geometry: rejected.
* two slices closer than 0.01 mm along n (repeated position, e.g. bolus-tracking monitors):
  rejected (``duplicate_position``).
* slice origins off the line along n by more than 0.05 mm + 0.2 % of the distance, i.e. a gantry
  tilt or a sheared stack: rejected (``gantry_tilt``; resampling is not implemented).
* a gap deviating from the median gap by more than 25 % (a missing or extra slice): rejected
  (``slice_gap``; no interpolation).
* smaller gap variations (above max(0.01 mm, 0.1 %)): accepted with a warning; the slice
  spacing is the mean gap (last - first) / (N - 1), so the first and last slices are exact and
  the warning states the largest position error of the slices in between.
* one slice: spacing = (0018,0050) SliceThickness (else 1 mm), with a warning.
* SliceThickness != spacing (overlapping or gapped reconstruction): a warning only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from atlasflow.common.errors import InvalidArgument

DOMAIN = "atlasflow.ingest"

ORIENTATION_TOL = 1e-4  # per direction-cosine component
SPACING_TOL_MM = 1e-4  # in-plane pixel spacing
DUPLICATE_TOL_MM = 0.01  # along the normal
TILT_TOL_MM = 0.05  # + TILT_TOL_REL * distance from the first slice
TILT_TOL_REL = 0.002
GAP_REJECT_REL = 0.25  # gap vs median gap
GAP_WARN_MM = 0.01
GAP_WARN_REL = 0.001

_ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A CT volume.

    array: (X, Y, Z) = (columns, rows, slices) in HU, int16 (see module doc for the
    exceptions). affine: (4, 4) float64, voxel index -> RAS+ mm (NIfTI convention).
    warnings: human-readable notes on decisions taken (no patient data, no UIDs).
    """

    array: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _err(reason: str, message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(reason, message, domain=DOMAIN, metadata=metadata)


def _floats(ds: Dataset, keyword: str, n: int, index: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise _err(
            "INCONSISTENT_SERIES", f"slice {index}: {keyword} missing or malformed",
            check="geometry_missing", attribute=keyword,
        )
    return arr


def assemble_series(datasets: Sequence[Dataset]) -> Volume:
    """Build a `Volume` from the single-frame CT datasets of one series (any order).

    Each dataset needs ``file_meta.TransferSyntaxUID``. Pixel data is decoded with pydicom's
    decoders (not cached on the datasets; compressed syntaxes need the pylibjpeg plugins).
    Raises `InvalidArgument` as listed in the module docstring (CORRUPT_DICOM when pixel data
    does not decode).
    """
    if not datasets:
        raise _err("EMPTY_SERIES", "the series has no instances", check="count")
    n = len(datasets)
    first = datasets[0]
    for ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or str(ds.get("SOPClassUID", "")) in _ENHANCED_CT:
            raise _err(
                "UNSUPPORTED_MULTIFRAME",
                "multi-frame (Enhanced) CT cannot be assembled yet",
                check="multiframe",
            )
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword, "") or "") for ds in datasets}) > 1:
            raise _err("INCONSISTENT_SERIES", f"instances differ in {keyword}", check=keyword)

    rows, cols = int(first.Rows), int(first.Columns)
    iop0 = _floats(first, "ImageOrientationPatient", 6, 0)
    ps0 = _floats(first, "PixelSpacing", 2, 0)
    ipps = np.empty((n, 3))
    for idx, ds in enumerate(datasets):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise _err("INCONSISTENT_SERIES", "instances differ in Rows/Columns", check="size")
        if np.max(np.abs(_floats(ds, "ImageOrientationPatient", 6, idx) - iop0)) > ORIENTATION_TOL:
            raise _err(
                "INCONSISTENT_SERIES", "instances differ in ImageOrientationPatient",
                check="orientation",
            )
        if np.max(np.abs(_floats(ds, "PixelSpacing", 2, idx) - ps0)) > SPACING_TOL_MM:
            raise _err(
                "INCONSISTENT_SERIES", "instances differ in PixelSpacing", check="pixel_spacing"
            )
        ipps[idx] = _floats(ds, "ImagePositionPatient", 3, idx)
    if np.any(ps0 <= 0):
        raise _err("INCONSISTENT_SERIES", "PixelSpacing must be positive", check="pixel_spacing")

    row_cos, col_cos = iop0[:3], iop0[3:]
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise _err(
            "INCONSISTENT_SERIES", "ImageOrientationPatient cosines are not orthogonal",
            check="orientation",
        )
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)

    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipps = dist[order], ipps[order]
    warnings: list[str] = []
    spacing = _slice_spacing(dist, ipps, normal, datasets[int(order[0])], warnings)

    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps0[1]  # i: along a row = column index, step = column spacing
    lps[:3, 1] = col_cos * ps0[0]  # j: down a column = row index, step = row spacing
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = ipps[0]
    affine = _LPS_TO_RAS @ lps

    array = _hu_stack([datasets[int(k)] for k in order], rows, cols, warnings)
    return Volume(array=array, affine=affine, warnings=warnings)


def _slice_spacing(
    dist: np.ndarray, ipps: np.ndarray, normal: np.ndarray, ds0: Dataset, warnings: list[str]
) -> float:
    """Slice spacing in mm from sorted positions `dist` (N,) along `normal`; enforce policy."""
    n = dist.shape[0]
    thickness = ds0.get("SliceThickness")
    thickness_mm = float(thickness) if thickness not in (None, "") else None
    if n == 1:
        spacing = thickness_mm if thickness_mm and thickness_mm > 0 else 1.0
        warnings.append(f"single slice: slice spacing set to {spacing:g} mm")
        return spacing
    gaps = np.diff(dist)
    if np.min(gaps) < DUPLICATE_TOL_MM:
        raise _err(
            "INCONSISTENT_SERIES",
            "two or more instances share one slice position (not a volume)",
            check="duplicate_position",
        )
    along = (dist - dist[0])[:, None] * normal[None, :]
    off_line = np.linalg.norm((ipps - ipps[0]) - along, axis=1)
    if np.any(off_line > TILT_TOL_MM + TILT_TOL_REL * np.abs(dist - dist[0])):
        raise _err(
            "INCONSISTENT_SERIES",
            f"slice origins leave the slice normal by up to {off_line.max():.2f} mm "
            "(gantry tilt or sheared stack; resampling is not supported)",
            check="gantry_tilt",
        )
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > GAP_REJECT_REL * median:
        raise _err(
            "INCONSISTENT_SERIES",
            f"slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm around a median of "
            f"{median:.3f} mm (missing or extra slices)",
            check="slice_gap",
        )
    spacing = float(dist[-1] - dist[0]) / (n - 1)
    deviation = float(np.max(np.abs(dist - (dist[0] + spacing * np.arange(n)))))
    if np.max(np.abs(gaps - spacing)) > max(GAP_WARN_MM, GAP_WARN_REL * spacing):
        warnings.append(
            f"non-uniform slice spacing ({gaps.min():.4f}..{gaps.max():.4f} mm): using the "
            f"mean {spacing:.4f} mm; slice positions are off by at most {deviation:.4f} mm"
        )
    if thickness_mm and abs(thickness_mm - spacing) > max(GAP_WARN_MM, GAP_WARN_REL * spacing):
        warnings.append(
            f"slice thickness {thickness_mm:g} mm differs from slice spacing {spacing:.4f} mm "
            "(overlapping or gapped reconstruction); the spacing is used"
        )
    return spacing


def _decode(ds: Dataset) -> np.ndarray:
    """Decode one frame (rows, columns) without caching it on the dataset (peak memory)."""
    try:
        ts = ds.file_meta.TransferSyntaxUID
        array, _ = get_decoder(ts).as_array(ds)
    except Exception as exc:
        raise _err(
            "CORRUPT_DICOM", f"pixel data does not decode ({type(exc).__name__})",
            check="pixel_decode",
        ) from None
    return array


def _hu_stack(datasets: list[Dataset], rows: int, cols: int, warnings: list[str]) -> np.ndarray:
    """Decode and rescale sorted slices into an (X, Y, Z) HU array (a transposed (Z, Y, X))."""
    rescale = []
    for ds in datasets:
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        rescale.append((
            float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0,
        ))
    integral = all(s.is_integer() and i.is_integer() for s, i in rescale)
    stack = np.empty((len(datasets), rows, cols), dtype=np.int32 if integral else np.float32)
    for k, (ds, (slope, intercept)) in enumerate(zip(datasets, rescale)):
        pixels = _decode(ds)
        if pixels.shape != (rows, cols):
            raise _err(
                "INCONSISTENT_SERIES", "decoded pixel data does not match Rows/Columns",
                check="size",
            )
        if integral:
            stack[k] = pixels.astype(np.int32) * int(slope) + int(intercept)
        else:
            stack[k] = pixels.astype(np.float64) * slope + intercept
    if integral:
        lo, hi = int(stack.min()), int(stack.max())
        if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
            stack = stack.astype(np.int16)
        else:
            warnings.append(f"HU range {lo}..{hi} exceeds int16: array kept as int32")
    else:
        warnings.append("fractional RescaleSlope/Intercept: HU kept as float32 (not rounded)")
    # (Z, Y, X) C-order -> (X, Y, Z) view, Fortran-contiguous as NIfTI stores it.
    return stack.transpose(2, 1, 0)
