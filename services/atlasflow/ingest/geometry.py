"""The geometry of a CT series (no pixels): order the frames along the slice normal, check
orientation / spacing / tilt / gaps under a `Policy`, and plan the output grid (`plan_geometry`).

The rules, tolerances and errors are documented in `atlasflow.ingest.assemble`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from atlasflow.ingest.frames import FrameRef, series_error

if TYPE_CHECKING:  # pydicom is imported lazily: `atlasflow convert` may not need it at all
    pass


ORIENTATION_TOL = 1e-4  # per direction-cosine component
SPACING_TOL_MM = 1e-4  # in-plane pixel spacing
DUPLICATE_TOL_MM = 0.01  # along the normal
TILT_TOL_MM = 0.05  # + TILT_TOL_REL * distance from the first slice
TILT_TOL_REL = 0.002
GAP_REJECT_REL = 0.25  # gap vs median gap
GAP_WARN_MM = 0.01
GAP_WARN_REL = 0.001
#: Largest output volume assembled, voxels (X * Y * Z): 2**30 is 2 GiB of int16 (a 512 x 512
#: series of 4096 slices). Checked from the headers before any array is allocated, so a
#: crafted gap, shift or size never asks for more (VOLUME_TOO_LARGE, check ``voxels``).
MAX_SERIES_VOXELS = 1 << 30
#: NIfTI-1 stores each dimension as int16: no axis may exceed this (check ``nifti_dim``).
MAX_NIFTI_DIM = 32767
#: Plausibility bounds of the geometry (check ``geometry_range``): positions within 10 m of
#: the scanner origin, pixel spacing (and a single slice's spacing) within [0.001, 1000] mm. Beyond them the affine would not
#: survive float32 (NIfTI) and no CT is that large.
MAX_POSITION_MM = 1e4
MAX_PIXEL_SPACING_MM = 1e3
#: CT gantries tilt up to ~30 deg; a stack sheared further is not a tilted acquisition (and its
#: tilt-corrected grid would grow without bound): rejected under every policy.
MAX_TILT_DEG = 45.0
MIN_PIXEL_SPACING_MM = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Policy:
    """What to do with repairable series (see module doc).

    tilt: "reject" or "resample" (gantry tilt). gaps: "reject" or "fill" (missing slices).
    multiframe: assemble multi-frame (Enhanced CT) instances instead of rejecting them.
    max_voxels: the largest output volume (X * Y * Z), checked before allocating.
    """

    tilt: str = "reject"
    gaps: str = "reject"
    multiframe: bool = False
    max_voxels: int = MAX_SERIES_VOXELS


STRICT = Policy()
REPAIR = Policy(tilt="resample", gaps="fill", multiframe=True)


@dataclass
class Plan:
    """Where each sorted input frame goes in the output grid (no pixels).

    order: (N,) input indices sorted along n. slot: (N,) output Z index of each sorted frame.
    shift_px: (N, 2) in-plane offset of each sorted frame's origin, in (column, row) pixels,
    relative to the output grid (0 when no tilt correction). shape: (X, Y, Z) output.
    affine: RAS+ (4, 4). filled: Z indices with no source frame.
    """

    order: npt.NDArray[np.intp]
    slot: npt.NDArray[np.intp]
    shift_px: npt.NDArray[np.float64]
    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]
    filled: tuple[int, ...]
    tilt_deg: float
    warnings: list[str]


def _check_consistent(frames: Sequence[FrameRef]) -> None:
    first = frames[0]
    for keyword, attr in (("SeriesInstanceUID", "series_uid"), ("FrameOfReferenceUID", "frame_of_reference_uid")):
        if len({getattr(f, attr) for f in frames}) > 1:
            raise series_error("INCONSISTENT_SERIES", f"instances differ in {keyword}", check=keyword)
    for f in frames:
        if (f.rows, f.cols) != (first.rows, first.cols):
            raise series_error("INCONSISTENT_SERIES", "instances differ in Rows/Columns", check="size")
        if np.max(np.abs(f.iop - first.iop)) > ORIENTATION_TOL:
            raise series_error(
                "INCONSISTENT_SERIES",
                "instances differ in ImageOrientationPatient",
                check="orientation",
            )
        if np.max(np.abs(f.pixel_spacing - first.pixel_spacing)) > SPACING_TOL_MM:
            raise series_error("INCONSISTENT_SERIES", "instances differ in PixelSpacing", check="pixel_spacing")
    if np.any(first.pixel_spacing <= 0):
        raise series_error("INCONSISTENT_SERIES", "PixelSpacing must be positive", check="pixel_spacing")
    if (
        np.any(first.pixel_spacing > MAX_PIXEL_SPACING_MM)
        or np.any(first.pixel_spacing < MIN_PIXEL_SPACING_MM)
        or any(np.max(np.abs(f.ipp)) > MAX_POSITION_MM for f in frames)
    ):
        raise series_error(
            "INCONSISTENT_SERIES",
            f"ImagePositionPatient beyond {MAX_POSITION_MM:g} mm or PixelSpacing outside "
            f"{MIN_PIXEL_SPACING_MM:g}..{MAX_PIXEL_SPACING_MM:g} mm",
            check="geometry_range",
        )


def _check_size(nx: float, ny: float, nz: float, policy: Policy) -> None:
    """VOLUME_TOO_LARGE before anything volume-sized is allocated (`nz` may be a float: the
    slice count implied by the gaps, computed before it is turned into an index)."""
    if max(nx, ny, nz) > MAX_NIFTI_DIM:
        raise series_error(
            "VOLUME_TOO_LARGE",
            f"the volume would be {nx:.0f} x {ny:.0f} x {nz:.0f} voxels: NIfTI-1 allows at most {MAX_NIFTI_DIM} per axis",
            check="nifti_dim",
            limit=str(MAX_NIFTI_DIM),
        )
    if float(nx) * ny * nz > policy.max_voxels:
        raise series_error(
            "VOLUME_TOO_LARGE",
            f"the volume would be {nx:.0f} x {ny:.0f} x {nz:.0f} voxels, over the limit of {policy.max_voxels}",
            check="voxels",
            limit=str(policy.max_voxels),
        )


def plan_geometry(frames: Sequence[FrameRef], policy: Policy = STRICT) -> Plan:
    """Order frames, check spacing / tilt / gaps under `policy`, and compute the output grid."""
    _check_consistent(frames)
    first = frames[0]
    n = len(frames)
    row_cos, col_cos = first.iop[:3], first.iop[3:]
    if not all(0.5 < float(np.linalg.norm(v)) < 2.0 for v in (row_cos, col_cos)):
        raise series_error(
            "INCONSISTENT_SERIES", "ImageOrientationPatient cosines are not unit vectors", check="orientation"
        )
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise series_error(
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
        if between and MIN_PIXEL_SPACING_MM <= between <= MAX_PIXEL_SPACING_MM:
            spacing, source = between, "(0018,0088) SpacingBetweenSlices"
        elif thickness and MIN_PIXEL_SPACING_MM <= thickness <= MAX_PIXEL_SPACING_MM:
            spacing, source = thickness, "(0018,0050) SliceThickness"
        else:
            spacing, source = 1.0, "a default"
        warnings.append(f"single slice: slice spacing set to {spacing:g} mm from {source}")
        slot = np.zeros(1, dtype=np.int64)
        z = 1
    else:
        gaps = np.diff(dist)
        if np.min(gaps) < DUPLICATE_TOL_MM:
            raise series_error(
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
            if tilt_deg > MAX_TILT_DEG or not np.isfinite(tilt_deg):
                raise series_error(
                    "INCONSISTENT_SERIES",
                    f"slice origins leave the slice normal at ~{tilt_deg:.0f} deg: beyond any gantry tilt "
                    f"({MAX_TILT_DEG:g} deg), not a volume",
                    check="gantry_tilt",
                )
            if policy.tilt != "resample":
                raise series_error(
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
            raise series_error(
                "INCONSISTENT_SERIES",
                f"slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm around a median of "
                f"{median:.3f} mm (irregular spacing, not a multiple of the median)",
                check="slice_gap",
            )
        if np.any(whole > 1) and policy.gaps != "fill":
            raise series_error(
                "INCONSISTENT_SERIES",
                f"slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm around a median of "
                f"{median:.3f} mm (missing or extra slices; this policy rejects it)",
                check="slice_gap",
            )
        # the slice count the gaps imply, checked (as a float) before it becomes an index
        _check_size(first.cols, first.rows, float(np.sum(whole)) + 1, policy)
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
    _check_size(first.cols + float(hi[0] - lo[0]), first.rows + float(hi[1] - lo[1]), z, policy)
    nx = first.cols + int(hi[0] - lo[0])
    ny = first.rows + int(hi[1] - lo[1])
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col  # i: along a row = column index, step = column spacing
    lps[:3, 1] = col_cos * d_row  # j: down a column = row index, step = row spacing
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = ipps[0] + lo[0] * d_col * row_cos + lo[1] * d_row * col_cos
    present = np.zeros(z, dtype=bool)
    present[slot] = True
    filled = tuple(int(k) for k in np.flatnonzero(~present))
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
