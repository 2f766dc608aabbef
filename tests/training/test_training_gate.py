"""The validation gate on synthetic per-case, per-organ Dice arrays."""

from __future__ import annotations

import numpy as np

from atlasflow.training.gate import dice, gate


def _arrays(diff: float, noise: float = 0.01, cases: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    current = rng.uniform(0.6, 0.9, size=(cases, 9))
    candidate = np.clip(current + diff + rng.normal(0, noise, size=current.shape), 0, 1)
    decided = np.zeros((cases, 9), bool)
    decided[:, [4, 7]] = True  # liver and spleen decided on every held-out case
    decided[:3, 0] = True  # aorta on three
    return current, candidate, decided


def test_better_candidate_is_accepted():
    result = gate(*_arrays(+0.05), margin=0.01, seed=1)
    assert result.accepted and result.reason == "NOT_WORSE"
    assert [o.organ for o in result.organs] == ["aorta", "liver", "spleen"]
    assert all(o.ci_low > 0 for o in result.organs)


def test_equal_candidate_within_margin_is_accepted():
    result = gate(*_arrays(0.0, noise=0.002), margin=0.01, seed=1)
    assert result.accepted


def test_worse_organ_is_rejected_with_its_reason():
    current, candidate, decided = _arrays(+0.02)
    candidate[:, 7] -= 0.1  # spleen got worse
    result = gate(current, candidate, decided, margin=0.01, seed=1)
    assert not result.accepted
    assert result.reason.startswith("WORSE_ON:spleen(")
    assert [o.organ for o in result.organs if not o.passed] == ["spleen"]


def test_undecided_organs_do_not_count():
    current, candidate, decided = _arrays(+0.02)
    candidate[:, 2] = 0.0  # kidney_left collapses, but no human decided it on these cases
    assert gate(current, candidate, decided, seed=1).accepted


def test_no_holdout_is_a_rejection_and_the_bootstrap_is_seeded():
    current, candidate, _ = _arrays(+0.05)
    result = gate(current, candidate, np.zeros_like(current, bool))
    assert not result.accepted and result.reason == "NO_HOLDOUT"
    a = gate(*_arrays(0.0), seed=3).to_dict()
    assert a == gate(*_arrays(0.0), seed=3).to_dict()


def test_dice():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == 0.5 and dice(a, a) == 1.0 and dice(~a & a, ~a & a) == 1.0
