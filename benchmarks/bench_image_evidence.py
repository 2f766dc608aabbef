"""Could the CT see the errors the enhanced attention misses? A measurement, not a detector.

    .venv/bin/python benchmarks/bench_image_evidence.py [--seeds 0-99] [--jobs 2] [--json OUT]

The error simulator (atlasflow.testing.error_sim) carries the real CT under each bundled label map
through the same anatomy variation, so the injected errors sit on real intensities: a leak
into fat is visible, a boundary moved into tissue of the organ's own density is not. For
every error region of the enhanced mode (`atlasflow.testing.detection.prepare_case`, same prior),
this prints how far its intensities lie from those of its organ, in the organ's own spread:

    z = |median HU(region) - mu| / sigma

with ``mu`` / ``sigma`` the median and 1.4826 x MAD (at least `detection.SIGMA_FLOOR_HU`) of the CT,
smoothed 3x3x3, over the ensemble's label of that organ at least 2 voxels from its boundary
(what a product would have: the label it ranks, not the truth), split by whether the
attention found the region. An error region is only separable by intensity where ``z`` is
large. Two simple intensity rules are also measured over all organs of every case, as
candidate regions (components >= 1 ml after a 3x3x3 opening): "foreign inside" (label voxels
with ``|HU - mu| > 3 sigma``) and "organ-like outside" (unlabelled voxels within 4 voxels of the
label with ``|HU - mu| <= 1.5 sigma``); a candidate counts as a true positive as in the
error-detection benchmark (at least 25 % error voxels, or holding half of an error region).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from atlasflow.common.organs import ORGANS
from atlasflow.method.masks import binary_opening
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import rank_case
from atlasflow.method.suspect import _depth_bins
from atlasflow.testing.detection import map_cases, organ_intensity, parse_seeds, prepare_case, smoothed, tuning_prior

_CUBE = np.ones((3, 3, 3), dtype=bool)


def _candidates(mask: np.ndarray, err: np.ndarray, regions: list[np.ndarray], vml: float) -> tuple[int, int]:
    """(true positive, all) candidate components >= 1 ml of ``mask``."""
    lab, n = ndimage.label(mask, structure=_CUBE)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    err_counts = np.bincount(lab[err], minlength=n + 1)
    hit = np.zeros(n + 1, dtype=bool)
    for reg in regions:
        hit |= np.bincount(lab[reg], minlength=n + 1) * 2 >= int(reg.sum())
    shown = [i for i in range(1, n + 1) if counts[i] * vml >= 1.0]
    return sum(bool(hit[i] or err_counts[i] * 4 >= counts[i]) for i in shown), len(shown)


def measure_case(seed: int, prior: PopulationPrior, size_scale: float = 1.0) -> dict[str, object]:
    c, ca, regions = prepare_case(seed, size_scale)
    assert c.ct is not None
    vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
    rc = rank_case(ca, c.affine, mode="enhanced", prior=prior)
    att = np.zeros(ca.shape, dtype=bool)
    for box, a in rc.attention.values():
        att[box] |= a
    inside = np.zeros(ca.shape, dtype=bool)
    outside = np.zeros(ca.shape, dtype=bool)
    stats: dict[int, tuple[float, float]] = {}
    hu_full = smoothed(c.ct)
    for k, r in ca.organs.items():
        if r.box is None or r.ensemble is None or not bool(r.ensemble.any()):
            continue
        label = r.ensemble
        dbin = _depth_bins(label)
        hu = hu_full[r.box]
        mu, sigma = stats[k] = organ_intensity(hu, label, dbin)
        z = (hu - mu).abs() / sigma
        inside[r.box] |= binary_opening(label & (z > 3.0), 1).numpy()
        outside[r.box] |= binary_opening(~label & (dbin <= 4) & (z <= 1.5), 1).numpy()
    err = np.zeros(ca.shape, dtype=bool)
    for _, reg in regions:
        err |= reg
    hu_np = hu_full.numpy()
    rows = []
    for k, reg in regions:
        mu, sigma = stats.get(k, (float("nan"), float("nan")))
        rows.append(
            {
                "organ": ORGANS[k],
                "ml": round(float(reg.sum()) * vml, 1),
                "found": int((reg & att).sum()) * 2 >= int(reg.sum()),
                "z": round(abs(float(np.median(hu_np[reg])) - mu) / sigma, 2),
            }
        )
    regs = [reg for _, reg in regions]
    return {
        "seed": seed,
        "error": c.error,
        "shared": c.shared,
        "regions": rows,
        "inside": _candidates(inside, err, regs, vml),
        "outside": _candidates(outside, err, regs, vml),
    }


def summarise(cases: list[dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {"cases": len(cases)}
    for found in (True, False):
        z = np.array([r["z"] for c in cases for r in c["regions"] if r["found"] is found])
        key = "found" if found else "missed"
        out[key] = {
            "regions": int(z.size),
            "z_median": round(float(np.median(z)), 2) if z.size else None,
            "share_z_over_2": round(float((z > 2).mean()), 3) if z.size else None,
            "share_z_over_3": round(float((z > 3).mean()), 3) if z.size else None,
        }
    for rule in ("inside", "outside"):
        tp = sum(int(c[rule][0]) for c in cases)
        n = sum(int(c[rule][1]) for c in cases)
        out[f"rule_{rule}"] = {"candidates": n, "true_positive": tp, "precision": round(tp / n, 3) if n else None}
    return out


def _star(args: tuple[int, PopulationPrior, float]) -> dict[str, object]:
    return measure_case(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-99")
    ap.add_argument("--prior-seeds", default="0-49")
    ap.add_argument("--size-scale", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    prior = tuning_prior(parse_seeds(args.prior_seeds), args.size_scale) if args.prior_seeds else PopulationPrior.load()
    work = [(s, prior, args.size_scale) for s in parse_seeds(args.seeds)]
    cases = map_cases(_star, work, args.jobs)
    summary = summarise(cases)
    summary["run"] = {
        "seeds": args.seeds,
        "prior_seeds": args.prior_seeds,
        "size_scale": args.size_scale,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
