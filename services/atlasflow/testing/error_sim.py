"""Error simulator for the error-detection benchmark, and the builder of the bundled
plausibility prior. Both start from the bundled label maps (TotalSegmentator predictions on
real CT in tests/data/totalsegmentator, mapped to AbdomenAtlas ids by
`atlasflow.labels.totalseg.totalseg_to_atlas`). Lives in atlasflow.testing (it reads the labels
and ingest packages; services may not import each other, and nothing in the services imports
this package).

    .venv/bin/python -m atlasflow.testing.error_sim --write-prior   # rebuild services/atlasflow/method/plausibility_prior.json

Simulated case (`simulate_case`), all arrays ``(X, Y, Z)``:
1. anatomy: a bundled label map (each organ's largest component), randomly scaled (0.85-1.15
   per axis, nearest neighbour, spacing unchanged), shifted (+-4 voxels, no wrap-around) and
   cropped along S (field of view: 0-25 % off either end, so organs get cut); the real CT
   under the map (`bundled_cts`) is varied alike (``SimCase.ct``; benchmarks/bench_image_evidence.py);
2. errors injected into the truth for the shared part of the models (one per case, organ
   chosen at random): leak (a compact chunk of the neighbour, or of the surrounding fat, next
   to a random contact point, connected to the organ), missing part, false-positive island
   (attached to the organ by a 1-voxel bridge so that it may survive the largest-component
   step, or detached), swapped kidneys, boundary shift (3-4 voxels);
3. three models: each organ's soft prediction = sigmoid of a smoothed signed distance with a
   per-model sharpness (1.2-2.5 per voxel) and smooth logit noise (one field per model),
   cut to 0 more than 4 voxels outside the mask; the error is given to 1, 2 or all 3 models,
   which DOUBT it: where their labels are wrong, their probabilities are pulled toward 0.5,
   ``p' = 0.5 + c (p - 0.5)``, with one confidence ``c`` per case drawn from
   `ERROR_CONFIDENCE` (and are not cut off there);
4. ground truth for evaluation: the ensemble's error = its mask XOR the mask of the clean
   ensemble (the same models with the same noise, without the injected error), per organ; its
   connected components >= `MIN_REGION_ML` that hold a voxel where the error changed the
   decision of a majority of the models are the error regions (the models' ordinary boundary
   wobble, and the shell by which one dissenting model tips a borderline mean, are not
   errors); a case is erroneous when it has at least one region.

Changes made while reviewing the simulator before tuning the enhanced mode (H2):
- shift: ``np.roll`` wrapped an organ cut by the field of view around to the other end of
  the volume (a phantom island); now a zero-filled shift.
- leak: was the neighbour's voxels within a 3-5 voxel dilation of the organ, a thin contact
  shell whose soft predictions stayed below 0.5 in the ensemble (e.g. a 2-of-3 postcava leak
  left the postcava label unchanged and only removed aorta voxels); now a compact chunk
  (radius 0.25-0.4 x the organ's cube-root size, 3-8 voxels) connected to the organ.
- error regions: the rule "at least 3 voxels thick" (non-empty after a 3x3x3 erosion) dropped
  real, majority-held errors of thin organs (a 2-of-3 pancreas shift of 7.8 ml, a 2-of-3
  missing pancreas part of 2.5 ml counted as clean cases); replaced by the majority rule of
  step 4, which removes what the thickness rule was meant to remove (one model's shell).
- models' confidence: an erring model used to hold its error exactly as surely as true
  anatomy (p -> 0 or 1 away from the boundary), and was cut to 0 four voxels outside its
  wrong mask, so the uncertainty terms could never see an error. Real networks are less sure
  where they err (not always: ``c`` near 1 keeps confident errors); ``c`` is an assumption of
  this simulator, not a measurement, and `simulate_case(..., confidence=1.0)` restores the
  old behaviour for comparison.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.method.geometry import OrganGeometry, measure_labels
from atlasflow.method.prior import PopulationPrior
from atlasflow.testing.data import REPO, TEST_DATA

BUNDLED = ("example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz")
ERRORS = ("leak", "missing", "island", "swap", "shift")
MIN_REGION_ML = 1.0
#: range of the per-case confidence with which the models that hold the error hold it (1 = as
#: sure as of the true anatomy); `simulate_case(..., confidence=...)` overrides the draw
ERROR_CONFIDENCE = (0.3, 1.0)
_CUBE = np.ones((3, 3, 3), dtype=bool)
NEIGHBOURS = {1: 7, 2: 5, 3: 8, 4: 5, 5: 4, 6: 9, 7: 1, 8: 9, 9: 8}  # organ -> a plausible leak target


@functools.cache
def bundled_cts() -> tuple[npt.NDArray[Any], ...]:
    """The real CT under each bundled label map (int16 HU, same RAS grid as `bundled_label_maps`,
    checked): example_ct.nii.gz under the force-split labels; the 20-slice JPEG 2000 series,
    assembled by ingest (`assemble_series`), under example_seg_dicom. Cached per process."""
    import pydicom

    from atlasflow.ingest.assemble import assemble_series

    ref = TEST_DATA / "totalsegmentator" / "tests" / "reference_files"
    out = []
    for (name, labels, affine), source in zip(bundled_label_maps(), ("example_ct.nii.gz", "example_ct_dicom")):
        if source.endswith(".nii.gz"):
            img = nib.as_closest_canonical(nib.load(ref / source))
        else:
            vol = assemble_series([pydicom.dcmread(f) for f in sorted((ref / source).iterdir())])
            img = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
        if img.shape != labels.shape or not np.allclose(img.affine, affine, atol=1e-4):
            raise RuntimeError(f"{source} is not on the grid of {name}")
        out.append(np.clip(np.asarray(img.dataobj), -1024, 3071).astype(np.int16))
    return tuple(out)


def bundled_label_maps() -> list[tuple[str, npt.NDArray[Any], npt.NDArray[Any]]]:
    """(name, AbdomenAtlas label map (X, Y, Z) uint8, affine) of the bundled labels, in RAS
    voxel order (canonical orientation)."""
    out = []
    for name in BUNDLED:
        img = nib.as_closest_canonical(nib.load(TEST_DATA / "totalsegmentator" / "tests" / "reference_files" / name))
        out.append((name, totalseg_to_atlas(np.asarray(img.dataobj)), np.asarray(img.affine, dtype=np.float64)))
    return out


# ----------------------------------------------------------------------------- prior


def _scaled(geoms: dict[int, OrganGeometry], s: npt.NDArray[Any]) -> dict[int, OrganGeometry]:
    centre = np.mean([g.centroid_mm for g in geoms.values()], axis=0)
    return {
        k: replace(g, volume_ml=g.volume_ml * float(np.prod(s)), centroid_mm=centre + (g.centroid_mm - centre) * s)
        for k, g in geoms.items()
    }


def build_bundled_prior(augment: int = 24, seed: int = 0) -> PopulationPrior:
    """Prior from the bundled label maps: each map measured once, plus ``augment`` anisotropically
    scaled variants (0.85-1.15 per axis: volumes and centroid offsets scale; a shift changes
    neither, so shifted variants add nothing). Two real cases are thin: the augmentation only
    spreads them, and the std floors of `PopulationPrior` keep it humble."""
    rng = np.random.default_rng(seed)
    prior = PopulationPrior()
    for _, labels, affine in bundled_label_maps():
        geoms = measure_labels(labels, affine)
        prior.update(geoms)
        for _ in range(augment):
            prior.update(_scaled(geoms, rng.uniform(0.85, 1.15, 3)))
    prior.notes = (
        f"built by atlasflow.testing.error_sim from {', '.join(BUNDLED)} (TotalSegmentator labels mapped "
        f"to AbdomenAtlas ids) plus {augment} anisotropically scaled variants each (0.85-1.15 per axis); "
        "organs cut by the field of view add no volume and no S offset"
    )
    return prior


# ----------------------------------------------------------------------------- simulation


@dataclass
class SimCase:
    """One simulated case: ``truth`` (X, Y, Z) uint8 labels, ``affine``, ``probs`` organ id ->
    uint8 (3, X, Y, Z), the injected ``error`` kind, its ``organ``, how many models share it;
    ``clean_probs``: for the organs the error touches, the same models (same noise) without it;
    ``ct``: the real CT under the truth (int16 HU, same grid), varied with it."""

    name: str
    truth: npt.NDArray[Any]
    affine: npt.NDArray[Any]
    probs: dict[int, npt.NDArray[Any]]
    error: str
    organ: int
    shared: int
    extra: dict[str, object] = field(default_factory=dict)
    clean_probs: dict[int, npt.NDArray[Any]] = field(default_factory=dict)
    ct: npt.NDArray[Any] | None = None


def vary_anatomy(
    labels: npt.NDArray[Any],
    affine: npt.NDArray[Any],
    rng: np.random.Generator,
    size_scale: float = 1.0,
    ct: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any] | None]:
    """Random per-axis scaling (nearest neighbour, spacing unchanged), a shift and an S crop;
    ``ct`` (the image under ``labels``, same shape) undergoes the same, filled with air (-1024)
    where the shift uncovers the volume edge. Returns (labels, affine, ct or None)."""
    s = rng.uniform(0.85, 1.15, 3) * size_scale
    out_shape = tuple(max(8, int(round(n * f))) for n, f in zip(labels.shape, s))
    idx = [
        np.clip(np.round((np.arange(n) + 0.5) / f - 0.5).astype(int), 0, m - 1)
        for n, f, m in zip(out_shape, s, labels.shape)
    ]
    lab = labels[np.ix_(*idx)]
    shift = rng.integers(-4, 5, 3)
    lab = ndimage.shift(lab, shift, order=0, mode="constant", cval=0)  # no wrap-around
    nz = lab.shape[2]
    lo = int(rng.uniform(0, 0.25) * nz) if rng.random() < 0.5 else 0
    hi = nz - (int(rng.uniform(0, 0.25) * nz) if rng.random() < 0.5 else 0)
    lab = np.ascontiguousarray(lab[:, :, lo:hi])
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ np.array([0, 0, lo]) + affine[:3, 3]
    if ct is not None:
        ct = ndimage.shift(ct[np.ix_(*idx)], shift, order=0, mode="constant", cval=-1024)
        ct = np.ascontiguousarray(ct[:, :, lo:hi])
    return lab, aff, ct


def largest_components(labels: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Each organ of a label map reduced to its largest 26-connected component (the bundled
    TotalSegmentator maps have stray fragments; a truth with fragments would count the
    ensemble's largest-component step as an error)."""
    out = np.zeros_like(labels)
    cube = np.ones((3, 3, 3), dtype=bool)
    for k in ORGANS:
        m = labels == k
        if not m.any():
            continue
        lab, n = ndimage.label(m, structure=cube)
        if n > 1:
            counts = np.bincount(lab.ravel())
            counts[0] = 0
            m = lab == int(np.argmax(counts))
        out[m] = k
    return out


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float, amp: float) -> npt.NDArray[Any]:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    n /= max(float(np.abs(n).max()), 1e-6)
    return n * amp


def _soft(
    mask: npt.NDArray[Any],
    noise: npt.NDArray[Any],
    sharp: float,
    near: npt.NDArray[Any] | None = None,
    shrink: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """uint8 p*255 of a soft prediction of ``mask``: sigmoid(sharp * signed distance + noise)
    (``noise``: the model's smooth logit noise field, full volume; ``sharp``: per voxel of
    signed distance), zero more than 4 voxels outside the mask and outside ``near`` (bool,
    full volume: where an erring model keeps its doubts); ``shrink`` (float32, full volume):
    p is pulled toward 0.5, ``0.5 + shrink * (p - 0.5)``; computed on the box of
    ``mask | near`` grown by 8 voxels."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    objs = ndimage.find_objects((mask | near if near is not None else mask).astype(np.uint8))
    if not objs or objs[0] is None:
        return out
    box = tuple(slice(max(0, s.start - 8), min(n, s.stop + 8)) for s, n in zip(objs[0], mask.shape))
    m = mask[box]
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    sd = np.where(m, inside - 0.5, -(outside - 0.5)).astype(np.float32)
    logit = sharp * sd + noise[box]
    p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
    if shrink is not None:
        p = 0.5 + shrink[box] * (p - 0.5)
    p[(sd < -4) & ~(near[box] if near is not None else False)] = 0.0
    out[box] = np.round(p * 255).astype(np.uint8)
    return out


def inject(
    truth: npt.NDArray[Any], kind: str, organ: int, rng: np.random.Generator
) -> tuple[npt.NDArray[Any], dict[str, object]]:
    """The truth with one error of ``kind`` on ``organ`` (a new label map)."""
    lab = truth.copy()
    m = truth == organ
    info: dict[str, object] = {}
    if kind == "leak":
        # a compact chunk of the neighbour (or of the surrounding fat) next to a random contact
        # point, connected to the organ: what a model that confuses two organs labels
        nb = NEIGHBOURS[organ]
        shell = ndimage.binary_dilation(m, structure=_CUBE) & ~m
        contact = shell & (truth == nb)
        if contact.sum() >= 10:
            region = truth == nb
            info["into"] = ORGANS[nb]
        else:  # the neighbour is not adjacent: leak into the surrounding fat
            contact = shell & (truth == 0)
            region = truth == 0
            info["into"] = "background"
        pts = np.argwhere(contact)
        p0 = pts[int(rng.integers(0, len(pts)))]
        r = float(np.clip(np.cbrt(m.sum()) * rng.uniform(0.25, 0.4), 3.0, 8.0))
        box = tuple(slice(max(0, int(c - r) - 1), min(n, int(c + r) + 2)) for c, n in zip(p0, truth.shape))
        grid = np.ogrid[box]
        ball = np.zeros(truth.shape, dtype=bool)
        ball[box] = sum((g - c) ** 2 for g, c in zip(grid, p0)) <= r * r
        chunk = ball & region
        lab_c, _ = ndimage.label(chunk | m, structure=_CUBE)
        leak = chunk & np.isin(lab_c, np.unique(lab_c[m]))  # the part connected to the organ
        info["leak_voxels"] = int(leak.sum())
        lab[leak] = organ
    elif kind == "missing":
        idx = np.argwhere(m)
        axis = int(rng.integers(0, 3))
        lo, hi = idx[:, axis].min(), idx[:, axis].max()
        frac = rng.uniform(0.25, 0.45)
        cut = hi - frac * (hi - lo) if rng.random() < 0.5 else lo + frac * (hi - lo)
        coord = np.arange(truth.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        part = m & ((coord > cut) if cut > (lo + hi) / 2 else (coord < cut))
        lab[part] = 0
    elif kind == "island":
        idx = np.argwhere(m)
        c = idx.mean(axis=0)
        ext = idx.max(axis=0) - idx.min(axis=0) + 1
        r = max(2.5, float(np.cbrt(m.sum())) * rng.uniform(0.25, 0.4))
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centre = c + direction * (ext / 2 + r + 1)
        coords = np.indices(truth.shape, dtype=np.float32)
        ball = sum((coords[a] - centre[a]) ** 2 for a in range(3)) <= r * r
        ball &= truth == 0
        attached = rng.random() < 0.6
        if attached:  # a 1-voxel bridge from the organ surface to the ball
            surf = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
            for t in np.linspace(0, 1, 40):
                p = np.round(surf + t * (centre - surf)).astype(int)
                if all(0 <= p[a] < truth.shape[a] for a in range(3)) and truth[tuple(p)] == 0:
                    ball[tuple(p)] = True
        lab[ball] = organ
        info["attached"] = attached
    elif kind == "swap":
        kl, kr = ORGAN_IDS["kidney_left"], ORGAN_IDS["kidney_right"]
        lab[truth == kl] = kr
        lab[truth == kr] = kl
    elif kind == "shift":
        d = [0, 0, 0]
        d[int(rng.integers(0, 3))] = int(rng.choice([-4, -3, 3, 4]))
        moved = ndimage.shift(m.astype(np.uint8), d, order=0, mode="constant", cval=0) > 0  # no wrap-around
        lab[m & ~moved] = 0
        lab[moved & (truth == 0)] = organ
    else:
        raise ValueError(kind)
    return lab, info


def simulate_case(
    seed: int,
    *,
    size_scale: float = 1.0,
    error: str | None = None,
    shared: int | None = None,
    confidence: float | None = None,
) -> SimCase:
    """One case from ``seed`` (see module doc). ``size_scale`` < 1 shrinks the anatomy (tests);
    ``error`` forces the kind, ``shared`` how many models hold it, ``confidence`` (0..1] the
    confidence of the erring models (the random draws stay the same)."""
    rng = np.random.default_rng(seed)
    maps = bundled_label_maps()
    which = 0 if rng.random() < 0.8 else 1
    name, base, aff0 = maps[which]
    truth, affine, ct = vary_anatomy(base, aff0, rng, size_scale, bundled_cts()[which])
    truth = largest_components(truth)
    present = [k for k in ORGANS if (truth == k).sum() >= 20]
    kind = error or str(rng.choice(ERRORS))
    kl, kr = ORGAN_IDS["kidney_left"], ORGAN_IDS["kidney_right"]
    if kind == "swap" and not (kl in present and kr in present):
        kind = "leak"
    organ = kl if kind == "swap" else int(rng.choice(present))
    drawn_shared = int(rng.integers(1, 4))
    shared = drawn_shared if shared is None else int(shared)
    wrong, info = inject(truth, kind, organ, rng)
    probs: dict[int, npt.NDArray[Any]] = {}
    clean: dict[int, npt.NDArray[Any]] = {}
    sharp = rng.uniform(1.2, 2.5, 3)
    noise = [_smooth_noise(truth.shape, rng, 2.0, 1.2) for _ in range(3)]
    # the models that hold the error doubt it: their probabilities are pulled toward 0.5 where
    # their labels are wrong, p' = 0.5 + c (p - 0.5) with one confidence c per case (a smooth
    # 1-voxel Gaussian weight at the region's edge), and not cut off there
    drawn = float(rng.uniform(*ERROR_CONFIDENCE))
    confidence = drawn if confidence is None else float(confidence)
    changed = np.clip(ndimage.gaussian_filter((wrong != truth).astype(np.float32), 1.0) * 2.0, 0.0, 1.0)
    shrink = (1.0 - (1.0 - confidence) * changed).astype(np.float32)
    near = ndimage.binary_dilation(wrong != truth, iterations=2)
    info["confidence"] = round(confidence, 3)
    for k in ORGANS:
        q = np.zeros((3, *truth.shape), dtype=np.uint8)
        for m in range(3):
            q[m] = _soft(truth == k, noise[m], float(sharp[m]))
        if np.array_equal(wrong == k, truth == k):
            probs[k] = q
            continue
        clean[k] = q.copy()
        for m in range(shared):
            q[m] = _soft(wrong == k, noise[m], float(sharp[m]), near, shrink)
        probs[k] = q
    return SimCase(f"sim{seed:04d}", truth, affine, probs, kind, organ, shared, {"source": name, **info}, clean, ct)


# ----------------------------------------------------------------------------- evaluation helpers


def error_regions(
    ensemble: npt.NDArray[Any],
    clean_ensemble: npt.NDArray[Any],
    voxel_ml: float,
    majority: npt.NDArray[Any] | None = None,
) -> list[npt.NDArray[Any]]:
    """The ensemble's error regions: connected components (26) of ``ensemble XOR
    clean_ensemble`` (the ensemble of the same models, same noise, without the injected error)
    with volume >= `MIN_REGION_ML` that hold at least one voxel of ``majority`` (bool, voxels
    where the injected error changed the decision ``p > 0.5`` of a majority of the models;
    None: no such condition). Comparing with the clean ensemble rather than the truth keeps the
    models' ordinary boundary wobble out of the error; the majority rule drops the shells by
    which a single dissenting model tips a borderline mean over 0.5 (the ensemble's own
    errors are where the majority errs)."""
    err = ensemble ^ clean_ensemble
    lab, n = ndimage.label(err, structure=_CUBE)
    if n == 0:
        return []
    counts = np.bincount(lab.ravel())
    held = np.bincount(lab[majority], minlength=n + 1) if majority is not None else counts
    keep = [i for i in range(1, n + 1) if counts[i] * voxel_ml >= MIN_REGION_ML and held[i] > 0]
    return [lab == i for i in keep]


def changed_by_majority(probs: npt.NDArray[Any], clean_probs: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Bool ``(X, Y, Z)``: voxels where the decisions ``q >= 128`` of more than half of the
    models (uint8 ``(M, X, Y, Z)``) differ between ``probs`` and ``clean_probs``."""
    changed = ((probs >= 128) != (clean_probs >= 128)).sum(axis=0)
    return changed * 2 > probs.shape[0]


def case_error_regions(c: SimCase, ensembles: dict[int, npt.NDArray[Any]]) -> list[tuple[int, npt.NDArray[Any]]]:
    """(organ, region) for every error region of a case, given its ensemble masks (full grid)."""
    vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
    out: list[tuple[int, npt.NDArray[Any]]] = []
    if not c.clean_probs:
        return out
    import torch

    from atlasflow.method.attention import case_attention

    clean = case_attention(
        {k: torch.from_numpy(v) for k, v in c.clean_probs.items()}, labelled_organs=list(c.clean_probs)
    )
    for k, r in clean.organs.items():
        ens = ensembles.get(k)
        if ens is None:
            ens = np.zeros(clean.shape, dtype=bool)
        maj = changed_by_majority(c.probs[k], c.clean_probs[k])
        out += [(k, reg) for reg in error_regions(ens, r.paste("ensemble", clean.shape).numpy(), vml, maj)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-prior", action="store_true")
    ap.add_argument("--out", default=str(REPO / "services" / "atlasflow" / "method" / "plausibility_prior.json"))
    args = ap.parse_args(argv)
    if args.write_prior:
        prior = build_bundled_prior()
        prior.save(args.out)
        print(
            f"wrote {args.out}: {prior.cases} cases, volume priors for "
            f"{sorted(ORGANS[k] for k, r in prior.log_volume.items() if r.n >= 2)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
