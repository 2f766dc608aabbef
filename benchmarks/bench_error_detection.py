"""Error-detection benchmark: do the attention maps and the case priority find the errors of
the ensemble's labels? Both modes (reference, enhanced) on simulated cases (benchmarks/error_sim.py:
varied anatomy from the bundled labels, one injected error shared by 1, 2 or 3 of 3 models).

    .venv/bin/python benchmarks/bench_error_detection.py [--seeds 100-119] [--size-scale 1.0] [--json OUT]

Tune on seeds 0-9, report on seeds 100-119 (the default) and 200-219. ``--confidence 1.0``
simulates erring models that are as sure of their error as of true anatomy (the simulator's
behaviour before H2; see error_sim). Metrics per mode:
- case level (a case is erroneous when its ensemble has at least one error region): AUROC of
  the case score, precision at the top 5 % of cases (at least one case), R-precision
  (precision at R = number of erroneous cases);
- first organ: among erroneous cases, the share whose first listed organ has an error region;
- region level: an error region (connected component of the ensemble's error against the
  clean ensemble, see error_sim)
  is found when at least half of it lies inside the case's attention (union over organs);
  sensitivity = found / all regions. Precision: the attention's connected components that
  hold at least half of an error region, or whose voxels are at least 25 % error voxels,
  over all attention components of >= 1 ml (smaller specks are not shown to a reader).

The prior: the bundled one, updated with the TRUE label maps of the tuning seeds 0-9
("labels stored so far"; never the evaluated cases).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from error_sim import case_error_regions, simulate_case  # noqa: E402

from atlasflow.common.attention import case_attention  # noqa: E402
from atlasflow.common.plausibility import PopulationPrior, measure_labels, rank_case  # noqa: E402

MODES = ("reference", "enhanced")
_CUBE = np.ones((3, 3, 3), dtype=bool)


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Mann-Whitney AUROC (ties count half); NaN without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def precision_at(scores: list[float], labels: list[bool], k: int) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:max(k, 1)]
    return sum(labels[i] for i in order) / len(order)


def tuning_prior(seeds: list[int], size_scale: float) -> PopulationPrior:
    """The bundled prior updated with the true label maps of ``seeds`` (anatomy only: the
    models' confidence does not enter)."""
    prior = PopulationPrior.load()
    for s in seeds:
        c = simulate_case(s, size_scale=size_scale)
        prior.update(measure_labels(c.truth, c.affine))
    return prior


def evaluate_case(seed: int, prior: PopulationPrior, size_scale: float,
                  confidence: float | None = None) -> dict[str, object]:
    c = simulate_case(seed, size_scale=size_scale, confidence=confidence)
    vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
    ca = case_attention({k: torch.from_numpy(v) for k, v in c.probs.items()})
    regions = case_error_regions(c, {k: r.paste("ensemble", ca.shape).numpy() for k, r in ca.organs.items()
                                     if k in c.clean_probs})
    err_all = np.zeros(ca.shape, dtype=bool)
    for _, reg in regions:
        err_all |= reg
    wrong_organs = {k for k, _ in regions}
    out: dict[str, object] = {"seed": seed, "error": c.error, "organ": c.organ, "shared": c.shared,
                              "confidence": c.extra.get("confidence"),
                              "regions": len(regions), "region_ml": [round(float(r.sum()) * vml, 1) for _, r in regions]}
    for mode in MODES:
        rc = rank_case(ca, c.affine, mode=mode, prior=prior)
        att = np.zeros(ca.shape, dtype=bool)
        for box, a in rc.attention.values():
            att[box] |= a
        found = sum(int((reg & att).sum()) * 2 >= int(reg.sum()) for _, reg in regions)
        lab, n = ndimage.label(att, structure=_CUBE)
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        err_counts = np.bincount(lab[err_all], minlength=n + 1)
        hit_region = np.zeros(n + 1, dtype=bool)
        for _, reg in regions:
            inside = np.bincount(lab[reg], minlength=n + 1)
            hit_region |= inside * 2 >= int(reg.sum())
        shown = [i for i in range(1, n + 1) if counts[i] * vml >= 1.0]
        tp = sum(bool(hit_region[i] or err_counts[i] * 4 >= counts[i]) for i in shown)
        out[mode] = {"score": rc.score, "first": rc.organs[0].organ if rc.organs else None,
                     "first_wrong": bool(rc.organs) and rc.organs[0].organ in wrong_organs,
                     "found": found, "att_regions": len(shown), "att_tp": tp}
    return out


def summarise(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    labels = [int(r["regions"]) > 0 for r in rows]  # type: ignore[call-overload]
    n_pos = sum(labels)
    total_regions = sum(int(r["regions"]) for r in rows)  # type: ignore[call-overload]
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        m = [r[mode] for r in rows]
        scores = [float(x["score"]) for x in m]  # type: ignore[index]
        att_regions = sum(int(x["att_regions"]) for x in m)  # type: ignore[index]
        pos_first = [bool(x["first_wrong"]) for x, y in zip(m, labels) if y]  # type: ignore[index]
        out[mode] = {
            "auroc": round(auroc(scores, labels), 3),
            "precision_top5pct": round(precision_at(scores, labels, math.ceil(0.05 * len(rows))), 3),
            "r_precision": round(precision_at(scores, labels, n_pos), 3) if n_pos else float("nan"),
            "first_organ_is_wrong": round(sum(pos_first) / len(pos_first), 3) if pos_first else float("nan"),
            "region_sensitivity": round(sum(int(x["found"]) for x in m) / total_regions, 3) if total_regions else float("nan"),  # type: ignore[index]
            "region_precision": round(sum(int(x["att_tp"]) for x in m) / att_regions, 3) if att_regions else float("nan"),  # type: ignore[index]
        }
    out["cases"] = {"n": len(rows), "erroneous": n_pos, "regions": total_regions}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="100-119")
    ap.add_argument("--prior-seeds", default="0-9", help="tuning seeds whose true labels update the prior")
    ap.add_argument("--size-scale", type=float, default=1.0)
    ap.add_argument("--confidence", type=float, default=None,
                    help="fix the erring models' confidence (1.0: errors held as surely as anatomy)")
    ap.add_argument("--json", type=Path, default=None, help="write per-case rows and the summary here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    prior = tuning_prior(parse_seeds(args.prior_seeds), args.size_scale) if args.prior_seeds else PopulationPrior.load()
    rows = []
    for s in parse_seeds(args.seeds):
        row = evaluate_case(s, prior, args.size_scale, args.confidence)
        rows.append(row)
        if args.verbose:
            print(json.dumps(row), flush=True)
    summary = summarise(rows)
    summary["run"] = {"seeds": args.seeds, "size_scale": args.size_scale, "confidence": args.confidence, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
