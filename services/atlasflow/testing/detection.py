"""Evaluation support of the simulated error-detection benchmarks (bench_error_detection,
bench_image_evidence) and their tests: seeds, the worker pool, the tuning prior, a prepared
simulated case (`error_sim`), the statistics reported (Mann-Whitney AUROC, precision at k,
Wilson interval, case bootstrap), and the organ intensity of the image-evidence measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.method.attention import CaseAttention, case_attention
from atlasflow.method.geometry import measure_labels
from atlasflow.method.prior import PopulationPrior
from atlasflow.testing.error_sim import SimCase, case_error_regions, simulate_case


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
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: max(k, 1)]
    return sum(labels[i] for i in order) / len(order)


def tuning_prior(seeds: list[int], size_scale: float) -> PopulationPrior:
    """The bundled prior updated with the true label maps of ``seeds`` (anatomy only: the
    models' confidence does not enter)."""
    prior = PopulationPrior.load()
    for s in seeds:
        c = simulate_case(s, size_scale=size_scale)
        prior.update(measure_labels(c.truth, c.affine))
    return prior


def prepare_case(
    seed: int, size_scale: float, confidence: float | None = None, error: str | None = None, shared: int | None = None
) -> tuple[SimCase, CaseAttention, list[tuple[int, npt.NDArray[Any]]]]:
    """The simulated case, its reference attention and its error regions (mode-independent)."""
    c = simulate_case(seed, size_scale=size_scale, confidence=confidence, error=error, shared=shared)
    ca = case_attention({k: torch.from_numpy(v) for k, v in c.probs.items()})
    regions = case_error_regions(
        c, {k: r.paste("ensemble", ca.shape).numpy() for k, r in ca.organs.items() if k in c.clean_probs}
    )
    return c, ca, regions


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n ((nan, nan) for n = 0). Regions and
    attention components are counted as independent trials: components of one case are not
    quite, so the intervals are somewhat optimistic."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return round(max(c - h, 0.0), 3), round(min(c + h, 1.0), 3)


def case_bootstrap(
    rows: list[dict[str, Any]], mode: str, n_boot: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of region sensitivity and precision from resampling CASES with
    replacement (``n_boot`` times): the regions and attention components of one case stay
    together, so the interval accounts for their dependence (a swap gives two regions per
    kidney pair) where `wilson` treats them as independent trials."""
    found = np.array([int(r[mode]["found"]) for r in rows])
    regions = np.array([int(r["regions"]) for r in rows])
    tp = np.array([int(r[mode]["att_tp"]) for r in rows])
    shown = np.array([int(r[mode]["att_regions"]) for r in rows])
    idx = np.random.default_rng(seed).integers(0, len(rows), size=(n_boot, len(rows)))
    out: dict[str, tuple[float, float]] = {}
    for key, num, den in (("region_sensitivity", found, regions), ("region_precision", tp, shown)):
        d = den[idx].sum(axis=1)
        ratios = num[idx].sum(axis=1)[d > 0] / d[d > 0]
        out[key] = (
            (round(float(np.percentile(ratios, 2.5)), 3), round(float(np.percentile(ratios, 97.5)), 3))
            if ratios.size
            else (float("nan"), float("nan"))
        )
    return out


def map_cases(fn: Callable[[Any], dict[str, object]], work: list[Any], jobs: int) -> list[dict[str, object]]:
    """``[fn(w) for w in work]``, over ``jobs`` forked worker processes (one torch thread each)
    when ``jobs`` > 1: the simulated cases are independent."""
    if jobs <= 1:
        return [fn(w) for w in work]
    import multiprocessing

    torch.set_num_threads(1)
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(fn, work, chunksize=1)


SIGMA_FLOOR_HU = 8.0


def smoothed(ct: npt.NDArray[Any]) -> torch.Tensor:
    """3x3x3 mean of the CT (edges replicated), float32."""
    t = torch.from_numpy(ct.astype(np.float32))[None, None]
    t = torch.nn.functional.pad(t, (1, 1, 1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.avg_pool3d(t, 3, stride=1)[0, 0]


def organ_intensity(hu: torch.Tensor, label: torch.Tensor, dbin: torch.Tensor) -> tuple[float, float]:
    """(mu, sigma) of ``hu`` over the label's voxels at least 2 voxels deep (all of the label if
    fewer than 50 are)."""
    core = label & (dbin >= 2)
    v = hu[core] if int(core.sum()) >= 50 else hu[label]
    mu = float(v.median())
    return mu, max(1.4826 * float((v - mu).abs().median()), SIGMA_FLOOR_HU)
