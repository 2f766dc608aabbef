"""Anatomical plausibility of organ masks against population statistics, and the per-organ
findings (score, reasons, pointer) that the ranking worklist shows.

Lives in ``common`` because both the segmentation worker (which computes the findings next to
the heatmap it produced, `organ_findings`) and the ranking tools (`atlasflow rank`) call it.

Conventions: label maps / masks are ``(X, Y, Z)`` voxel arrays; ``affine`` is the 4x4 voxel ->
RAS+ mm matrix (nibabel convention: +x toward the patient's Right, +y Anterior, +z Superior, so
left-sided organs have the smaller x; verified on the bundled labels: spleen and left kidney at
x < 0, liver at x > 0). Volumes in ml, positions in mm. The "slice axis" is the voxel axis closest to S (superior).

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

The enhanced attention (`suspect_regions`, used by `rank_case`): compact regions where the
outvoted models are surer than the winners (each model judged against its own boundary
profile), or where all models agree but doubt more than the organ's own boundary profile
explains, plus the swapped kidneys; tuned on the error simulator's seeds 0-99 and forced-kind
variants of 0-49 (benchmarks/bench_error_detection.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from atlasflow.common.attention import binary_dilation, binary_opening
from atlasflow.common.organs import ORGAN_IDS, ORGANS

PRIOR_PATH = Path(__file__).with_name("plausibility_prior.json")
#: RAS+ world: the patient's left organs lie at smaller x than their right counterparts.
LEFT_IS_NEGATIVE_X = True
Z_VOLUME = 2.5
Z_POSITION = 3.0
SLICE_WINDOW = 5
MIN_EXTRA_ML = 0.5
PENALTY_PER_Z_ML = 20.0  # ml-equivalent per unit of z beyond the threshold (capped at 5 units)
SWAP_PENALTY_ML = 150.0
_CUBE = np.ones((3, 3, 3), dtype=bool)
Box = tuple[slice, slice, slice]


# ----------------------------------------------------------------------------- population prior


@dataclass
class Running:
    """Running mean / variance (Welford): ``n``, ``mean``, ``m2``."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def std(self, floor: float) -> float:
        var = self.m2 / (self.n - 1) if self.n > 1 else 0.0
        return max(math.sqrt(max(var, 0.0)), floor)

    def to_list(self) -> list[float]:
        return [self.n, round(self.mean, 6), round(self.m2, 6)]

    @classmethod
    def from_list(cls, v: list[float]) -> Running:
        return cls(int(v[0]), float(v[1]), float(v[2]))


@dataclass
class PopulationPrior:
    """Population statistics of organ geometry, updatable case by case.

    ``log_volume[k]``: ln(ml) of organ k (organs not cut by the FOV only);
    ``offset[(k, j)][a]``: centroid_k - centroid_j along RAS axis a, mm (S only when neither is cut);
    ``kidney_log_ratio``: ln(V_left / V_right) (neither cut). Standard deviations have floors
    (`log_volume_floor`, `offset_floor_mm`) so that a thin prior never claims certainty.
    """

    log_volume: dict[int, Running] = field(default_factory=dict)
    offset: dict[tuple[int, int], list[Running]] = field(default_factory=dict)
    kidney_log_ratio: Running = field(default_factory=Running)
    cases: int = 0
    log_volume_floor: float = 0.25
    offset_floor_mm: float = 15.0
    notes: str = ""

    # -- updates
    def update(self, geoms: Mapping[int, OrganGeometry]) -> None:
        """Add one case's organ geometry (from `measure_labels` / `measure_masks`)."""
        self.cases += 1
        for k, g in geoms.items():
            if g.volume_ml <= 0:
                continue
            if not g.fov_cut:
                self.log_volume.setdefault(k, Running()).add(math.log(g.volume_ml))
            for j, h in geoms.items():
                if j == k or h.volume_ml <= 0:
                    continue
                runs = self.offset.setdefault((k, j), [Running(), Running(), Running()])
                for a in range(3):
                    if a == 2 and (g.fov_cut or h.fov_cut):
                        continue
                    runs[a].add(float(g.centroid_mm[a] - h.centroid_mm[a]))
        left, right = geoms.get(ORGAN_IDS["kidney_left"]), geoms.get(ORGAN_IDS["kidney_right"])
        if left and right and left.volume_ml > 0 and right.volume_ml > 0 and not (left.fov_cut or right.fov_cut):
            self.kidney_log_ratio.add(math.log(left.volume_ml / right.volume_ml))

    def update_from_labels(self, labels: np.ndarray, affine: np.ndarray) -> None:
        """Add one stored label map (``(X, Y, Z)`` AbdomenAtlas ids 0..9, voxel -> RAS mm)."""
        self.update(measure_labels(labels, affine))

    # -- queries
    def volume_z(self, k: int, volume_ml: float) -> float | None:
        r = self.log_volume.get(k)
        if r is None or r.n < 2 or volume_ml <= 0:
            return None
        return (math.log(volume_ml) - r.mean) / r.std(self.log_volume_floor)

    def median_volume_ml(self, k: int) -> float | None:
        r = self.log_volume.get(k)
        return None if r is None or r.n < 2 else math.exp(r.mean)

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "atlasflow.plausibility_prior/1",
            "cases": self.cases,
            "notes": self.notes,
            "log_volume_floor": self.log_volume_floor,
            "offset_floor_mm": self.offset_floor_mm,
            "log_volume": {ORGANS[k]: r.to_list() for k, r in sorted(self.log_volume.items())},
            "offset": {
                f"{ORGANS[k]}-{ORGANS[j]}": [r.to_list() for r in runs] for (k, j), runs in sorted(self.offset.items())
            },
            "kidney_log_ratio": self.kidney_log_ratio.to_list(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PopulationPrior:
        p = cls(
            cases=int(d.get("cases", 0)),
            notes=str(d.get("notes", "")),
            log_volume_floor=float(d.get("log_volume_floor", 0.25)),
            offset_floor_mm=float(d.get("offset_floor_mm", 15.0)),
        )
        p.log_volume = {ORGAN_IDS[n]: Running.from_list(v) for n, v in d.get("log_volume", {}).items()}
        for key, runs in d.get("offset", {}).items():
            a, b = key.split("-")
            p.offset[(ORGAN_IDS[a], ORGAN_IDS[b])] = [Running.from_list(v) for v in runs]
        p.kidney_log_ratio = Running.from_list(d.get("kidney_log_ratio", [0, 0.0, 0.0]))
        return p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> PopulationPrior:
        """The prior at ``path``, or the bundled one (`PRIOR_PATH`)."""
        return cls.from_dict(json.loads(Path(path or PRIOR_PATH).read_text()))


# ----------------------------------------------------------------------------- geometry


@dataclass
class OrganGeometry:
    """Measured geometry of one organ mask.

    ``box``: voxel bounding box; ``mask``: bool crop on ``box``; ``centroid_mm``: RAS mm;
    ``slice_axis``: the voxel axis closest to S; ``fov_cut``: touches the first or last slice;
    ``components``: 26-connected components (of ``mask`` plus ``extra``); ``extra``: optional
    bool crop on ``box`` of components dropped from the label (raw ensemble vote)."""

    organ: int
    box: Box
    mask: np.ndarray
    voxel_ml: float
    volume_ml: float
    centroid_mm: np.ndarray
    slice_axis: int
    fov_cut: bool
    components: int
    extra_ml: float = 0.0
    extra: np.ndarray | None = None


def slice_axis_of(affine: np.ndarray) -> int:
    """The voxel axis whose direction is closest to S (RAS z)."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def _geometry(
    k: int, box: Box, mask: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], extra: np.ndarray | None = None
) -> OrganGeometry | None:
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    centre_vox = np.array([idx[a].mean() + box[a].start for a in range(3)])
    centroid = affine[:3, :3] @ centre_vox + affine[:3, 3]
    ax = slice_axis_of(affine)
    lo = box[ax].start + int(idx[ax].min())
    hi = box[ax].start + int(idx[ax].max())
    fov_cut = lo == 0 or hi == shape[ax] - 1
    full = mask | extra if extra is not None else mask
    n = int(ndimage.label(full, structure=_CUBE)[1])
    extra_ml = float(extra.sum()) * voxel_ml if extra is not None else 0.0
    return OrganGeometry(
        k, box, mask, voxel_ml, float(idx[0].size) * voxel_ml, centroid, ax, fov_cut, n, extra_ml, extra
    )


def measure_labels(labels: np.ndarray, affine: np.ndarray) -> dict[int, OrganGeometry]:
    """Geometry of every organ in an AbdomenAtlas label map ``(X, Y, Z)`` (ids 1..9)."""
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    out: dict[int, OrganGeometry] = {}
    objs = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=len(ORGANS))
    for i, box in enumerate(objs):
        if box is None:
            continue
        k = i + 1
        g = _geometry(k, box, labels[box] == k, affine, labels.shape)
        if g is not None:
            out[k] = g
    return out


def measure_masks(
    masks: Mapping[int, tuple[Box, np.ndarray]],
    affine: np.ndarray,
    shape: tuple[int, ...],
    extras: Mapping[int, np.ndarray] | None = None,
) -> dict[int, OrganGeometry]:
    """Geometry from per-organ bool crops ``{organ: (box, crop)}`` (e.g. ensemble masks), with
    optional dropped components ``extras[organ]`` (bool, same box)."""
    affine = np.asarray(affine, dtype=np.float64)
    out: dict[int, OrganGeometry] = {}
    for k, (box, crop) in masks.items():
        g = _geometry(k, box, np.asarray(crop, dtype=bool), affine, shape, None if extras is None else extras.get(k))
        if g is not None:
            out[k] = g
    return out


# ----------------------------------------------------------------------------- findings


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


def slice_area_outliers(mask: np.ndarray, axis: int, window: int = SLICE_WINDOW) -> list[int]:
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


def finding_region(g: OrganGeometry, findings: Iterable[Finding]) -> np.ndarray:
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


# ----------------------------------------------------------------------------- pointers


def pointer(box: Box, affine: np.ndarray, slice_axis: int = 2) -> dict[str, dict[str, float | int]]:
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


def _box_of(mask: np.ndarray) -> Box | None:
    objs = ndimage.find_objects(mask.astype(np.uint8))
    return objs[0] if objs else None


def organ_findings(
    labels: np.ndarray,
    heatmap: np.ndarray,
    affine: np.ndarray,
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
        grown = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(g.box, labels.shape))
        h = heat[grown]
        att = h > 0
        att_ml = float(att.sum()) * g.voxel_ml
        heat_ml = float(h.sum(dtype=np.float64)) / 255.0 * g.voxel_ml
        if exact_ml is not None and k in exact_ml:
            att_ml, heat_ml = (float(v) for v in exact_ml[k])
        fs = found.get(k, [])
        region = np.zeros(att.shape, dtype=bool)
        inner = tuple(slice(b.start - gb.start, b.stop - gb.start) for b, gb in zip(g.box, grown))
        region[inner] = finding_region(g, fs)
        region |= att
        reasons = []
        if att_ml > 0:
            reasons.append(f"{ORGANS[k]}: attention {att_ml:.1f} ml (heatmap {heat_ml:.1f} ml)")
        reasons += [f.reason for f in fs]
        box = _box_of(region)
        ptr = None
        if box is not None:
            ptr = pointer(
                tuple(slice(b.start + gb.start, b.stop + gb.start) for b, gb in zip(box, grown)),  # type: ignore[arg-type]
                affine,
                g.slice_axis,
            )
        score = heat_ml + sum(f.penalty_ml for f in fs)
        out.append(OrganFinding(k, score, reasons[:32], ptr, att_ml, heat_ml, g.volume_ml, fs))
    out.sort(key=lambda o: -o.score)
    return out


# ----------------------------------------------------------------------------- ranking a case


@dataclass
class RankedCase:
    """A case ranked in one mode. ``score``: reference = attention voxels (as the reference
    script); enhanced = sum of organ scores (ml-equivalent). ``organs``: unlabelled organs with a
    non-zero score, by priority. ``attention`` / ``heatmap``: organ id -> (box, bool crop) /
    (box, float32 crop in [0, 1]) on the case grid."""

    mode: str
    score: float
    organs: list[OrganFinding]
    attention: dict[int, tuple[Box, np.ndarray]]
    heatmap: dict[int, tuple[Box, np.ndarray]]


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.start >= s.stop for s in out) else out  # type: ignore[return-value]


def _rel(inner: Box, outer: Box) -> Box:
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))  # type: ignore[return-value]


#: enhanced attention (`suspect_regions`), tuned on the simulator's seeds 0-49 (benchmarks/):
#: "unsure" voxels have a mean model probability in this open band
UNSURE_BAND = (0.2, 0.8)
#: opening iterations (3x3x3) of the unsure voxels: ordinary boundary bands are thinner
UNSURE_OPENING = 1
#: a component whose evidence is mostly unsure agreement must also hold at least this many
#: voxels (the ordinary boundary bands that survive the opening are a voxel-scale pattern)
UNSURE_MIN_VOXELS = 150
#: a suspect component must hold at least this volume (the reader's speck limit) ...
SUSPECT_MIN_ML = 1.0
#: ... and, where the models' decisions differ, the models outvoted there must be more sure
#: than the ones that won by at least this much (mean of each model's confidence relative to
#: its own typical confidence at that depth, `_model_profile_conf`; see `suspect_regions`)
ASYMMETRY_MIN = 0.1
#: share of a component's voxels that must be contested, or unsure with all models agreeing
EVIDENCE_FRACTION = 0.2
#: a kept component then grows back (geodesic dilation, 3x3x3) this many voxels into the raw,
#: unopened contested and unsure voxels around it: the opening that makes candidates robust
#: also strips the thin parts of a real error (a boundary shift is a 3-4 voxel shell)
SUSPECT_GROW = 5
#: a component smaller than `UNSURE_MIN_VOXELS` is still kept when at least this share of it
#: is suspect-contested or doubting beyond the profile (a small leak all three models doubt)
UNSURE_SMALL_FRACTION = 0.5


#: a voxel is "unsure" when the ensemble's confidence ``|2 mean - 1|`` is below this fraction
#: of the organ's typical confidence at the same distance from the label's boundary ...
DOUBT_RATIO = 0.8
#: ... and it lies at least this many voxels from that boundary (closer, every model doubts)
DOUBT_MIN_DEPTH = 1
#: depths beyond this share the typical confidence of this depth
DOUBT_MAX_DEPTH = 6


def _median_f32(x: torch.Tensor) -> float:
    """``np.median`` of a 1-D float32 tensor, as numpy computes it (mean of the two middle
    values, in float32, for an even count)."""
    n = x.numel()
    hi = torch.kthvalue(x, n // 2 + 1).values
    if n % 2:
        return float(hi)
    lo = torch.kthvalue(x, n // 2).values
    return float((lo + hi) / 2)


def _doubt_beyond_profile(mean: torch.Tensor, dbin: torch.Tensor) -> torch.Tensor:
    """Bool, shape of ``mean``: voxels where the ensemble is less sure than the organ's own
    boundary profile predicts. ``mean``: float32 mean probability ``(X, Y, Z)``; ``dbin``: each
    voxel's depth bin from the label's boundary (`_depth_bins`); the typical confidence at a depth is the
    median of ``|2 mean - 1|`` over all voxels of the crop at that depth, inside and outside
    (most of them are right: the profile is the models' own sharpness, so a thin organ whose
    interior never gets far from its boundary is not "unsure" for that)."""
    conf = torch.abs(2.0 * mean - 1.0)
    typical = torch.zeros(DOUBT_MAX_DEPTH + 1, dtype=torch.float32)
    for d in range(DOUBT_MIN_DEPTH, DOUBT_MAX_DEPTH + 1):
        sel = conf[dbin == d]
        typical[d] = _median_f32(sel) if sel.numel() else 1.0
    typical = typical.to(mean.device)
    return (dbin >= DOUBT_MIN_DEPTH) & (conf < DOUBT_RATIO * typical[dbin])


def _sq_distance_capped(target: torch.Tensor, reach: int) -> torch.Tensor:
    """Int16, shape of ``target`` (bool): squared Euclidean distance (voxels) from each voxel
    to the nearest ``target`` voxel of the array, exact wherever it is at most ``reach + 0.5``
    (every larger value is some number above that; the caller caps). Three separable min-plus
    passes over offsets ``-reach..reach`` per axis: a nearest point within ``reach + 0.5`` is
    within ``reach`` voxels along every axis, so the passes see it. Outside the array counts
    as no target (as ``scipy.ndimage.distance_transform_edt``)."""
    big = 3 * (reach + 1) ** 2
    d = torch.where(target, 0, big).to(torch.int16)
    for axis in range(3):
        n = d.shape[axis]
        out = d.clone()
        for o in range(1, min(reach, n - 1) + 1):
            add = o * o
            a = d.narrow(axis, o, n - o) + add  # neighbour at +o
            out.narrow(axis, 0, n - o).copy_(torch.minimum(out.narrow(axis, 0, n - o), a))
            b = d.narrow(axis, 0, n - o) + add  # neighbour at -o
            out.narrow(axis, o, n - o).copy_(torch.minimum(out.narrow(axis, o, n - o), b))
        d = out.clamp_(max=big)
    return d


def _depth_bins(side: torch.Tensor) -> torch.Tensor:
    """Int64, shape of ``side`` (the label, bool): each voxel's Euclidean distance (voxels) to
    the other side of the label's boundary, rounded and capped at `DOUBT_MAX_DEPTH` (>= 1;
    ``min(rint(distance_transform_edt), DOUBT_MAX_DEPTH)`` exactly, from integer squared
    distances: ``rint(sqrt(s)) >= b`` iff ``s > b^2 - b``)."""
    s = torch.where(side, _sq_distance_capped(~side, DOUBT_MAX_DEPTH), _sq_distance_capped(side, DOUBT_MAX_DEPTH))
    out = torch.zeros(side.shape, dtype=torch.int64, device=side.device)
    for b in range(1, DOUBT_MAX_DEPTH + 1):
        out += s > b * b - b
    return out


def _model_profile_conf(q: torch.Tensor, dbin: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``(M, X, Y, Z)``: each model's confidence ``|2p - 1|`` divided by that model's
    typical (median) confidence at the same depth from the label's boundary (``dbin``, from
    `_depth_bins`), capped at 1.5. The typical value is taken over ``where`` (bool; all voxels
    if None): `suspect_regions` passes the voxels where the models agree, so that a large error
    does not lower the typical confidence of its own depth. A sharp model and a soft one become
    comparable, and a model near the boundary is not "unsure" for being near it. Exact
    medians via a histogram of the 256 uint8 confidence levels per depth."""
    nb = DOUBT_MAX_DEPTH + 1
    base = dbin * 256
    levels = torch.arange(256, dtype=torch.float64, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for m in range(q.shape[0]):
        key = base + torch.abs(2 * q[m].to(torch.int16) - 255)  # depth * 256 + |2p - 1| * 255
        hist = torch.bincount((key if where is None else key[where]).reshape(-1), minlength=nb * 256).reshape(nb, 256)
        cum = torch.cumsum(hist, dim=1)
        half = (cum[:, -1] + 1) // 2
        typical = torch.searchsorted(cum, half[:, None]).reshape(-1).to(torch.float64)
        typical = torch.where(cum[:, -1] > 0, typical, 255.0)
        # (depth, level) -> level / typical(depth), capped: divided in float64, then float32
        table = torch.clamp(levels[None, :] / torch.clamp(typical, min=1.0)[:, None], max=1.5).to(torch.float32)
        out[m] = table.reshape(-1)[key]
    return out


def _open(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    return binary_opening(mask, iterations) if iterations else mask


def suspect_regions(
    q: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, voxel_ml: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Enhanced attention of one organ: the compact regions where the ensemble's label is
    likely wrong. ``q``: uint8 ``(M, X, Y, Z)`` soft predictions ``p*255`` as the models gave
    them (a crop); ``label``: bool ``(X, Y, Z)``. Returns a bool ``(X, Y, Z)`` numpy mask and its
    evidence (ml per kind). Runs in torch on ``q``'s device (the segmentation pipeline's GPU);
    the connected components are labelled on the CPU (scipy). Bit-exact against the numpy +
    scipy original kept as the oracle in benchmarks/suspect_regions_numpy.py.

    Two kinds of evidence, each opened (3x3x3, once; `UNSURE_OPENING` times for the unsure
    voxels) so that the boundary wobble of ordinary models drops out, then joined into 26-connected candidate components:

    - contested: the models take different sides of 0.5. The ensemble follows the majority;
      it is suspect where the outvoted models are MORE sure of their side than the winners of
      theirs (mean over the outvoted minus mean over the winners >= `ASYMMETRY_MIN`, of each
      model's confidence ``|2p - 1|`` relative to its own typical confidence at that depth
      from the label's boundary where the models agree, `_model_profile_conf`): a model that
      errs alone is usually an unsure one, and two unsure models outvoting a sure one is how
      an ensemble goes wrong. Raw confidences made a sure model that errs alone look like the
      sure dissenter of an erring majority wherever the right models were near their own
      boundary (and so less sure): one confident model swapping the kidneys flagged both;
    - unsure agreement: every model takes the same side but the mean probability lies in
      `UNSURE_BAND`, over a region thick enough to survive the opening: models that share an
      error and doubt it (disagreement terms are blind there by construction). These voxels
      shape the candidates; their evidence is only the part where the ensemble doubts MORE
      than its own boundary profile predicts at that distance from the label's boundary
      (`_doubt_beyond_profile`): a thin organ (pancreas, a narrow liver lobe) is in the band
      all over because no voxel is far from its boundary, not because its label is wrong.

    A component is kept when at least `EVIDENCE_FRACTION` of its voxels are suspect-contested
    voxels and it holds >= `SUSPECT_MIN_ML`, or when that share is reached with the
    suspect-contested plus beyond-profile doubting voxels and it also holds >=
    `UNSURE_MIN_VOXELS` (thick boundary bands of unsure but right models make smaller ones), or
    when at least `UNSURE_SMALL_FRACTION` of it is such evidence. A kept component then grows
    back `SUSPECT_GROW` voxels into the raw contested and unsure voxels around it (what the
    opening stripped). Constants tuned on the simulator's seeds 0-99 and forced-kind variants
    of 0-49 (never on the report blocks 100-299)."""
    q = torch.as_tensor(q)
    side = torch.as_tensor(label, device=q.device).to(torch.bool)
    m = q.shape[0]
    p = q.to(torch.float32) / 255.0
    dec = q >= 128
    votes = dec.sum(dim=0)
    mean = p[0].clone()
    for pm in p[1:]:
        mean += pm  # numpy's axis-0 order: ((p0 + p1) + p2) / m in float32
    mean /= m
    contested = (votes > 0) & (votes < m)
    dbin = _depth_bins(side)
    conf = _model_profile_conf(q, dbin, ~contested)
    agree = dec == side[None]
    n_agree = agree.sum(dim=0)
    s_agree = conf[0] * agree[0]
    s_out = conf[0] * ~agree[0]
    for c, a in zip(conf[1:], agree[1:]):
        s_agree += c * a
        s_out += c * ~a
    c_agree = s_agree.to(torch.float64) / torch.clamp(n_agree, min=1)
    c_out = s_out.to(torch.float64) / torch.clamp(m - n_agree, min=1)
    suspect_c = contested & (c_out - c_agree >= ASYMMETRY_MIN)
    unsure = ~contested & (mean > UNSURE_BAND[0]) & (mean < UNSURE_BAND[1])  # shapes the candidates
    doubt = unsure & _doubt_beyond_profile(mean, dbin)  # is the evidence
    cand = _open(contested, 1) | _open(unsure, UNSURE_OPENING)
    lab_np, n = ndimage.label(cand.cpu().numpy(), structure=_CUBE)  # components on the CPU (C)
    if n == 0:
        return np.zeros(tuple(side.shape), dtype=bool), {"contested_ml": 0.0, "unsure_ml": 0.0}
    lab = torch.from_numpy(lab_np.astype(np.int64, copy=False)).to(q.device)
    total = torch.bincount(lab.reshape(-1), minlength=n + 1)
    ev_c = torch.bincount(lab[suspect_c], minlength=n + 1)
    ev_u = torch.bincount(lab[doubt & cand], minlength=n + 1)
    total64 = total.to(torch.float64)  # the thresholds in float64, as numpy compares them
    big = total64 * voxel_ml >= SUSPECT_MIN_ML
    keep = big & (ev_c >= EVIDENCE_FRACTION * total64)
    keep |= big & (total >= UNSURE_MIN_VOXELS) & ((ev_c + ev_u) >= EVIDENCE_FRACTION * total64)
    keep |= big & ((ev_c + ev_u) >= UNSURE_SMALL_FRACTION * total64)
    keep[0] = False
    out = keep[lab]
    if SUSPECT_GROW and bool(out.any()):  # grow back what the opening stripped (see SUSPECT_GROW)
        room = contested | unsure
        for _ in range(SUSPECT_GROW):
            out = out | (binary_dilation(out, 1) & room)
    return out.cpu().numpy(), {
        "contested_ml": float((suspect_c & out).sum()) * voxel_ml,
        "unsure_ml": float((doubt & out).sum()) * voxel_ml,
    }


#: findings whose region joins the enhanced attention (the others are reasons and score only:
#: a whole organ or its dropped components are not where a label's error lies)
ATTENTION_FINDINGS = frozenset({"SIDE_SWAP"})


def rank_case(
    case: Any, affine: np.ndarray, *, mode: str = "reference", prior: PopulationPrior | None = None
) -> RankedCase:
    """Rank one case from its reference attention (`atlasflow.common.attention.CaseAttention`).

    reference: the recipe's priority and organ order; organs carry the terms as reasons.
    enhanced: the attention is `suspect_regions` of the models' soft predictions as given
    (``OrganResult.probs``; the reference masks are not used) plus the regions of the
    plausibility findings listed in `ATTENTION_FINDINGS` (swapped kidneys); every finding of
    the ensemble masks (`assess`) is a reason and adds its penalty: the organ score is its
    attention volume (ml) plus the penalties; the heatmap is the reference heatmap inside the
    attention, at least 0.5, 0 outside; the pointer covers the attention and the regions of
    all findings; FOV cuts are reported only.
    """
    if mode not in ("reference", "enhanced"):
        raise ValueError("mode must be 'reference' or 'enhanced'")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    ax = slice_axis_of(affine)
    shape = tuple(case.shape)
    attention: dict[int, tuple[Box, np.ndarray]] = {}
    heatmap: dict[int, tuple[Box, np.ndarray]] = {}
    findings: dict[int, list[Finding]] = {}
    geoms: dict[int, OrganGeometry] = {}
    if mode == "enhanced":
        prior = prior or PopulationPrior.load()
        masks = {
            k: (r.box, r.ensemble.cpu().numpy())
            for k, r in case.organs.items()
            if r.box is not None and r.ensemble is not None and bool(r.ensemble.any())
        }
        extras = {k: case.organs[k].ensemble_extra.cpu().numpy() for k in masks}
        geoms = measure_masks(masks, affine, shape, extras)
        overlaps: dict[int, dict[int, float]] = {}
        for k, (bk, mk) in masks.items():
            for j, (bj, mj) in masks.items():
                if j == k:
                    continue
                inter = _intersect(bk, bj)
                if inter is not None:
                    n = int((mk[_rel(inter, bk)] & mj[_rel(inter, bj)]).sum())
                    if n:
                        overlaps.setdefault(k, {})[j] = n * voxel_ml
        findings = assess(geoms, prior, overlaps)
    organs: list[OrganFinding] = []
    for k, r in case.organs.items():
        if r.labelled or r.box is None:
            continue
        att = r.attention
        a = att.attention.cpu().numpy() if att is not None else np.zeros(r.ensemble.shape, dtype=bool)
        h = att.heatmap.cpu().numpy() if att is not None else np.zeros(a.shape, dtype=np.float32)
        reasons: list[str] = []
        name = ORGANS[k]
        evidence: dict[str, float] = {}
        if mode == "enhanced":
            if r.probs is not None:
                a, evidence = suspect_regions(r.probs, r.ensemble, voxel_ml)
            else:
                a = np.zeros(a.shape, dtype=bool)
        if att is not None and mode == "reference":
            for what, label in (("std_mask", "std mask"), ("entropy_mask", "entropy mask"), ("overlap", "overlap")):
                ml = float(getattr(att, what).sum()) * voxel_ml
                if ml > 0:
                    reasons.append(f"{name}: {label} {ml:.1f} ml")
        for what, label in (
            ("contested_ml", "outvoted models surer than the winners"),
            ("unsure_ml", "models agree but doubt"),
        ):
            if evidence.get(what, 0.0) > 0:
                reasons.append(f"{name}: {label} {evidence[what]:.1f} ml")
        fs = findings.get(k, [])
        look = a  # where the pointer sends the reader: the attention and every finding's region
        if fs and k in geoms:
            g = geoms[k]
            inner = _rel(g.box, r.box)
            region = finding_region(g, [f for f in fs if f.code in ATTENTION_FINDINGS])
            if region.any():
                a = a.copy()
                a[inner] |= region
            look = a.copy()
            look[inner] |= finding_region(g, fs)
            reasons += [f.reason for f in fs]
        if mode == "enhanced":
            h = np.where(a, np.maximum(h, np.float32(0.5)), np.float32(0)).astype(np.float32)
        att_ml = float(a.sum()) * voxel_ml
        heat_ml = float(h.sum(dtype=np.float64)) * voxel_ml
        if mode == "reference":
            score = float(np.floor(h * 255.0).sum())  # the reference's organ order key
        else:
            score = att_ml + sum(f.penalty_ml for f in fs)
        box = _box_of(look)
        ptr = (
            pointer(
                tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(box, r.box)),  # type: ignore[arg-type]
                affine,
                ax,
            )
            if box is not None
            else None
        )
        attention[k] = (r.box, a)
        heatmap[k] = (r.box, h)
        vol = float(r.ensemble.sum()) * voxel_ml if r.ensemble is not None else 0.0
        organs.append(OrganFinding(k, score, reasons[:32], ptr, float(a.sum()) * voxel_ml, heat_ml, vol, fs))
    organs = [o for o in sorted(organs, key=lambda o: -o.score) if o.score > 0]
    total = float(case.score()) if mode == "reference" else sum(o.score for o in organs)
    return RankedCase(mode, total, organs, attention, heatmap)
