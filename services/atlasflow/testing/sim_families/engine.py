"""Building blocks that the simulator families compose (anatomy, error injection, soft
predictions, ground truth). A family chooses the blocks and their parameters; nothing here has a
default that a family does not state in its JSON.

All arrays ``(X, Y, Z)`` in RAS voxel order; soft predictions uint8 ``p*255``, ``(M, X, Y, Z)``
per organ, M = 3 models; organ ids AbdomenAtlas 1..9.

Anatomy pool (`anatomy_pool`): the real TotalSegmentator label maps of tests/data/totalsegmentator
mapped to AbdomenAtlas ids (`atlasflow.labels.totalseg.totalseg_to_atlas`), each organ's largest
component, resampled (nearest neighbour) to the working grid ``grid_mm`` (isotropic in plane,
slices never thinner than the source's):

- ``force_split``: example_seg_fast_force_split (122x101x112 at 3 mm, pelvis to upper abdomen,
  all nine organs, non-contrast CT, TotalSegmentator --fast);
- ``upper``: example_seg (122x101x30 at 3 mm, the same patient's upper abdomen, the full-resolution
  TotalSegmentator model: another rater's boundaries);
- ``dicom``: example_seg_dicom (512x512x20 at 0.98x0.98x2 mm, another patient, portal-venous,
  a 40 mm slab; no kidneys).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.testing.data import TEST_DATA
from atlasflow.testing.error_sim import SimCase, largest_components

POOL_FILES = {
    "force_split": "example_seg_fast_force_split.nii.gz",
    "upper": "example_seg.nii.gz",
    "dicom": "example_seg_dicom.nii.gz",
}
ERROR_KINDS = ("missing", "leak", "swap", "fragment", "shift", "grow", "shrink")
_CUBE = np.ones((3, 3, 3), dtype=bool)
KL, KR = ORGAN_IDS["kidney_left"], ORGAN_IDS["kidney_right"]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]


@functools.cache
def anatomy_pool(grid_mm: float) -> dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]]:
    """name -> (AbdomenAtlas label map uint8, affine) on the working grid (see module doc).
    Cached per process."""
    out: dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]] = {}
    for name, fname in POOL_FILES.items():
        img = nib.as_closest_canonical(nib.load(TEST_DATA / "totalsegmentator" / "tests" / "reference_files" / fname))
        lab = totalseg_to_atlas(np.asarray(img.dataobj)).astype(np.uint8)
        aff = np.asarray(img.affine, dtype=np.float64)
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        target = np.array([grid_mm, grid_mm, max(grid_mm, float(spacing[2]))])
        f = spacing / target  # < 1: fewer voxels
        shape = tuple(max(4, int(round(n * s))) for n, s in zip(lab.shape, f))
        idx = [
            np.clip(((np.arange(n) + 0.5) / s - 0.5).round().astype(int), 0, m - 1)
            for n, s, m in zip(shape, f, lab.shape)
        ]
        lab = largest_components(lab[np.ix_(*idx)])
        a = aff.copy()
        a[:3, :3] = aff[:3, :3] / f  # column j scaled by spacing_j / f_j
        a[:3, 3] = aff[:3, 3] + aff[:3, :3] @ ((1.0 / f - 1.0) / 2.0)  # voxel centres stay centred
        out[name] = (np.ascontiguousarray(lab), a)
    return out


def vary_anatomy(
    labels: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64], rng: np.random.Generator, p: dict[str, Any]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], dict[str, object]]:
    """Per-axis scaling (``scale`` [lo, hi], nearest neighbour, spacing unchanged: the anatomy
    grows or shrinks), a zero-filled shift (``shift_vox``: +-n voxels per axis) and a
    field-of-view cut along S (each end with probability ``fov_cut_p``, by up to
    ``fov_cut_max`` of the slices). Returns (labels, affine, info)."""
    s = rng.uniform(float(p["scale"][0]), float(p["scale"][1]), 3)
    shape = tuple(max(8, int(round(n * f))) for n, f in zip(labels.shape, s))
    idx = [
        np.clip(np.round((np.arange(n) + 0.5) / f - 0.5).astype(int), 0, m - 1)
        for n, f, m in zip(shape, s, labels.shape)
    ]
    lab = labels[np.ix_(*idx)]
    k = int(p["shift_vox"])
    shift = rng.integers(-k, k + 1, 3)
    lab = ndimage.shift(lab, shift, order=0, mode="constant", cval=0)
    nz = lab.shape[2]
    cut = [int(rng.uniform(0, p["fov_cut_max"]) * nz) if rng.random() < p["fov_cut_p"] else 0 for _ in range(2)]
    lo, hi = cut[0], nz - cut[1]
    if hi - lo < 4:
        lo, hi = 0, nz
    lab = np.ascontiguousarray(lab[:, :, lo:hi])
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ np.array([0, 0, lo]) + affine[:3, 3]
    info: dict[str, object] = {
        "scale": [round(float(x), 3) for x in s],
        "shift": shift.tolist(),
        "fov_cut": [lo, nz - hi],
    }
    return largest_components(lab), aff, info


# ----------------------------------------------------------------------------- errors


def _ball(shape: tuple[int, ...], centre: npt.NDArray[Any], r: float) -> B:
    box = tuple(slice(max(0, int(c - r) - 1), min(n, int(c + r) + 2)) for c, n in zip(centre, shape))
    out = np.zeros(shape, dtype=bool)
    if any(b.start >= b.stop for b in box):
        return out
    grid = np.ogrid[box]
    out[box] = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
    return out


def inject(
    labels: npt.NDArray[np.uint8], kind: str, organ: int, rng: np.random.Generator, size: tuple[float, float]
) -> tuple[npt.NDArray[np.uint8], dict[str, object]]:
    """``labels`` with one error of ``kind`` on ``organ`` (a new map). ``size`` [lo, hi] is the
    kind's size range: missing: fraction of the organ's extent cut off one end along a random
    axis; leak / fragment: ball radius as a fraction of the organ's cube-root size (at least 2
    voxels); shift / grow / shrink: voxels. leak: into the neighbour it touches most (else the
    background), connected to the organ; fragment: a detached island 1-3 voxels off the
    surface; swap: left and right kidney exchanged (``organ`` ignored)."""
    lab = labels.copy()
    m = labels == organ
    info: dict[str, object] = {}
    u = float(rng.uniform(*size))
    if kind == "missing":
        idx = np.argwhere(m)
        axis = int(rng.integers(0, 3))
        lo, hi = idx[:, axis].min(), idx[:, axis].max()
        coord = np.arange(labels.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        part = m & ((coord > hi - u * (hi - lo)) if rng.random() < 0.5 else (coord < lo + u * (hi - lo)))
        lab[part] = 0
    elif kind in ("leak", "fragment"):
        shell = ndimage.binary_dilation(m, structure=_CUBE) & ~m
        r = max(2.0, float(np.cbrt(m.sum())) * u)
        if kind == "leak":
            touching = np.bincount(labels[shell], minlength=10)
            touching[0] = 0
            touching[organ] = 0
            nb = int(np.argmax(touching)) if touching.max() >= 10 else 0
            region = labels == nb
            info["into"] = ORGANS.get(nb, "background")
            pts = np.argwhere(shell & region)
            if len(pts) == 0:
                region, pts = labels == 0, np.argwhere(shell & (labels == 0))
            p0 = pts[int(rng.integers(0, len(pts)))]
            chunk = _ball(labels.shape, p0, r) & region
            lab_c, _ = ndimage.label(chunk | m, structure=_CUBE)
            add = chunk & np.isin(lab_c, np.unique(lab_c[m]))
        else:
            idx = np.argwhere(m)
            surf = idx[int(rng.integers(0, len(idx)))]
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            centre = surf + d * (r + float(rng.integers(2, 4)))
            far = ~ndimage.binary_dilation(m, structure=_CUBE, iterations=1)
            add = _ball(labels.shape, centre, r) & (labels == 0) & far
        info["added_voxels"] = int(add.sum())
        lab[add] = organ
    elif kind == "swap":
        lab[labels == KL] = KR
        lab[labels == KR] = KL
    elif kind == "shift":
        dv = [0, 0, 0]
        dv[int(rng.integers(0, 3))] = int(round(u)) * (1 if rng.random() < 0.5 else -1)
        moved = ndimage.shift(m.astype(np.uint8), dv, order=0, mode="constant", cval=0) > 0
        lab[m & ~moved] = 0
        lab[moved & (labels == 0)] = organ
        info["shift"] = dv
    elif kind in ("grow", "shrink"):
        it = max(1, int(round(u)))
        if kind == "grow":
            lab[ndimage.binary_dilation(m, structure=_CUBE, iterations=it) & (labels == 0)] = organ
        else:
            lab[m & ~ndimage.binary_erosion(m, structure=_CUBE, iterations=it)] = 0
        info["voxels"] = it
    else:
        raise ValueError(f"unknown error kind {kind!r}")
    return largest_components(lab) if kind != "fragment" else lab, info


# ----------------------------------------------------------------------------- soft predictions


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float, amp: float) -> F32:
    """A smooth random field (Gaussian-filtered white noise, ``sigma`` voxels) scaled to max
    |value| = ``amp``."""
    if amp == 0:
        return np.zeros(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    n /= max(float(np.abs(n).max()), 1e-6)
    return (n * amp).astype(np.float32)


@dataclass
class Model:
    """One simulated model: logit = ``sharp * organ_sharp * signed distance / temperature +
    noise``; p = ``floor + (ceiling - floor) * sigmoid(logit)``; then Gaussian blur (``blur``
    voxels, 0: none) and white noise on p (``white``, std); p = 0 more than ``cutoff`` voxels
    outside the mask (except where the model errs and doubts)."""

    sharp: float
    temperature: float
    ceiling: float
    floor: float
    blur: float
    white: float
    cutoff: float
    noise: F32 = field(repr=False)
    rng_seed: int = 0


def signed_distance(mask: B, box: tuple[slice, ...]) -> F32:
    """Signed distance (voxels, + inside, the boundary at +-0.5) of ``mask`` on ``box``."""
    m = mask[box]
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    return np.where(m, inside - 0.5, -(outside - 0.5)).astype(np.float32)


def soft_prediction(
    sd: F32,
    box: tuple[slice, ...],
    shape: tuple[int, int, int],
    model: Model,
    organ_sharp: float,
    doubt: F32 | None = None,
    keep: B | None = None,
) -> U8:
    """uint8 p*255 of one model on the full grid from the signed distance ``sd`` of its mask on
    ``box``. ``doubt`` (float32 on ``box``, 1 = as sure as elsewhere): p pulled toward 0.5,
    ``0.5 + doubt * (p - 0.5)``; ``keep`` (bool on ``box``): not cut off there."""
    logit = model.sharp * organ_sharp * sd / model.temperature + model.noise[box]
    p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
    p = model.floor + (model.ceiling - model.floor) * p
    if model.blur > 0:
        p = ndimage.gaussian_filter(p, model.blur)
    if model.white > 0:
        p = p + np.random.default_rng(model.rng_seed).normal(0.0, model.white, p.shape).astype(np.float32)
    if doubt is not None:
        p = 0.5 + doubt * (p - 0.5)
    far = sd < -model.cutoff
    if keep is not None:
        far &= ~keep
    p = np.where(far, 0.0, np.clip(p, 0.0, 1.0))
    out = np.zeros(shape, dtype=np.uint8)
    out[box] = np.round(p * 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- a whole case


@dataclass
class ErrorPlan:
    """One injected error: ``kind``, ``organ`` (AbdomenAtlas id), ``models`` (indices of the
    models that hold it), ``confidence`` (c: the erring models' probabilities pulled toward 0.5,
    ``0.5 + c (p - 0.5)``, where their label is wrong; 1 = as sure as of true anatomy) and the
    ``size`` range of its kind."""

    kind: str
    organ: int
    models: tuple[int, ...]
    confidence: float
    size: tuple[float, float]


def build_case(
    name: str,
    truth: npt.NDArray[np.uint8],
    affine: npt.NDArray[np.float64],
    models: list[Model],
    errors: list[ErrorPlan],
    rng: np.random.Generator,
    organ_sharp: dict[int, float] | None = None,
    info: dict[str, object] | None = None,
) -> SimCase:
    """The models' soft predictions of ``truth`` with ``errors`` injected for the models that
    hold them (each error on the label map of each of its models, in order), and the clean
    predictions (same models, same noise, no error) of every organ an error touches, so that
    `atlasflow.testing.error_sim.case_error_regions` finds the ensemble's error regions. Returns
    an `error_sim.SimCase` (``error``: the kinds joined by ``+``, ``none`` for a clean case)."""
    shape = (int(truth.shape[0]), int(truth.shape[1]), int(truth.shape[2]))
    wrong = [truth.copy() for _ in models]
    record: list[dict[str, object]] = []
    for e in errors:
        new, einfo = inject(truth, e.kind, e.organ, rng, e.size)
        diff = new != truth
        for m in e.models:
            wrong[m][diff] = new[diff]
        record.append(
            {
                "kind": e.kind,
                "organ": ORGANS[e.organ],
                "shared": len(e.models),
                "confidence": round(e.confidence, 3),
                **einfo,
            }
        )
    conf = {m: min((e.confidence for e in errors if m in e.models), default=1.0) for m in range(len(models))}
    probs: dict[int, U8] = {}
    clean: dict[int, U8] = {}
    sharp = organ_sharp or {}
    for k in ORGANS:
        masks = [w == k for w in wrong]
        t = truth == k
        union = t.copy()
        for mk in masks:
            union |= mk
        if not union.any():
            probs[k] = np.zeros((len(models), *shape), dtype=np.uint8)
            continue
        objs = ndimage.find_objects(union.astype(np.uint8))[0]
        box = tuple(slice(max(0, s.start - 8), min(n, s.stop + 8)) for s, n in zip(objs, shape))
        sd_t = signed_distance(t, box) if t.any() else np.full(tuple(s.stop - s.start for s in box), -99.0, np.float32)
        q = np.zeros((len(models), *shape), dtype=np.uint8)
        qc = np.zeros_like(q)
        touched = False
        for i, (model, mk) in enumerate(zip(models, masks)):
            qc[i] = soft_prediction(sd_t, box, shape, model, sharp.get(k, 1.0))
            if np.array_equal(mk, t):
                q[i] = qc[i]
                continue
            touched = True
            err = (mk != t)[box]
            w = np.clip(ndimage.gaussian_filter(err.astype(np.float32), 1.0) * 2.0, 0.0, 1.0)
            doubt = (1.0 - (1.0 - conf[i]) * w).astype(np.float32)
            keep = ndimage.binary_dilation(err, iterations=2)
            q[i] = soft_prediction(signed_distance(mk, box), box, shape, model, sharp.get(k, 1.0), doubt, keep)
        probs[k] = q
        if touched:
            clean[k] = qc
    first = errors[0] if errors else None
    return SimCase(
        name,
        truth,
        affine,
        probs,
        "+".join(e.kind for e in errors) or "none",
        first.organ if first else 0,
        len(first.models) if first else 0,
        {**(info or {}), "errors": record},
        clean,
    )
