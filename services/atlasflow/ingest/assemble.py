"""Assemble the frames of one CT series into a volume: HU array (X, Y, Z) + RAS+ affine.

No file I/O here: frames come as `FrameRef` records whose `source` decodes the stored pixel
values of one frame on demand (a pydicom Dataset in memory, or a reader that
`atlasflow.ingest.scan` builds over a file). `assemble_series(datasets)` is the entry point
for in-memory pydicom datasets (the ingest service); `assemble_frames(frames)` the general one.

This docstring is the policy of the whole assembly; the code is in three modules:
`atlasflow.ingest.frames` (DICOM attributes -> `FrameRef`), `atlasflow.ingest.geometry`
(`Policy`, ordering, spacing / tilt / gap checks, the output grid) and this one (the HU array:
tilt resampling, slice filling, value types).

Geometry (PS3.3 C.7.6.2, Image Plane module; C.7.6.16 for multi-frame functional groups):

* (0020,0037) ImageOrientationPatient gives the row cosine r (direction of increasing column
  index) and the column cosine c (direction of increasing row index), in DICOM LPS.
* The slice normal is n = r x c. Frames are ordered by d = (0020,0032) ImagePositionPatient . n,
  ascending, never by (0020,0013) InstanceNumber (which scanners number either way).
* Voxel (i, j, k): i = column index (X), j = row index (Y), k = slice index in that order (Z).
  LPS affine columns: r * column spacing, c * row spacing, n * slice spacing, origin = IPP of
  the first slice; (0028,0030) PixelSpacing is (row spacing = between rows, column spacing =
  between columns). RAS+ affine = diag(-1, -1, 1, 1) @ LPS affine (NIfTI convention). The
  array is kept in this DICOM order (not reoriented): compare with other converters after
  ``nibabel.as_closest_canonical``. With n = r x c the affine always has a positive determinant.
  Every patient position (HFS, FFS, HFP, FFP, HF/FF decubitus left/right) is only a different
  r, c and IPP: nothing is position-specific.
* Enhanced / Legacy Converted Enhanced CT (multi-frame): each frame's IPP, IOP, PixelSpacing,
  SliceThickness and RescaleSlope/Intercept are read from (5200,9230)
  PerFrameFunctionalGroupsSequence, else (5200,9229) SharedFunctionalGroupsSequence, else the
  top level (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
  PixelValueTransformationSequence). Frames of several instances of one series are pooled.

Values: HU = stored * (0028,1053) RescaleSlope + (0028,1052) RescaleIntercept, per frame
(default slope 1, intercept 0). The array is int16 when every slope and intercept is an integer
and every HU fits int16 (all CT seen so far); int32 when integers exceed int16 (warning);
float32 when a slope or intercept is fractional (warning; never rounded). (0028,0120)
PixelPaddingValue (and (0028,0121) PixelPaddingRangeLimit) is not masked: padding keeps its
rescaled value (as dcm2niix does); `Volume.padding_hu` gives its HU range and
`Volume.padding_mask()` the mask. A (0028,1054) RescaleType other than HU adds a warning.
Memory: the output array is allocated once and filled frame by frame (one decoded frame at a
time); no other volume-sized buffer exists unless int16 turns out too narrow (int32 copy).

Policy. `Policy` chooses what happens to the repairable cases; `STRICT` (the default of
`assemble_series`, the historical behaviour) rejects them, `REPAIR` (used by
``atlasflow convert``) repairs them. Errors are `InvalidArgument` with reason
INCONSISTENT_SERIES unless said otherwise; metadata ``check`` names the test.

* no frames: EMPTY_SERIES; pixel data that does not decode, an attribute that does not
  convert (unknown VR, non-numeric DS: check ``elements``) or a per-frame RescaleSlope/Intercept
  beyond reception's limits (check ``rescale``): CORRUPT_DICOM.
* size, checked from the headers before any array is allocated: more than
  `geometry.MAX_SERIES_VOXELS` voxels (``Policy.max_voxels``) or more than 32767 along an axis
  (NIfTI-1) -> VOLUME_TOO_LARGE (checks ``voxels``, ``nifti_dim``); positions beyond
  `geometry.MAX_POSITION_MM`, pixel spacing outside [0.001, 1000] mm or orientation cosines
  that are not unit vectors -> INCONSISTENT_SERIES (``geometry_range``, ``orientation``).
* multi-frame instances: STRICT rejects them (UNSUPPORTED_MULTIFRAME, check ``multiframe``);
  REPAIR assembles their frames as above.
* differing SeriesInstanceUID or FrameOfReferenceUID, Rows/Columns, PixelSpacing (> 1e-4 mm),
  ImageOrientationPatient (> 1e-4 per cosine component), missing geometry: rejected (checks
  ``SeriesInstanceUID``, ``FrameOfReferenceUID``, ``size``, ``pixel_spacing``,
  ``orientation``, ``geometry_missing``). Mixed sizes / localizers inside one directory are
  split apart before assembly by `atlasflow.ingest.grouping` (see there).
* two frames closer than 0.01 mm along n (repeated position, e.g. bolus-tracking monitors or
  a dynamic series): always rejected (``duplicate_position``): a time series is not a volume.
* gantry tilt: slice origins off the line along n by more than 0.05 mm + 0.2 % of the distance
  (found from IPP and IOP alone; (0018,1120) GantryDetectorTilt is only reported). STRICT:
  rejected (``gantry_tilt``). REPAIR: each slice is moved within its own plane onto an
  orthogonal grid (r, c, n) by bilinear interpolation of the in-plane offset of its origin
  (the exact correction for a tilted gantry, whose slices are parallel planes: no
  interpolation across slices); the in-plane grid grows to hold every shifted slice. Voxels
  whose 2x2 support is not wholly inside the source slice hold the padding value when the
  series has one, else the lowest HU of the source slices (as dcm2niix). `tilt_deg` records the
  angle, `resampled` is True. HU are rounded to the nearest integer (int16 output).
* missing slices: a gap that is k times the regular spacing (k >= 2, within 25 % of the
  spacing). STRICT: rejected (``slice_gap``). REPAIR: the k-1 missing slices are filled by
  linear interpolation between their two neighbours along n (rounded), listed in
  `Volume.filled_slices` (Z indices) with a warning, `resampled` is True. A gap that is not
  such a multiple (irregular spacing) is rejected under both policies (``slice_gap``): it
  cannot be represented in NIfTI without resampling every slice.
* smaller gap variations (above max(0.01 mm, 0.1 %)): accepted with a warning; the slice
  spacing is the mean gap (last - first) / (N - 1), so the first and last slices are exact and
  the warning states the largest position error of the slices in between.
* one slice: spacing = (0018,0088) SpacingBetweenSlices, else (0018,0050) SliceThickness,
  else 1 mm (as dcm2niix), with a warning.
* SliceThickness != spacing (overlapping or gapped reconstruction): a warning only.

`Volume.resampled` is True when any voxel is not a source pixel (tilt-corrected or filled):
a DICOM SEG export that references source frames must refuse such a volume; its grid is not
the one of the source images. `Volume.source_frames[k]` names the (SOPInstanceUID, frame
number) of slice k (None for a filled slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from atlasflow.ingest.frames import FrameRef, frame_refs, is_multiframe, series_error
from atlasflow.ingest.geometry import STRICT, Policy, plan_geometry

if TYPE_CHECKING:  # pydicom is imported lazily: `atlasflow convert` may not need it at all
    from pydicom.dataset import Dataset


_I16 = np.iinfo(np.int16)


@dataclass
class Volume:
    """A CT volume.

    array: (X, Y, Z) = (columns, rows, slices) in HU, int16 (see module doc for the
    exceptions). affine: (4, 4) float64, voxel index -> RAS+ mm (NIfTI convention).
    warnings: human-readable notes on decisions taken (no patient data, no UIDs).
    padding_hu: (low, high) HU of (0028,0120) PixelPaddingValue[/RangeLimit], None if absent.
    resampled: True when the grid differs from the source images' (tilt-corrected or filled
    slices): a DICOM SEG referencing source frames must not be built on it.
    tilt_deg: the gantry tilt corrected (0.0 when none). filled_slices: Z indices filled by
    interpolation. source_frames: per Z index, (SOPInstanceUID, frame number) or None (filled).
    slice_thickness_mm: (0018,0050) of the first slice, None if absent.
    """

    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    warnings: list[str] = field(default_factory=list)
    padding_hu: tuple[float, float] | None = None
    resampled: bool = False
    tilt_deg: float = 0.0
    filled_slices: tuple[int, ...] = ()
    source_frames: list[tuple[str, int] | None] = field(default_factory=list)
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    slice_thickness_mm: float | None = None

    def padding_mask(self) -> npt.NDArray[Any] | None:
        """(X, Y, Z) bool: voxels holding the padding value (outside the scan FOV), or None."""
        if self.padding_hu is None:
            return None
        lo, hi = self.padding_hu
        return (self.array >= lo) & (self.array <= hi)


def assemble_series(datasets: Sequence[Dataset], policy: Policy = STRICT) -> Volume:
    """Build a `Volume` from the CT datasets of one series (any order).

    Each dataset needs ``file_meta.TransferSyntaxUID``. Pixel data is decoded with pydicom's
    decoders, one frame at a time (not cached on the datasets; compressed syntaxes need the
    pylibjpeg plugins). `policy`: `STRICT` (default) or `REPAIR` (see module doc). Raises
    `InvalidArgument` as listed in the module docstring.
    """
    if not datasets:
        raise series_error("EMPTY_SERIES", "the series has no instances", check="count")
    if not policy.multiframe and any(is_multiframe(ds) for ds in datasets):
        raise series_error(
            "UNSUPPORTED_MULTIFRAME",
            "multi-frame (Enhanced) CT is not assembled under this policy",
            check="multiframe",
        )
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword, "") or "") for ds in datasets}) > 1:
            raise series_error("INCONSISTENT_SERIES", f"instances differ in {keyword}", check=keyword)
    frames: list[FrameRef] = []
    for idx, ds in enumerate(datasets):
        frames.extend(frame_refs(ds, index=idx))
    return assemble_frames(frames, policy)


# ---------------------------------------------------------------- pixels


def _covered(shift: npt.NDArray[Any], rows: int, cols: int) -> tuple[int, int, int, int]:
    """Output rows [y0, y1) and columns [x0, x1) whose bilinear support lies inside a source
    plane of `rows` x `cols` placed at (column, row) offset `shift` (pixels)."""
    eps = 1e-6
    x0, y0 = (int(np.ceil(v - eps)) for v in shift)
    x1 = int(np.floor(shift[0] + cols - 1 + eps)) + 1
    y1 = int(np.floor(shift[1] + rows - 1 + eps)) + 1
    return y0, y1, x0, x1


def _shift_bilinear(src: npt.NDArray[Any], shift: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[Any]:
    """Place `src` (rows, cols) with its origin at (column, row) `shift` px >= 0 into a
    (rows', cols') = `shape` float64 plane, bilinear. Only `_covered` pixels are meaningful.

    out[j, i] = src(j - shift[1], i - shift[0]): the shift is constant over the plane, so
    bilinear interpolation is a weighted sum of four integer-shifted copies.
    """
    rows, cols = shape
    fx, fy = np.floor(shift)
    tx, ty = float(shift[0] - fx), float(shift[1] - fy)
    pad = np.zeros((src.shape[0] + 2, src.shape[1] + 2), dtype=np.float64)
    pad[1:-1, 1:-1] = src
    # Along x: S(i - fx - tx) = (1 - tx) S[i - fx] + tx S[i - fx - 1] (same along y); in
    # padded indices out[j, i] takes pad[j - oy, i - ox] with o = floor + d - 1, d in {0, 1}.
    acc = np.zeros(shape, dtype=np.float64)
    for wy, dy in ((1 - ty, 0), (ty, 1)):
        for wx, dx in ((1 - tx, 0), (tx, 1)):
            w = wy * wx
            if w == 0.0:
                continue
            oy, ox = int(fy) + dy - 1, int(fx) + dx - 1
            ys, xs = max(0, oy), max(0, ox)
            ye, xe = min(rows, oy + pad.shape[0]), min(cols, ox + pad.shape[1])
            acc[ys:ye, xs:xe] += w * pad[ys - oy : ye - oy, xs - ox : xe - ox]
    return acc


def _hu_dtype(frames: Sequence[FrameRef]) -> tuple[np.dtype[Any], bool]:
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    return (np.dtype(np.int16) if integral else np.dtype(np.float32)), integral


def assemble_frames(frames: Sequence[FrameRef], policy: Policy = STRICT) -> Volume:
    """Assemble frames of one series (any order) into a `Volume` under `policy`.

    Memory: one output array (X, Y, Z) allocated up front, filled one decoded frame at a time.
    """
    if not frames:
        raise series_error("EMPTY_SERIES", "the series has no instances", check="count")
    if not policy.multiframe and any(f.multiframe for f in frames):
        raise series_error(
            "UNSUPPORTED_MULTIFRAME",
            "multi-frame (Enhanced) CT is not assembled under this policy",
            check="multiframe",
        )
    plan = plan_geometry(frames, policy)
    warnings = list(plan.warnings)
    nx, ny, nz = plan.shape
    dtype, integral = _hu_dtype(frames)
    # (Z, Y, X) C-order storage; the returned (X, Y, Z) view is Fortran-contiguous (NIfTI).
    stack = np.empty((nz, ny, nx), dtype=dtype)
    rows, cols = frames[0].rows, frames[0].cols
    tilted = bool(np.any(plan.shift_px != 0))
    sorted_frames = [frames[int(k)] for k in plan.order]
    covered: dict[int, tuple[int, int, int, int]] = {}
    lowest = np.inf
    source_frames: list[tuple[str, int] | None] = [None] * nz
    for f, z, shift in zip(sorted_frames, plan.slot, plan.shift_px):
        pixels = f.source.read()
        if pixels.shape != (rows, cols):
            raise series_error(
                "INCONSISTENT_SERIES",
                "decoded pixel data does not match Rows/Columns",
                check="size",
            )
        source_frames[int(z)] = (f.sop_instance_uid, f.frame_number)
        if tilted:
            hu = pixels.astype(np.float64) * f.slope + f.intercept
            plane = _shift_bilinear(hu, shift, (ny, nx))
            y0, y1, x0, x1 = covered[int(z)] = _covered(shift, rows, cols)
            lowest = min(lowest, float(hu.min()))
            plane[:y0], plane[y1:], plane[:, :x0], plane[:, x1:] = 0, 0, 0, 0
            stack = _store(stack, int(z), np.rint(plane) if integral else plane, warnings)
        elif integral:
            stack = _store_integral(stack, int(z), pixels, int(f.slope), int(f.intercept), warnings)
        else:
            stack[int(z)] = pixels.astype(np.float64) * f.slope + f.intercept
    if tilted:
        fill = _fill_value(sorted_frames, lowest)
        for z, (y0, y1, x0, x1) in covered.items():
            plane = stack[z]
            plane[:y0], plane[y1:], plane[:, :x0], plane[:, x1:] = fill, fill, fill, fill
    _fill_gaps(stack, plan.filled, np.sort(plan.slot), integral)
    if not integral:
        warnings.append("fractional RescaleSlope/Intercept: HU kept as float32 (not rounded)")
    types = {f.rescale_type.upper() for f in frames} - {"", "HU"}
    if types:
        warnings.append(f"(0028,1054) RescaleType {'/'.join(sorted(types))}: values are not HU")
    first = sorted_frames[0]
    padding_hu = None
    if first.padding is not None:
        a = first.padding[0] * first.slope + first.intercept
        b = first.padding[1] * first.slope + first.intercept
        padding_hu = (min(a, b), max(a, b))
    if plan.filled:
        warnings.append(f"filled slices (Z index): {list(plan.filled)}")
    return Volume(
        array=stack.transpose(2, 1, 0),
        affine=plan.affine,
        warnings=warnings,
        padding_hu=padding_hu,
        resampled=tilted or bool(plan.filled),
        tilt_deg=plan.tilt_deg,
        filled_slices=plan.filled,
        source_frames=source_frames,
        series_uid=first.series_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        slice_thickness_mm=first.thickness_mm,
    )


def _fill_gaps(stack: npt.NDArray[Any], filled: Sequence[int], present: npt.NDArray[Any], integral: bool) -> None:
    """stack[z] for each missing slice z: linear interpolation between the nearest present
    slices below and above (`present`: sorted Z indices of source slices; the first and last
    slices are always present). O(len(filled) log len(present)): the neighbours come from one
    binary search each (it was a scan of every slice below and above each filled one,
    quadratic in the slice count)."""
    if not filled:
        return
    z = np.asarray(filled, dtype=np.int64)
    above = np.searchsorted(present, z)  # first present index > z (z itself is not present)
    for zi, hi, lo in zip(z.tolist(), present[above].tolist(), present[above - 1].tolist()):
        w = (zi - lo) / (hi - lo)
        value = (1 - w) * stack[lo].astype(np.float64) + w * stack[hi].astype(np.float64)
        stack[zi] = np.rint(value) if integral else value


def _widen(stack: npt.NDArray[Any], warnings: list[str]) -> npt.NDArray[Any]:
    """int16 -> int32 copy (the only second volume-sized buffer; rare), with a warning."""
    warnings.append("HU range exceeds int16: array kept as int32")
    return stack.astype(np.int32)


def _store(stack: npt.NDArray[Any], z: int, hu: npt.NDArray[Any], warnings: list[str]) -> npt.NDArray[Any]:
    """stack[z] = hu (integral values), widening int16 -> int32 when `hu` does not fit."""
    if stack.dtype == np.int16 and (float(hu.min()) < _I16.min or float(hu.max()) > _I16.max):
        stack = _widen(stack, warnings)
    stack[z] = hu
    return stack


def _store_integral(
    stack: npt.NDArray[Any], z: int, pixels: npt.NDArray[Any], slope: int, intercept: int, warnings: list[str]
) -> npt.NDArray[Any]:
    """stack[z] = pixels * slope + intercept without a volume-sized temporary.

    The stored range is measured first (two cheap reductions), so the HU are known to fit the
    output type before they are computed straight into it (slope 1: one pass).
    """
    lo, hi = int(pixels.min()), int(pixels.max())
    a, b = lo * slope + intercept, hi * slope + intercept
    if stack.dtype == np.int16 and (min(a, b) < _I16.min or max(a, b) > _I16.max):
        stack = _widen(stack, warnings)
    target = stack[z]
    if slope == 1:
        # computed in a type that holds the result (the intercept as int32, |intercept| <= 1e6:
        # a Python int that does not fit an 8-bit pixel type raised OverflowError), then cast
        np.add(pixels, np.int32(intercept), out=target, casting="unsafe")
    else:
        hu = pixels.astype(np.int64)
        hu *= slope
        hu += intercept
        target[...] = hu
    return stack


def _fill_value(frames: Sequence[FrameRef], lowest: float) -> float:
    """HU for voxels that a tilt correction uncovers: the padding value when the series has
    one, else the lowest HU of the source slices (dcm2niix's choice)."""
    f = frames[0]
    if f.padding is not None:
        return f.padding[0] * f.slope + f.intercept
    return lowest
