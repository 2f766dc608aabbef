"""Attention benchmark: `atlasflow.method.attention` (reference mode) vs the straightforward
numpy + scipy transcription (`atlasflow.testing.attention_baseline`) on one synthetic case.

    .venv/bin/python benchmarks/bench_attention.py [--shape 512 512 300] [--models 3]
        [--baseline-shape X Y Z] [--skip-baseline] [--runs 1]

The case: nine organ-like soft ellipsoids (sizes and places of the abdominal organs, some
touching so the overlap term fires), three models that disagree (jittered centres and radii,
smooth logit noise, a false-positive island in one model), uint8 ``p*255`` as the reference
stores them. Prints wall time and peak RSS growth of each, and the ratio. The baseline can run
at a smaller ``--baseline-shape`` and be scaled by the voxel count (said so in the output);
``--baseline-shape`` defaults to ``--shape`` (a real run).

``--enhanced`` also times the enhanced mode on top of the library's result at ``--shape``,
1.5 mm voxels: the whole `atlasflow.method.strategy.rank_case(..., mode="enhanced")`
(``enhanced_s``), and its suspect regions alone, torch (`suspect_regions`, the product) against
the numpy + scipy original (`atlasflow.testing.suspect_regions_numpy`) on the same organs, with the
ratio (``suspect_numpy_over_torch``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time

import numpy as np
import torch

from atlasflow.method.attention import case_attention
from atlasflow.testing.attention_baseline import reference_attention_numpy
from atlasflow.testing.synthetic import make_case


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_library(case: dict[int, np.ndarray], runs: int = 1) -> float:
    tensors = {k: torch.from_numpy(v) for k, v in case.items()}
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        res = case_attention(tensors)
        res.score()
        best = min(best, time.perf_counter() - t0)
        del res
    return best


def time_enhanced(case: dict[int, np.ndarray], runs: int = 1, spacing_mm: float = 1.5) -> dict[str, float]:
    """Best wall times (s) of `rank_case` in enhanced mode, and of the suspect regions of its
    organs by the product (torch) and by the numpy original (the reference attention computed
    before, not timed)."""
    from atlasflow.method.strategy import rank_case
    from atlasflow.method.suspect import suspect_regions
    from atlasflow.testing.suspect_regions_numpy import suspect_regions_numpy

    res = case_attention({k: torch.from_numpy(v) for k, v in case.items()})
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    vml = spacing_mm**3 / 1000.0
    organs = [(r.probs, r.ensemble) for r in res.organs.values() if r.probs is not None and r.ensemble is not None]
    best = {"enhanced_s": float("inf"), "suspect_torch_s": float("inf"), "suspect_numpy_s": float("inf")}
    for _ in range(runs):
        t0 = time.perf_counter()
        rank_case(res, affine, mode="enhanced")
        t1 = time.perf_counter()
        for q, lab in organs:
            suspect_regions(q, lab, vml)
        t2 = time.perf_counter()
        for q, lab in organs:
            suspect_regions_numpy(q.cpu().numpy(), lab.cpu().numpy(), vml)
        t3 = time.perf_counter()
        for key, dt in (("enhanced_s", t1 - t0), ("suspect_torch_s", t2 - t1), ("suspect_numpy_s", t3 - t2)):
            best[key] = min(best[key], dt)
    out = {k: round(v, 3) for k, v in best.items()}
    out["suspect_numpy_over_torch"] = round(best["suspect_numpy_s"] / best["suspect_torch_s"], 2)
    return out


def time_baseline(case: dict[int, np.ndarray]) -> float:
    t0 = time.perf_counter()
    res = reference_attention_numpy(case)
    dt = time.perf_counter() - t0
    del res
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--baseline-shape", type=int, nargs=3, default=None)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--enhanced", action="store_true", help="also time the enhanced mode (rank_case)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    case = make_case(shape, args.models)
    gen_s = time.perf_counter() - t0
    rss0 = _rss_mib()
    lib_s = time_library(case, args.runs)
    lib_rss = _rss_mib() - rss0
    report: dict[str, object] = {
        "shape": list(shape),
        "models": args.models,
        "organs": len(case),
        "generate_s": round(gen_s, 2),
        "library_s": round(lib_s, 3),
        "library_peak_rss_growth_mib": round(lib_rss, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if args.enhanced:
        report.update(time_enhanced(case, args.runs))
    if not args.skip_baseline:
        bshape = tuple(args.baseline_shape or shape)
        if bshape != shape:
            del case
            gc.collect()
            case = make_case(bshape, args.models)
        rss1 = _rss_mib()
        base_s = time_baseline(case)
        scale = float(np.prod(shape)) / float(np.prod(bshape))
        report.update(
            baseline_shape=list(bshape),
            baseline_s=round(base_s, 3),
            baseline_peak_rss_growth_mib=round(_rss_mib() - rss1, 1),
            baseline_scaled_to_shape_s=round(base_s * scale, 3),
            baseline_scaled=bshape != shape,
            ratio=round(base_s * scale / lib_s, 2),
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
