"""Anatomical plausibility of organ masks against the population prior: the findings (code,
human-readable reason, penalty, region) of each organ, and the per-organ score, reasons and
pointer that the segmentation worker derives from its native-grid outputs (`organ_findings`).

Conventions: label maps / masks are ``(X, Y, Z)`` voxel arrays; ``affine`` is the 4x4 voxel ->
RAS+ mm matrix (`atlasflow.method.geometry`). Volumes in ml, positions in mm.

Checks (each yields a `Finding` with a human-readable reason and a penalty in ml-equivalents):
- cut by the field of view: the organ touches the first or last slice. Reported, never an
  error, no penalty; its volume and its S position are not compared with the population.
- volume: ``ln(volume_ml)`` z-score against the prior (|z| > `Z_VOLUME`);
- position: per RAS axis, the median over the other organs j of
  ``(c_k - c_j - mean offset_kj) / std offset_kj``; flagged when the largest |median| > `Z_POSITION`;
- components: more than one 26-connected component (the extra ones' volume);
- kidneys: left/right swapped by centroid x, or volume ratio z-score > `Z_VOLUME`;
- slice-area outliers: an axial slice whose organ area leaves the rolling mean +- 2 std of its
  neighbours (window `SLICE_WINDOW`, the reference's lung check applied to every organ);
- overlap with other organs' masks (ml), when masks may overlap (ensemble masks, not a label map).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.method.geometry import OrganGeometry, measure_labels
from atlasflow.method.masks import Box, bounding_box, grow_box, offset_box, relative_box
from atlasflow.method.prior import PopulationPrior

#: RAS+ world: the patient's left organs lie at smaller x than their right counterparts.
LEFT_IS_NEGATIVE_X = True
Z_VOLUME = 2.5
Z_POSITION = 3.0
SLICE_WINDOW = 5
MIN_EXTRA_ML = 0.5
PENALTY_PER_Z_ML = 20.0  # ml-equivalent per unit of z beyond the threshold (capped at 5 units)
SWAP_PENALTY_ML = 150.0


@dataclass
class Finding:
    """One plausibility finding. ``region``: where it points: "organ" (the whole mask),
    "slices" (``slices``, voxel indices along the slice axis), "extra" (dropped components) or
    "" (nothing to point at). ``penalty_ml``: ml-equivalent added to the organ's score."""

    organ: int
    code: str
    reason: str
    penalty_ml: float = 0.0
    region: str = ""
    slices: list[int] = field(default_factory=list)


def _excess(z: float, limit: float) -> float:
    return min(max(abs(z) - limit, 0.0), 5.0)


def slice_area_outliers(mask: npt.NDArray[np.bool_], axis: int, window: int = SLICE_WINDOW) -> list[int]:
    """Indices (within the crop) of slices whose area leaves the rolling mean +- 2 std of the
    ``window`` slices around it (itself excluded), ignoring the tapering ends (slices whose
    window leaves the organ) and small deviations (< 25 % of the local mean)."""
    areas = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(axis=1).astype(np.float64)
    half = window // 2
    out = []
    for z in range(half, len(areas) - half):
        nb = np.concatenate([areas[z - half : z], areas[z + 1 : z + half + 1]])
        if nb.min() <= 0:
            continue
        m, s = nb.mean(), nb.std()
        if abs(areas[z] - m) > 2 * s and abs(areas[z] - m) > 0.25 * m:
            out.append(z)
    return out


def assess(
    geoms: Mapping[int, OrganGeometry],
    prior: PopulationPrior,
    overlaps_ml: Mapping[int, Mapping[int, float]] | None = None,
) -> dict[int, list[Finding]]:
    """Plausibility findings per organ (see module doc). ``overlaps_ml[k][j]``: ml of organ k's
    mask that organ j's mask also covers."""
    out: dict[int, list[Finding]] = {k: [] for k in geoms}
    for k, g in geoms.items():
        name = ORGANS[k]
        f = out[k]
        if g.fov_cut:
            f.append(Finding(k, "FOV_CUT", f"{name}: cut by FOV"))
        else:
            z = prior.volume_z(k, g.volume_ml)
            if z is not None and abs(z) > Z_VOLUME:
                med = prior.median_volume_ml(k) or 0.0
                f.append(
                    Finding(
                        k,
                        "VOLUME",
                        f"{name}: volume {g.volume_ml:.0f} ml, z {z:+.1f} vs population median {med:.0f} ml",
                        PENALTY_PER_Z_ML * _excess(z, Z_VOLUME) + 10.0,
                        "organ",
                    )
                )
        if g.components > 1 and g.extra_ml >= MIN_EXTRA_ML:
            f.append(
                Finding(
                    k,
                    "COMPONENTS",
                    f"{name}: {g.components} components ({g.extra_ml:.1f} ml outside the largest)",
                    g.extra_ml + 5.0,
                    "extra",
                )
            )
        elif g.components > 1 and g.extra is None:
            f.append(Finding(k, "COMPONENTS", f"{name}: {g.components} components", 5.0, "organ"))
        # position against the other organs
        per_axis: list[list[float]] = [[], [], []]
        for j, h in geoms.items():
            runs = prior.offset.get((k, j))
            if j == k or runs is None:
                continue
            for a in range(3):
                if runs[a].n < 2 or (a == 2 and (g.fov_cut or h.fov_cut)):
                    continue
                d = float(g.centroid_mm[a] - h.centroid_mm[a])
                per_axis[a].append((d - runs[a].mean) / runs[a].std(prior.offset_floor_mm))
        zs = [float(np.median(v)) if len(v) >= 2 else 0.0 for v in per_axis]
        a_max = int(np.argmax(np.abs(zs)))
        if abs(zs[a_max]) > Z_POSITION:
            f.append(
                Finding(
                    k,
                    "POSITION",
                    f"{name}: centroid off along {'RAS'[a_max]} (z {zs[a_max]:+.1f} vs the other organs)",
                    PENALTY_PER_Z_ML * _excess(zs[a_max], Z_POSITION) + 10.0,
                    "organ",
                )
            )
        outl = slice_area_outliers(g.mask, g.slice_axis)
        if outl:
            ml = float(np.moveaxis(g.mask, g.slice_axis, 0)[outl].sum()) * g.voxel_ml
            first = g.box[g.slice_axis].start
            f.append(
                Finding(
                    k,
                    "SLICE_AREA",
                    f"{name}: slice-area outliers on {len(outl)} slices ({ml:.1f} ml)",
                    ml,
                    "slices",
                    [first + z for z in outl],
                )
            )
        if overlaps_ml and overlaps_ml.get(k):
            for j, ml in sorted(overlaps_ml[k].items()):
                if ml >= MIN_EXTRA_ML:
                    f.append(Finding(k, "OVERLAP", f"{name}: overlaps {ORGANS[j]} {ml:.1f} ml", ml, ""))
    kl, kr = ORGAN_IDS["kidney_left"], ORGAN_IDS["kidney_right"]
    if kl in geoms and kr in geoms:
        gl, gr = geoms[kl], geoms[kr]
        swapped = gl.centroid_mm[0] > gr.centroid_mm[0] if LEFT_IS_NEGATIVE_X else gl.centroid_mm[0] < gr.centroid_mm[0]
        if swapped:
            for k in (kl, kr):
                out[k].append(
                    Finding(
                        k,
                        "SIDE_SWAP",
                        f"{ORGANS[k]}: left/right kidneys swapped (centroid x)",
                        SWAP_PENALTY_ML,
                        "organ",
                    )
                )
        elif not (gl.fov_cut or gr.fov_cut) and prior.kidney_log_ratio.n >= 2:
            r = prior.kidney_log_ratio
            z = (math.log(gl.volume_ml / gr.volume_ml) - r.mean) / r.std(prior.log_volume_floor)
            if abs(z) > Z_VOLUME:
                k = kl if z < 0 else kr  # the smaller kidney is the suspect
                out[k].append(
                    Finding(
                        k,
                        "KIDNEY_RATIO",
                        f"{ORGANS[k]}: left/right volume ratio {gl.volume_ml / gr.volume_ml:.2f} (z {z:+.1f})",
                        PENALTY_PER_Z_ML * _excess(z, Z_VOLUME) + 10.0,
                        "organ",
                    )
                )
    return out


def finding_region(g: OrganGeometry, findings: Iterable[Finding]) -> npt.NDArray[np.bool_]:
    """Bool crop on ``g.box``: the voxels the findings point at (whole organ, outlier slices,
    dropped components)."""
    region = np.zeros(g.mask.shape, dtype=bool)
    for f in findings:
        if f.region == "organ":
            region |= g.mask
        elif f.region == "extra" and g.extra is not None:
            region |= g.extra
        elif f.region == "slices":
            view = np.moveaxis(region, g.slice_axis, 0)
            mview = np.moveaxis(g.mask, g.slice_axis, 0)
            for s in f.slices:
                z = s - g.box[g.slice_axis].start
                view[z] |= mview[z]
    return region


# ----------------------------------------------------------------------------- what the worklist shows


def pointer(box: Box, affine: npt.ArrayLike, slice_axis: int = 2) -> dict[str, dict[str, float | int]]:
    """Pointer to a voxel box (slices, half-open): the ranking proto's ``AttentionPointer`` as a
    dict (``voxel_box`` inclusive indices, ``world_box`` RAS mm over the box's voxel centres,
    ``slices`` along ``slice_axis``)."""
    lo = [s.start for s in box]
    hi = [s.stop - 1 for s in box]
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (np.asarray(affine, dtype=np.float64) @ corners.T)[:3]
    wmin, wmax = world.min(axis=1), world.max(axis=1)
    return {
        "voxel_box": {"x_min": lo[0], "y_min": lo[1], "z_min": lo[2], "x_max": hi[0], "y_max": hi[1], "z_max": hi[2]},
        "world_box": {
            "x_min_mm": float(wmin[0]),
            "y_min_mm": float(wmin[1]),
            "z_min_mm": float(wmin[2]),
            "x_max_mm": float(wmax[0]),
            "y_max_mm": float(wmax[1]),
            "z_max_mm": float(wmax[2]),
        },
        "slices": {"first": lo[slice_axis], "last": hi[slice_axis]},
    }


@dataclass
class OrganFinding:
    """What the worklist shows for one organ (fields of the ranking proto's ``OrganAttention``).

    ``score``: ml-equivalent priority (attention ml + plausibility penalties); ``reasons``:
    human-readable; ``pointer``: `pointer` dict of the attention + finding region, or None."""

    organ: int
    score: float
    reasons: list[str]
    pointer: dict[str, dict[str, float | int]] | None
    attention_ml: float = 0.0
    heatmap_ml: float = 0.0
    volume_ml: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ORGANS[self.organ]


def organ_findings(
    labels: npt.ArrayLike,
    heatmap: npt.ArrayLike,
    affine: npt.ArrayLike,
    prior: PopulationPrior | None = None,
    labelled_organs: Iterable[int] = (),
    *,
    margin: int = 3,
    exact_ml: Mapping[int, tuple[float, float]] | None = None,
) -> list[OrganFinding]:
    """Per-organ score, reasons and pointer from the segmentation service's native-grid outputs.

    ``labels``: ``(X, Y, Z)`` uint8 AbdomenAtlas ids (final ensemble labels); ``heatmap``:
    ``(X, Y, Z)`` uint8 0..255 (max over organs of the per-organ heatmaps); ``affine``: voxel ->
    RAS mm; ``prior``: population statistics (default: the bundled prior); ``labelled_organs``:
    ids the source labels (skipped). A heatmap voxel counts for organ k when it lies in k's
    bounding box grown by ``margin`` voxels (the per-organ maps are not in the output), unless
    ``exact_ml`` gives organ k's (attention_ml, heatmap_ml) as computed next to the
    probabilities (the Triton pipeline's statistics): then those are reported and scored. Returns
    one `OrganFinding` per present, unlabelled organ, by decreasing score. CPU, numpy + scipy.
    """
    prior = prior or PopulationPrior.load()
    affine = np.asarray(affine, dtype=np.float64)
    labels = np.asarray(labels)
    heat = np.asarray(heatmap)
    skip = {int(k) for k in labelled_organs}
    geoms = measure_labels(labels, affine)
    found = assess(geoms, prior)
    out: list[OrganFinding] = []
    for k, g in geoms.items():
        if k in skip:
            continue
        grown = grow_box(g.box, margin, labels.shape)
        h = heat[grown]
        att = h > 0
        att_ml = float(att.sum()) * g.voxel_ml
        heat_ml = float(h.sum(dtype=np.float64)) / 255.0 * g.voxel_ml
        if exact_ml is not None and k in exact_ml:
            att_ml, heat_ml = (float(v) for v in exact_ml[k])
        fs = found.get(k, [])
        region = np.zeros(att.shape, dtype=bool)
        inner = relative_box(g.box, grown)
        region[inner] = finding_region(g, fs)
        region |= att
        reasons = []
        if att_ml > 0:
            reasons.append(f"{ORGANS[k]}: attention {att_ml:.1f} ml (heatmap {heat_ml:.1f} ml)")
        reasons += [f.reason for f in fs]
        box = bounding_box(region)
        ptr = None
        if box is not None:
            ptr = pointer(
                offset_box(box, grown),
                affine,
                g.slice_axis,
            )
        score = heat_ml + sum(f.penalty_ml for f in fs)
        out.append(OrganFinding(k, score, reasons[:32], ptr, att_ml, heat_ml, g.volume_ml, fs))
    out.sort(key=lambda o: -o.score)
    return out
