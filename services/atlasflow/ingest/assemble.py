"""Assemble the frames of one CT series into a volume: HU array (X, Y, Z) + RAS+ affine.

No file I/O here: frames come as `FrameRef` records whose `source` decodes the stored pixel
values of one frame on demand (a pydicom Dataset in memory, or a reader that
`atlasflow.ingest.convert` builds over a file). `assemble_series(datasets)` is the entry point
for in-memory pydicom datasets (the ingest service); `assemble_frames(frames)` the general one.

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

* no frames: EMPTY_SERIES; pixel data that does not decode: CORRUPT_DICOM.
* multi-frame instances: STRICT rejects them (UNSUPPORTED_MULTIFRAME, check ``multiframe``);
  REPAIR assembles their frames as above.
* differing SeriesInstanceUID or FrameOfReferenceUID, Rows/Columns, PixelSpacing (> 1e-4 mm),
  ImageOrientationPatient (> 1e-4 per cosine component), missing geometry: rejected (checks
  ``SeriesInstanceUID``, ``FrameOfReferenceUID``, ``size``, ``pixel_spacing``,
  ``orientation``, ``geometry_missing``). Mixed sizes / localizers inside one directory are
  split apart before assembly by `atlasflow.ingest.convert` (see there).
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
from typing import TYPE_CHECKING, Protocol

import numpy as np

from atlasflow.common.errors import InvalidArgument

if TYPE_CHECKING:  # pydicom is imported lazily: `atlasflow convert` may not need it at all
    from pydicom.dataset import Dataset

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
_I16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class Policy:
    """What to do with repairable series (see module doc).

    tilt: "reject" or "resample" (gantry tilt). gaps: "reject" or "fill" (missing slices).
    multiframe: assemble multi-frame (Enhanced CT) instances instead of rejecting them.
    """

    tilt: str = "reject"
    gaps: str = "reject"
    multiframe: bool = False


STRICT = Policy()
REPAIR = Policy(tilt="resample", gaps="fill", multiframe=True)


class FrameSource(Protocol):
    """Decodes one frame's stored values, (rows, columns), sign-corrected, not rescaled."""

    def read(self) -> np.ndarray: ...


@dataclass
class FrameRef:
    """Header facts of one frame (one slice) plus where to decode its pixels.

    ipp: (3,) mm LPS, (0020,0032). iop: (6,) (0020,0037). pixel_spacing: (2,) mm, (row
    spacing, column spacing) as (0028,0030). padding: stored-value range (low, high) from
    (0028,0120)/(0028,0121), or None. frame_number: 1-based within its instance.
    """

    rows: int
    cols: int
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    slope: float
    intercept: float
    source: FrameSource
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uid: str = ""
    frame_number: int = 1
    thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = None
    padding: tuple[float, float] | None = None
    bits_stored: int = 16
    signed: bool = True
    rescale_type: str = ""
    gantry_tilt_deg: float | None = None
    multiframe: bool = False


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

    array: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
    padding_hu: tuple[float, float] | None = None
    resampled: bool = False
    tilt_deg: float = 0.0
    filled_slices: tuple[int, ...] = ()
    source_frames: list[tuple[str, int] | None] = field(default_factory=list)
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    slice_thickness_mm: float | None = None

    def padding_mask(self) -> np.ndarray | None:
        """(X, Y, Z) bool: voxels holding the padding value (outside the scan FOV), or None."""
        if self.padding_hu is None:
            return None
        lo, hi = self.padding_hu
        return (self.array >= lo) & (self.array <= hi)


def _err(reason: str, message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(reason, message, domain=DOMAIN, metadata=metadata)


def _floats(ds: Dataset | None, keyword: str, n: int, index: int) -> np.ndarray:
    value = ds.get(keyword) if ds is not None else None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise _err(
            "INCONSISTENT_SERIES",
            f"slice {index}: {keyword} missing or malformed",
            check="geometry_missing",
            attribute=keyword,
        )
    return arr


def _number(value: object, default: float | None) -> float | None:
    if value in (None, ""):
        return default
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------- datasets -> FrameRefs


class DatasetFrame:
    """`FrameSource` over an in-memory pydicom Dataset (``file_meta.TransferSyntaxUID`` set)."""

    def __init__(self, ds: Dataset, index: int | None) -> None:
        self.ds = ds
        self.index = index

    def read(self) -> np.ndarray:
        from pydicom.pixels import get_decoder

        try:
            ts = self.ds.file_meta.TransferSyntaxUID
            array, _ = get_decoder(ts).as_array(self.ds, index=self.index)
        except Exception as exc:
            raise _err(
                "CORRUPT_DICOM",
                f"pixel data does not decode ({type(exc).__name__})",
                check="pixel_decode",
            ) from None
        return array


def _item(ds: Dataset, sequence: str) -> Dataset | None:
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, top: Dataset, sequence: str, keyword: str) -> object:
    """`keyword` from `sequence` in the per-frame group, else the shared group, else top."""
    for group in (per_frame, shared):
        if group is not None:
            item = _item(group, sequence)
            if item is not None and keyword in item:
                return item.get(keyword)
    return top.get(keyword)


def _padding(ds: Dataset) -> tuple[float, float] | None:
    value = _number(ds.get("PixelPaddingValue"), None)
    if value is None:
        return None
    limit = _number(ds.get("PixelPaddingRangeLimit"), None)
    if limit is None:
        return (value, value)
    return (min(value, limit), max(value, limit))


def is_multiframe(ds: Dataset) -> bool:
    """True for multi-frame or Enhanced / Legacy Converted Enhanced CT instances."""
    frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return frames > 1 or sop in _ENHANCED_CT


def frame_refs(ds: Dataset, source_for: object = None, index: int = 0) -> list[FrameRef]:
    """One `FrameRef` per frame of `ds` (header only; pixels decoded later).

    `source_for(ds, frame_index | None) -> FrameSource` builds the pixel readers (default:
    `DatasetFrame` over `ds` itself). `index`: the instance's position, for messages.
    """
    make = source_for if callable(source_for) else DatasetFrame
    common = dict(
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        padding=_padding(ds),
        bits_stored=int(_number(ds.get("BitsStored"), 16) or 16),
        signed=int(_number(ds.get("PixelRepresentation"), 0) or 0) == 1,
        gantry_tilt_deg=_number(ds.get("GantryDetectorTilt"), None),
        spacing_between_slices_mm=_number(ds.get("SpacingBetweenSlices"), None),
    )
    if not common["sop_instance_uid"] and getattr(ds, "file_meta", None) is not None:
        common["sop_instance_uid"] = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise _err(
            "INCONSISTENT_SERIES", f"slice {index}: Rows/Columns missing", check="geometry_missing", attribute="Rows"
        ) from None
    if not is_multiframe(ds):
        return [
            FrameRef(
                rows=rows,
                cols=cols,
                ipp=_floats(ds, "ImagePositionPatient", 3, index),
                iop=_floats(ds, "ImageOrientationPatient", 6, index),
                pixel_spacing=_floats(ds, "PixelSpacing", 2, index),
                slope=_number(ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept=_number(ds.get("RescaleIntercept"), 0.0) or 0.0,
                thickness_mm=_number(ds.get("SliceThickness"), None),
                rescale_type=str(ds.get("RescaleType", "") or ""),
                source=make(ds, None),
                **common,  # type: ignore[arg-type]
            )
        ]
    n = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    refs = []
    for k in range(n):
        pf = per_frames[k] if k < len(per_frames) else None
        from pydicom.dataset import Dataset

        tmp = Dataset()
        for seq, kw in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            value = _functional(pf, shared, ds, seq, kw)
            if value is not None:
                setattr(tmp, kw, value)
        where = f"{index} frame {k + 1}"
        slope = _functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleIntercept")
        refs.append(
            FrameRef(
                rows=rows,
                cols=cols,
                ipp=_floats(tmp, "ImagePositionPatient", 3, where),  # type: ignore[arg-type]
                iop=_floats(tmp, "ImageOrientationPatient", 6, where),  # type: ignore[arg-type]
                pixel_spacing=_floats(tmp, "PixelSpacing", 2, where),  # type: ignore[arg-type]
                slope=_number(slope, 1.0) or 1.0,
                intercept=_number(intercept, 0.0) or 0.0,
                thickness_mm=_number(_functional(pf, shared, ds, "PixelMeasuresSequence", "SliceThickness"), None),
                rescale_type=str(_functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleType") or ""),
                frame_number=k + 1,
                multiframe=True,
                source=make(ds, k),
                **common,  # type: ignore[arg-type]
            )
        )
    return refs


def assemble_series(datasets: Sequence[Dataset], policy: Policy = STRICT) -> Volume:
    """Build a `Volume` from the CT datasets of one series (any order).

    Each dataset needs ``file_meta.TransferSyntaxUID``. Pixel data is decoded with pydicom's
    decoders, one frame at a time (not cached on the datasets; compressed syntaxes need the
    pylibjpeg plugins). `policy`: `STRICT` (default) or `REPAIR` (see module doc). Raises
    `InvalidArgument` as listed in the module docstring.
    """
    if not datasets:
        raise _err("EMPTY_SERIES", "the series has no instances", check="count")
    if not policy.multiframe and any(is_multiframe(ds) for ds in datasets):
        raise _err(
            "UNSUPPORTED_MULTIFRAME",
            "multi-frame (Enhanced) CT is not assembled under this policy",
            check="multiframe",
        )
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword, "") or "") for ds in datasets}) > 1:
            raise _err("INCONSISTENT_SERIES", f"instances differ in {keyword}", check=keyword)
    frames: list[FrameRef] = []
    for idx, ds in enumerate(datasets):
        frames.extend(frame_refs(ds, index=idx))
    return assemble_frames(frames, policy)


# ---------------------------------------------------------------- geometry


@dataclass
class Plan:
    """Where each sorted input frame goes in the output grid (no pixels).

    order: (N,) input indices sorted along n. slot: (N,) output Z index of each sorted frame.
    shift_px: (N, 2) in-plane offset of each sorted frame's origin, in (column, row) pixels,
    relative to the output grid (0 when no tilt correction). shape: (X, Y, Z) output.
    affine: RAS+ (4, 4). filled: Z indices with no source frame.
    """

    order: np.ndarray
    slot: np.ndarray
    shift_px: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    filled: tuple[int, ...]
    tilt_deg: float
    warnings: list[str]


def _check_consistent(frames: Sequence[FrameRef]) -> None:
    first = frames[0]
    for keyword, attr in (("SeriesInstanceUID", "series_uid"), ("FrameOfReferenceUID", "frame_of_reference_uid")):
        if len({getattr(f, attr) for f in frames}) > 1:
            raise _err("INCONSISTENT_SERIES", f"instances differ in {keyword}", check=keyword)
    for f in frames:
        if (f.rows, f.cols) != (first.rows, first.cols):
            raise _err("INCONSISTENT_SERIES", "instances differ in Rows/Columns", check="size")
        if np.max(np.abs(f.iop - first.iop)) > ORIENTATION_TOL:
            raise _err(
                "INCONSISTENT_SERIES",
                "instances differ in ImageOrientationPatient",
                check="orientation",
            )
        if np.max(np.abs(f.pixel_spacing - first.pixel_spacing)) > SPACING_TOL_MM:
            raise _err("INCONSISTENT_SERIES", "instances differ in PixelSpacing", check="pixel_spacing")
    if np.any(first.pixel_spacing <= 0):
        raise _err("INCONSISTENT_SERIES", "PixelSpacing must be positive", check="pixel_spacing")


def plan_geometry(frames: Sequence[FrameRef], policy: Policy = STRICT) -> Plan:
    """Order frames, check spacing / tilt / gaps under `policy`, and compute the output grid."""
    _check_consistent(frames)
    first = frames[0]
    n = len(frames)
    row_cos, col_cos = first.iop[:3], first.iop[3:]
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise _err(
            "INCONSISTENT_SERIES",
            "ImageOrientationPatient cosines are not orthogonal",
            check="orientation",
        )
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    d_row, d_col = float(first.pixel_spacing[0]), float(first.pixel_spacing[1])

    ipps = np.stack([f.ipp for f in frames])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipps = dist[order], ipps[order]
    warnings: list[str] = []
    first_sorted = frames[int(order[0])]
    thickness = first_sorted.thickness_mm

    shift_mm = np.zeros((n, 2))  # in-plane origin offsets along (r, c), mm
    tilt_deg = 0.0
    if n == 1:
        between = first_sorted.spacing_between_slices_mm
        if between and between > 0:
            spacing, source = between, "(0018,0088) SpacingBetweenSlices"
        elif thickness and thickness > 0:
            spacing, source = thickness, "(0018,0050) SliceThickness"
        else:
            spacing, source = 1.0, "a default"
        warnings.append(f"single slice: slice spacing set to {spacing:g} mm from {source}")
        slot = np.zeros(1, dtype=np.int64)
        z = 1
    else:
        gaps = np.diff(dist)
        if np.min(gaps) < DUPLICATE_TOL_MM:
            raise _err(
                "INCONSISTENT_SERIES",
                "two or more frames share one slice position (a time series, not a volume)",
                check="duplicate_position",
            )
        off = (ipps - ipps[0]) - (dist - dist[0])[:, None] * normal[None, :]
        off_line = np.linalg.norm(off, axis=1)
        if np.any(off_line > TILT_TOL_MM + TILT_TOL_REL * np.abs(dist - dist[0])):
            span = float(dist[-1] - dist[0])
            tilt_deg = float(np.degrees(np.arctan2(float(off_line[-1]), span)))
            tag = first_sorted.gantry_tilt_deg
            tag_note = "" if tag is None else f"; (0018,1120) says {tag:g} deg"
            if policy.tilt != "resample":
                raise _err(
                    "INCONSISTENT_SERIES",
                    f"slice origins leave the slice normal by up to {off_line.max():.2f} mm "
                    f"(gantry tilt ~{tilt_deg:.2f} deg or sheared stack{tag_note}; "
                    "this policy rejects it)",
                    check="gantry_tilt",
                )
            shift_mm = np.stack([off @ row_cos, off @ col_cos], axis=1)
            warnings.append(
                f"gantry tilt {tilt_deg:.2f} deg (from orientation and positions{tag_note}): "
                "slices shifted in plane onto an orthogonal grid (bilinear, HU rounded)"
            )
        median = float(np.median(gaps))
        steps = gaps / median
        whole = np.rint(steps)
        if np.any(np.abs(steps - whole) > GAP_REJECT_REL) or np.any(whole < 1):
            raise _err(
                "INCONSISTENT_SERIES",
                f"slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm around a median of "
                f"{median:.3f} mm (irregular spacing, not a multiple of the median)",
                check="slice_gap",
            )
        if np.any(whole > 1) and policy.gaps != "fill":
            raise _err(
                "INCONSISTENT_SERIES",
                f"slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm around a median of "
                f"{median:.3f} mm (missing or extra slices; this policy rejects it)",
                check="slice_gap",
            )
        slot = np.concatenate([[0], np.cumsum(whole)]).astype(np.int64)
        z = int(slot[-1]) + 1
        spacing = float(dist[-1] - dist[0]) / (z - 1)
        expected = dist[0] + spacing * slot
        deviation = float(np.max(np.abs(dist - expected)))
        if deviation > max(GAP_WARN_MM, GAP_WARN_REL * spacing):
            warnings.append(
                f"non-uniform slice spacing ({gaps.min():.4f}..{gaps.max():.4f} mm): using the "
                f"mean {spacing:.4f} mm; slice positions are off by at most {deviation:.4f} mm"
            )
        if z > n:
            warnings.append(
                f"{z - n} missing slice(s) at {spacing:.4f} mm spacing filled by linear "
                "interpolation between neighbours"
            )
    if thickness and n > 1 and abs(thickness - spacing) > max(GAP_WARN_MM, GAP_WARN_REL * spacing):
        warnings.append(
            f"slice thickness {thickness:g} mm differs from slice spacing {spacing:.4f} mm "
            "(overlapping or gapped reconstruction); the spacing is used"
        )
    if n == 1 and first_sorted.gantry_tilt_deg:
        warnings.append(
            f"(0018,1120) GantryDetectorTilt {first_sorted.gantry_tilt_deg:g} deg on a single slice: nothing to correct"
        )

    # In-plane grid: grows to hold every shifted slice (tilt); aligned with the first slice.
    shift_px = np.stack([shift_mm[:, 0] / d_col, shift_mm[:, 1] / d_row], axis=1)
    lo = np.floor(np.minimum(shift_px.min(axis=0), 0.0) + 1e-6)
    hi = np.ceil(np.maximum(shift_px.max(axis=0), 0.0) - 1e-6)
    nx = first.cols + int(hi[0] - lo[0])
    ny = first.rows + int(hi[1] - lo[1])
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col  # i: along a row = column index, step = column spacing
    lps[:3, 1] = col_cos * d_row  # j: down a column = row index, step = row spacing
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = ipps[0] + lo[0] * d_col * row_cos + lo[1] * d_row * col_cos
    filled = tuple(sorted(set(range(z)) - {int(s) for s in slot}))
    return Plan(
        order=order,
        slot=slot,
        shift_px=shift_px - lo[None, :],
        shape=(nx, ny, z),
        affine=_LPS_TO_RAS @ lps,
        filled=filled,
        tilt_deg=tilt_deg,
        warnings=warnings,
    )


# ---------------------------------------------------------------- pixels


def _covered(shift: np.ndarray, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Output rows [y0, y1) and columns [x0, x1) whose bilinear support lies inside a source
    plane of `rows` x `cols` placed at (column, row) offset `shift` (pixels)."""
    eps = 1e-6
    x0, y0 = (int(np.ceil(v - eps)) for v in shift)
    x1 = int(np.floor(shift[0] + cols - 1 + eps)) + 1
    y1 = int(np.floor(shift[1] + rows - 1 + eps)) + 1
    return y0, y1, x0, x1


def _shift_bilinear(src: np.ndarray, shift: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
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


def _hu_dtype(frames: Sequence[FrameRef]) -> tuple[np.dtype, bool]:
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    return (np.dtype(np.int16) if integral else np.dtype(np.float32)), integral


def assemble_frames(frames: Sequence[FrameRef], policy: Policy = STRICT) -> Volume:
    """Assemble frames of one series (any order) into a `Volume` under `policy`.

    Memory: one output array (X, Y, Z) allocated up front, filled one decoded frame at a time.
    """
    if not frames:
        raise _err("EMPTY_SERIES", "the series has no instances", check="count")
    if not policy.multiframe and any(f.multiframe for f in frames):
        raise _err(
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
            raise _err(
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
    for z in plan.filled:
        lo = max(k for k in range(z) if source_frames[k] is not None)
        hi = min(k for k in range(z + 1, nz) if source_frames[k] is not None)
        w = (z - lo) / (hi - lo)
        value = (1 - w) * stack[lo].astype(np.float64) + w * stack[hi].astype(np.float64)
        stack[z] = np.rint(value) if integral else value
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


def _widen(stack: np.ndarray, warnings: list[str]) -> np.ndarray:
    """int16 -> int32 copy (the only second volume-sized buffer; rare), with a warning."""
    warnings.append("HU range exceeds int16: array kept as int32")
    return stack.astype(np.int32)


def _store(stack: np.ndarray, z: int, hu: np.ndarray, warnings: list[str]) -> np.ndarray:
    """stack[z] = hu (integral values), widening int16 -> int32 when `hu` does not fit."""
    if stack.dtype == np.int16 and (float(hu.min()) < _I16.min or float(hu.max()) > _I16.max):
        stack = _widen(stack, warnings)
    stack[z] = hu
    return stack


def _store_integral(
    stack: np.ndarray, z: int, pixels: np.ndarray, slope: int, intercept: int, warnings: list[str]
) -> np.ndarray:
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
        # computed in a type that holds the result (numpy value-based casting), then cast
        np.add(
            pixels,
            np.int32(intercept) if pixels.dtype.kind == "u" and intercept < 0 else intercept,
            out=target,
            casting="unsafe",
        )
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
