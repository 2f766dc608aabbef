"""The validation gate: a candidate ensemble replaces the current one only when it is not worse
on human-decided cases held out from training.

Input: per-case, per-organ Dice of the current and the candidate version, ``(cases, 9)``
arrays, and a boolean ``(cases, 9)`` mask of the organs a human decided (only those count).
Per organ with at least one decided held-out case: the paired differences ``candidate -
current`` are resampled over cases (seeded bootstrap, ``n_boot`` resamples) and the
percentile interval ``[alpha/2, 1 - alpha/2]`` of their mean is taken. The candidate passes
when, for every such organ, the interval's lower bound is >= ``-margin``. Otherwise it stays a
candidate and the reasons (organ, mean difference, lower bound) are recorded. No held-out case
at all is a rejection (``NO_HOLDOUT``): an unvalidated version is never promoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.organs import ORGANS


@dataclass(frozen=True)
class OrganGate:
    organ: str
    cases: int
    current_mean: float
    candidate_mean: float
    mean_diff: float
    ci_low: float
    ci_high: float
    passed: bool


@dataclass(frozen=True)
class GateResult:
    accepted: bool
    reason: str
    margin: float
    alpha: float
    n_boot: int
    seed: int
    organs: list[OrganGate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_mean_ci(
    diffs: npt.ArrayLike, *, n_boot: int, alpha: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (1-D)."""
    d = np.asarray(diffs, dtype=np.float64)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def gate(
    current: npt.ArrayLike,
    candidate: npt.ArrayLike,
    decided: npt.ArrayLike,
    *,
    margin: float = 0.01,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    organ_names: Sequence[str] | None = None,
) -> GateResult:
    """Decide whether ``candidate`` may replace ``current`` (see the module docstring)."""
    cur = np.asarray(current, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    mask = np.asarray(decided, dtype=bool)
    if cur.shape != cand.shape or cur.shape != mask.shape or cur.ndim != 2:
        raise ValueError("current, candidate and decided must be (cases, organs) arrays of one shape")
    names = list(organ_names or [ORGANS[k + 1] for k in range(cur.shape[1])])
    rng = np.random.default_rng(seed)
    organs: list[OrganGate] = []
    for k in range(cur.shape[1]):
        rows = mask[:, k]
        n = int(rows.sum())
        if n == 0:
            continue
        diffs = cand[rows, k] - cur[rows, k]
        lo, hi = bootstrap_mean_ci(diffs, n_boot=n_boot, alpha=alpha, rng=rng)
        organs.append(
            OrganGate(
                names[k],
                n,
                float(cur[rows, k].mean()),
                float(cand[rows, k].mean()),
                float(diffs.mean()),
                lo,
                hi,
                lo >= -margin,
            )
        )
    if not organs:
        return GateResult(False, "NO_HOLDOUT", margin, alpha, n_boot, seed, organs)
    failed = [o for o in organs if not o.passed]
    if failed:
        reason = "WORSE_ON:" + ",".join(f"{o.organ}(mean {o.mean_diff:+.3f}, low {o.ci_low:+.3f})" for o in failed)
        return GateResult(False, reason, margin, alpha, n_boot, seed, organs)
    return GateResult(True, "NOT_WORSE", margin, alpha, n_boot, seed, organs)


def dice(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(p, t).sum()) / s
