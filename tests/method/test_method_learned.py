"""The ``learned`` strategy: reference order until enough decisions, then a calibrated model
whose scores follow what reviewers revised and whose reasons name its top features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.method import learned
from atlasflow.method.attention import CaseAttention, case_attention
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import OrganDecision, get_strategy, new_strategy, rank_case
from atlasflow.testing.synthetic import make_case

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def case() -> CaseAttention:
    return case_attention({k: torch.from_numpy(q) for k, q in make_case((48, 44, 36), 3, 1).items()}, (5,))


def _decisions(n: int, seed: int = 0) -> list[OrganDecision]:
    """Revised organs have large enhanced attention; the other features are noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        revised = bool(rng.random() < 0.3)
        f = {name: float(rng.normal(1.0, 0.5)) for name in learned.FEATURES}
        f["enh_attention_ml"] = float(rng.normal(3.0 if revised else 0.5, 0.5))
        out.append(OrganDecision(f, 5.0 if revised else 0.0))
    return out


def test_unfitted_it_ranks_as_reference(case: CaseAttention) -> None:
    s = new_strategy("learned")
    assert s is not get_strategy("learned")
    ref = rank_case(case, AFFINE, mode="reference")
    got = rank_case(case, AFFINE, mode=s, prior=PopulationPrior.load())
    assert got.mode == "learned" and got.score == ref.score
    assert [o.organ for o in got.organs] == [o.organ for o in ref.organs]
    assert all("not fitted yet" in o.reasons[0] for o in got.organs)


def test_too_few_decisions_keep_the_reference_order() -> None:
    s = learned.LearnedStrategy()
    s.fit(_decisions(learned.MIN_DECISIONS - 1))
    assert not s.fitted
    feats = {1: dict.fromkeys(learned.FEATURES, 0.0), 2: dict.fromkeys(learned.FEATURES, 0.0)}
    feats[2]["ref_heatmap_ml"] = 1.0
    _, organ = s.score_organs(feats)
    assert organ[2] > organ[1]


def test_fitted_it_scores_what_reviewers_revised_and_says_why(case: CaseAttention) -> None:
    s = learned.LearnedStrategy()
    s.fit(_decisions(300))
    assert s.fitted and s.n_decisions == 300
    test = _decisions(200, seed=1)
    _, organ = s.score_organs({i: d.features for i, d in enumerate(test)})
    p = np.array([organ[i] for i in range(len(test))])
    y = np.array([d.revised_ml > 0 for d in test])
    assert 0.0 < p.min() and p.max() < 1.0
    assert p[y].mean() > 0.7 > 0.3 > p[~y].mean()
    assert s.explain(test[0].features)[0][0] == "enh_attention_ml"
    ranked = s.rank(case, AFFINE, prior=PopulationPrior.load())
    assert ranked.organs and all("revision chance" in o.reasons[0] for o in ranked.organs)
    assert 0.0 < ranked.score < 1.0
