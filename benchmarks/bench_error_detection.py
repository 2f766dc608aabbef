"""Error-detection benchmark: do the attention maps and the case priority find the errors of
the ensemble's labels? Both modes (reference, enhanced) on simulated cases (atlasflow.testing.error_sim:
varied anatomy from the bundled labels, one injected error shared by 1, 2 or 3 of 3 models).

    .venv/bin/python benchmarks/bench_error_detection.py [--seeds 100-199] [--prior-seeds 0-49] \
        [--size-scale 1.0] [--confidence C] [--jobs 2] [--table] [--json OUT]

Protocol: tune on seeds 0-99 (0-49 since H6, 50-99 added in the third session, and
forced-kind variants of 0-49); report on seeds 100-199 (the default) and 200-299, never looked
at while tuning. ``--confidence 1.0`` simulates erring
models that are as sure of their error as of true anatomy (the simulator's behaviour before H2;
see error_sim). Metrics per mode:
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
  Both come with 95 % Wilson intervals (regions as independent trials) and case-bootstrap
  intervals (cases resampled, `case_bootstrap`), and the sensitivity with a breakdown per injected
  error kind, per number of models sharing the error and per organ (``breakdown``: [found, n]).

The prior: the bundled one, updated with the TRUE label maps of the tuning seeds 0-49
("labels stored so far"; never the evaluated cases).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from atlasflow.common.organs import ORGANS
from atlasflow.method.attention import CaseAttention
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import rank_case
from atlasflow.testing.detection import (
    auroc,
    case_bootstrap,
    map_cases,
    parse_seeds,
    precision_at,
    prepare_case,
    tuning_prior,
    wilson,
)
from atlasflow.testing.error_sim import SimCase

MODES = ("reference", "enhanced")
_CUBE = np.ones((3, 3, 3), dtype=bool)


def score_case(
    c: SimCase,
    ca: CaseAttention,
    regions: list[tuple[int, np.ndarray]],
    prior: PopulationPrior,
    modes: tuple[str, ...] = MODES,
) -> dict[str, object]:
    """One row: the case's error, its regions and, per mode, the case score, the first organ,
    which regions the attention found (``found_each``, in region order) and its shown
    components (``att_regions``) of which ``att_tp`` are true positives; ``fp`` lists the false
    positive components as (organ whose attention holds most of it, ml)."""
    vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
    err_all = np.zeros(ca.shape, dtype=bool)
    for _, reg in regions:
        err_all |= reg
    wrong_organs = {k for k, _ in regions}
    out: dict[str, object] = {
        "seed": int(c.name[3:]),
        "error": c.error,
        "organ": c.organ,
        "shared": c.shared,
        "confidence": c.extra.get("confidence"),
        "regions": len(regions),
        "region_organ": [int(k) for k, _ in regions],
        "region_ml": [round(float(r.sum()) * vml, 1) for _, r in regions],
    }
    for mode in modes:
        rc = rank_case(ca, c.affine, mode=mode, prior=prior)
        att = np.zeros(ca.shape, dtype=bool)
        for box, a in rc.attention.values():
            att[box] |= a
        found_each = [int((reg & att).sum()) * 2 >= int(reg.sum()) for _, reg in regions]
        lab, n = ndimage.label(att, structure=_CUBE)
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        err_counts = np.bincount(lab[err_all], minlength=n + 1)
        hit_region = np.zeros(n + 1, dtype=bool)
        for _, reg in regions:
            inside = np.bincount(lab[reg], minlength=n + 1)
            hit_region |= inside * 2 >= int(reg.sum())
        shown = [i for i in range(1, n + 1) if counts[i] * vml >= 1.0]
        tp_each = {i: bool(hit_region[i] or err_counts[i] * 4 >= counts[i]) for i in shown}
        fp: list[tuple[int, float]] = []
        for i in shown:
            if tp_each[i]:
                continue
            comp = lab == i
            best = max(rc.attention, key=lambda k: int((comp[rc.attention[k][0]] & rc.attention[k][1]).sum()))
            fp.append((int(best), round(float(counts[i]) * vml, 1)))
        out[mode] = {
            "score": rc.score,
            "first": rc.organs[0].organ if rc.organs else None,
            "first_wrong": bool(rc.organs) and rc.organs[0].organ in wrong_organs,
            "found": sum(found_each),
            "found_each": found_each,
            "att_regions": len(shown),
            "att_tp": sum(tp_each.values()),
            "fp": fp,
        }
    return out


def evaluate_case(
    seed: int, prior: PopulationPrior, size_scale: float, confidence: float | None = None
) -> dict[str, object]:
    return score_case(*prepare_case(seed, size_scale, confidence), prior)


def breakdown(rows: list[dict[str, object]], mode: str) -> dict[str, dict[str, list[int]]]:
    """Found / all error regions per injected error kind, per number of models sharing it and
    per organ of the region, for one mode: ``{"kind": {"leak": [found, n], ...}, ...}``."""
    out: dict[str, dict[str, list[int]]] = {"kind": {}, "shared": {}, "organ": {}}
    for r in rows:
        m = r[mode]
        for k, f in zip(r["region_organ"], m["found_each"]):
            for key, val in (("kind", r["error"]), ("shared", r["shared"]), ("organ", ORGANS[int(k)])):
                cell = out[key].setdefault(str(val), [0, 0])
                cell[0] += int(f)
                cell[1] += 1
    return out


def summarise(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    labels = [int(r["regions"]) > 0 for r in rows]
    n_pos = sum(labels)
    total_regions = sum(int(r["regions"]) for r in rows)
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        m = [r[mode] for r in rows]
        scores = [float(x["score"]) for x in m]
        att_regions = sum(int(x["att_regions"]) for x in m)
        pos_first = [bool(x["first_wrong"]) for x, y in zip(m, labels) if y]
        found = sum(int(x["found"]) for x in m)
        tp = sum(int(x["att_tp"]) for x in m)
        out[mode] = {
            "auroc": round(auroc(scores, labels), 3),
            "precision_top5pct": round(precision_at(scores, labels, math.ceil(0.05 * len(rows))), 3),
            "r_precision": round(precision_at(scores, labels, n_pos), 3) if n_pos else float("nan"),
            "first_organ_is_wrong": round(sum(pos_first) / len(pos_first), 3) if pos_first else float("nan"),
            "region_sensitivity": round(found / total_regions, 3) if total_regions else float("nan"),
            "region_sensitivity_ci95": wilson(found, total_regions),
            "region_precision": round(tp / att_regions, 3) if att_regions else float("nan"),
            "region_precision_ci95": wilson(tp, att_regions),
            "case_bootstrap_ci95": case_bootstrap(rows, mode),
            "counts": {"found": found, "regions": total_regions, "att_tp": tp, "att_regions": att_regions},
            "breakdown": breakdown(rows, mode),
        }
    out["cases"] = {"n": len(rows), "erroneous": n_pos, "regions": total_regions}
    return out


def format_table(summary: dict[str, dict[str, object]]) -> str:
    """The summary as readable lines: per mode the figures with their intervals, then the
    sensitivity per kind / sharing count / organ."""
    lines = []
    for mode in MODES:
        m = summary[mode]
        lo_s, hi_s = m["region_sensitivity_ci95"]
        lo_p, hi_p = m["region_precision_ci95"]
        c = m["counts"]
        lines.append(
            f"{mode:9s} AUROC {m['auroc']}  P@5% {m['precision_top5pct']}  R-prec {m['r_precision']}  "
            f"first-wrong {m['first_organ_is_wrong']}  sensitivity {m['region_sensitivity']} "
            f"[{lo_s}, {hi_s}] ({c['found']}/{c['regions']})  precision {m['region_precision']} "
            f"[{lo_p}, {hi_p}] ({c['att_tp']}/{c['att_regions']})"
        )
        bs = m["case_bootstrap_ci95"]
        lines.append(
            f"  case-bootstrap 95 %: sensitivity {list(bs['region_sensitivity'])}  "
            f"precision {list(bs['region_precision'])}"
        )
        for key, cells in m["breakdown"].items():
            lines.append(f"  {key:7s} " + "  ".join(f"{v}: {f}/{n}" for v, (f, n) in sorted(cells.items())))
    return "\n".join(lines)


def _evaluate_star(args: tuple[int, PopulationPrior, float, float | None]) -> dict[str, object]:
    return evaluate_case(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="100-199")
    ap.add_argument("--prior-seeds", default="0-49", help="tuning seeds whose true labels update the prior")
    ap.add_argument("--size-scale", type=float, default=1.0)
    ap.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="fix the erring models' confidence (1.0: errors held as surely as anatomy)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (cases are independent)")
    ap.add_argument("--json", type=Path, default=None, help="write per-case rows and the summary here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--table", action="store_true", help="also print a readable table before the JSON line")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    prior = tuning_prior(parse_seeds(args.prior_seeds), args.size_scale) if args.prior_seeds else PopulationPrior.load()
    work = [(s, prior, args.size_scale, args.confidence) for s in parse_seeds(args.seeds)]
    rows = map_cases(_evaluate_star, work, args.jobs)
    if args.verbose:
        for row in rows:
            print(json.dumps(row), flush=True)
    summary = summarise(rows)
    summary["run"] = {
        "seeds": args.seeds,
        "prior_seeds": args.prior_seeds,
        "size_scale": args.size_scale,
        "confidence": args.confidence,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.table:
        print(format_table(summary))
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
