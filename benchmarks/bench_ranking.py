"""Ranking benchmark, leave-one-family-out (issue 18): every registered ranking strategy on
every simulator family of `atlasflow.testing.sim_families`, each family judged as held out.

    .venv/bin/python benchmarks/bench_ranking.py [--cases 40] [--families a,b] [--strategies x,y] \
        [--rounds 4] [--boot 1000] [--jobs 2] [--served-features] [--json OUT]

Per case (a family's ``simulate(seed_offset + i)``, i < --cases): the reference attention of its
soft predictions (`case_attention`, no organ labelled by the source), its error regions
(`error_sim.case_error_regions`: the ensemble against the same models without the injected
errors, components >= 1 ml that a majority of models changed), and every strategy's ranking
(the bundled population prior). A case is erroneous when it has a region; an organ is
"revised" when it holds one (revised ml = the regions' volume).

Per held-out family and strategy: case AUROC (case priority vs erroneous), R-precision
(precision among the R highest-priority cases, R = erroneous cases), first-listed-organ
accuracy (erroneous cases whose first listed organ holds an error region), each with a 95 %
percentile interval from a seeded case bootstrap (--boot resamples of the family's cases).
A strategy with a fit step (`FittableStrategy`: ``learned``) is fitted only on the OTHER
families' organ decisions; the others have nothing fitted here (``enhanced``'s constants were
tuned on error_sim, seeds 0-99 at full resolution: see the error_sim family).

Rounds (``learned`` only, --rounds R): per family, its cases in R rounds by seed; for k = 1..R-1
fit on that family's rounds 1..k (the site's own decisions) and score round k+1 against
``reference`` on the same round; below `learned.MIN_DECISIONS` it ranks as reference.
--served-features: fittable strategies see only the features the segmentation service sends
(`learned.SERVED_FEATURES`: attention, heatmap, volume, plausibility penalties, FOV cut), i.e.
what the ranking service's model is fitted on in production.

Prints one table line per (family, strategy) and a JSON summary line (``--json``: also the
per-case rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from atlasflow.method.attention import case_attention
from atlasflow.method.learned import SERVED_FEATURES
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import OrganDecision, RankedCase, get_strategy, new_strategy, strategy_names
from atlasflow.testing.detection import map_cases
from atlasflow.testing.error_sim import case_error_regions
from atlasflow.testing.sim_families import family_names, get_family

FIGURES = ("auroc", "r_precision", "first_organ")


def _fittable(name: str) -> bool:
    return hasattr(get_strategy(name), "fit")


def prepare(work: tuple[str, int, tuple[str, ...]]) -> dict[str, Any]:
    """One case row: family, seed, error, revised organs (id -> ml), per plain strategy its
    case score and organ order, per fittable strategy its organ features."""
    family, seed, strategies = work
    c = get_family(family).simulate(seed)
    ca = case_attention({k: torch.from_numpy(v) for k, v in c.probs.items()})
    regions = case_error_regions(
        c, {k: r.paste("ensemble", ca.shape).numpy() for k, r in ca.organs.items() if k in c.clean_probs}
    )
    vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
    revised: dict[int, float] = {}
    for k, reg in regions:
        revised[int(k)] = revised.get(int(k), 0.0) + float(reg.sum()) * vml
    prior = PopulationPrior.load()
    ranked: dict[str, RankedCase] = {}
    row: dict[str, Any] = {
        "family": family,
        "seed": seed,
        "error": c.error,
        "revised": {str(k): round(v, 2) for k, v in revised.items()},
        "scores": {},
        "features": {},
    }
    needed = set(strategies) | ({"reference", "enhanced"} if any(_fittable(n) for n in strategies) else set())
    for name in sorted(needed, key=lambda n: (n != "reference", n != "enhanced", n)):
        s = get_strategy(name)
        if hasattr(s, "fit"):
            continue
        ranked[name] = rc = s.rank(ca, c.affine, prior=prior)
        if name in strategies:
            row["scores"][name] = {"score": float(rc.score), "order": [int(o.organ) for o in rc.organs]}
    for name in strategies:
        s = get_strategy(name)
        if hasattr(s, "fit"):
            feats = s.organ_features(ca, c.affine, prior=prior, ranked=ranked)  # type: ignore[attr-defined]  # FittableStrategy, checked by hasattr
            row["features"][name] = {str(k): v for k, v in feats.items()}
    return row


def _kept(features: dict[str, float], keep: frozenset[str] | None) -> dict[str, float]:
    """``features`` with those outside ``keep`` at 0 (None: all kept)."""
    return features if keep is None else {n: (v if n in keep else 0.0) for n, v in features.items()}


def decisions(rows: list[dict[str, Any]], name: str, keep: frozenset[str] | None = None) -> list[OrganDecision]:
    """Every organ of ``rows`` as a reviewer's decision (revised ml from the error regions);
    ``keep``: the features the decisions carry (None: all)."""
    return [
        OrganDecision(_kept(f, keep), float(r["revised"].get(k, 0.0)))
        for r in rows
        for k, f in r["features"][name].items()
    ]


def fitted_scores(
    rows: list[dict[str, Any]], name: str, train: list[dict[str, Any]], keep: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """Case score and organ order of a fittable strategy fitted on ``train``, for ``rows``."""
    s: Any = new_strategy(name)
    s.fit(decisions(train, name, keep))
    out = []
    for r in rows:
        score, organ = s.score_organs({int(k): _kept(f, keep) for k, f in r["features"][name].items()})
        order = [k for k in sorted(organ, key=lambda k: -organ[k]) if organ[k] > 0]
        out.append({"score": float(score), "order": order, "fitted": bool(s.fitted)})
    return out


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt) / (len(pos) * len(neg))


def _r_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    r = int(labels.sum())
    if r == 0:
        return float("nan")
    order = np.lexsort((np.arange(len(scores)), -scores))[:r]  # ties: earlier case first
    return float(labels[order].mean())


def figures(scores: np.ndarray, labels: np.ndarray, first_ok: np.ndarray) -> dict[str, float]:
    pos = labels
    return {
        "auroc": _auroc(scores, labels),
        "r_precision": _r_precision(scores, labels),
        "first_organ": float(first_ok[pos].mean()) if pos.any() else float("nan"),
    }


def evaluate(ranks: list[dict[str, Any]], rows: list[dict[str, Any]], boot: int, seed: int) -> dict[str, Any]:
    """The three figures and their case-bootstrap 95 % intervals."""
    labels = np.array([bool(r["revised"]) for r in rows])
    scores = np.array([x["score"] for x in ranks], dtype=np.float64)
    first_ok = np.array([bool(x["order"]) and str(x["order"][0]) in r["revised"] for x, r in zip(ranks, rows)])
    point = figures(scores, labels, first_ok)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {f: [] for f in FIGURES}
    for _ in range(boot):
        i = rng.integers(0, len(rows), len(rows))
        for f, v in figures(scores[i], labels[i], first_ok[i]).items():
            if not math.isnan(v):
                samples[f].append(v)
    out: dict[str, Any] = {f: round(point[f], 3) for f in FIGURES}
    for f in FIGURES:
        got = samples[f]
        out[f"{f}_ci95"] = (
            [round(float(np.percentile(got, 2.5)), 3), round(float(np.percentile(got, 97.5)), 3)] if got else None
        )
    out["n"], out["erroneous"] = len(rows), int(labels.sum())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    families = tuple(args.families.split(",")) if args.families else family_names()
    strategies = tuple(args.strategies.split(",")) if args.strategies else strategy_names()
    keep = frozenset(SERVED_FEATURES) if args.served_features else None
    work = [(f, int(get_family(f).params["seed_offset"]) + i, strategies) for f in families for i in range(args.cases)]
    rows = cast(list[dict[str, Any]], map_cases(prepare, work, args.jobs))
    t_sim = time.perf_counter() - t0
    by_family = {f: [r for r in rows if r["family"] == f] for f in families}
    table: dict[str, dict[str, Any]] = {}
    for f in families:
        held = by_family[f]
        train = [r for g in families if g != f for r in by_family[g]]
        table[f] = {}
        for name in strategies:
            ranks = fitted_scores(held, name, train, keep) if _fittable(name) else [r["scores"][name] for r in held]
            table[f][name] = evaluate(ranks, held, args.boot, args.boot_seed)
            if _fittable(name):
                table[f][name]["fitted"] = all(x["fitted"] for x in ranks)
    rounds: dict[str, list[dict[str, Any]]] = {}
    fittable = [n for n in strategies if _fittable(n)]
    if args.rounds > 1 and fittable and "reference" in strategies:
        for f in families:
            held = sorted(by_family[f], key=lambda r: r["seed"])
            parts = [list(p) for p in np.array_split(np.arange(len(held)), args.rounds)]
            rounds[f] = []
            for k in range(1, args.rounds):
                train = [held[i] for p in parts[:k] for i in p]
                test = [held[i] for i in parts[k]]
                entry: dict[str, Any] = {"fit_rounds": k, "score_round": k + 1, "train_decisions": 0}
                for name in fittable:
                    ranks = fitted_scores(test, name, train, keep)
                    entry[name] = evaluate(ranks, test, 0, 0)
                    entry[name]["fitted"] = all(x["fitted"] for x in ranks)
                    entry["train_decisions"] = len(decisions(train, name, keep))
                entry["reference"] = evaluate([r["scores"]["reference"] for r in test], test, 0, 0)
                rounds[f].append(entry)
    never_worse = {
        name: all(
            table[f][name][x] >= table[f]["reference"][x] - 1e-9
            for f in families
            for x in FIGURES
            if not math.isnan(table[f][name][x]) and "reference" in table[f]
        )
        for name in strategies
    }
    return {
        "table": table,
        "rounds": rounds,
        "never_worse_than_reference": never_worse,
        "run": {
            "families": list(families),
            "strategies": list(strategies),
            "cases_per_family": args.cases,
            "served_features": bool(args.served_features),
            "boot": args.boot,
            "boot_seed": args.boot_seed,
            "simulate_s": round(t_sim, 1),
            "wall_s": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'held-out family':16s} {'strategy':10s} {'n':>3s} {'err':>3s}  "
        f"{'case AUROC [95 %]':22s} {'R-precision [95 %]':22s} {'first organ [95 %]':22s}"
    ]
    for f, by in result["table"].items():
        for name, m in by.items():
            cells = []
            for x in FIGURES:
                ci = m[f"{x}_ci95"]
                cells.append(f"{m[x]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{m[x]:.3f}")
            lines.append(f"{f:16s} {name:10s} {m['n']:3d} {m['erroneous']:3d}  " + " ".join(f"{c:22s}" for c in cells))
    lines.append(
        "never worse than reference on every held-out family and figure: "
        + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, ok in result["never_worse_than_reference"].items())
    )
    for f, entries in result["rounds"].items():
        for e in entries:
            parts = [
                f"rounds {f:16s} fit 1..{e['fit_rounds']} ({e['train_decisions']} decisions) -> round {e['score_round']}:"
            ]
            for name in [n for n in e if isinstance(e[n], dict)]:
                m = e[name]
                tag = "" if m.get("fitted", True) else " (not fitted: reference order)"
                parts.append(
                    f"{name} AUROC {m['auroc']:.3f} R-prec {m['r_precision']:.3f} first {m['first_organ']:.3f}{tag}"
                )
            lines.append("  ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40, help="cases per family")
    ap.add_argument("--families", default="", help="comma-separated (default: all registered)")
    ap.add_argument("--strategies", default="", help="comma-separated (default: all registered)")
    ap.add_argument("--rounds", type=int, default=4, help="simulated review rounds per family for fittable strategies")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--boot-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and per-case rows here")
    ap.add_argument(
        "--served-features",
        action="store_true",
        help="fittable strategies use only the features the segmentation service sends (learned.SERVED_FEATURES)",
    )
    args = ap.parse_args(argv)
    result = run(args)
    print(format_table(result))
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
