"""The ranking-strategy contract: every registered strategy ranks a simple case through
`rank_case` (by name or as an object), the registry refuses unknown and duplicate names, and a
new strategy joins by registering itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.method import strategy as strategy_module
from atlasflow.method.attention import CaseAttention, case_attention
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import (
    RankedCase,
    RankingStrategy,
    UnknownStrategyError,
    get_strategy,
    rank_case,
    register_strategy,
    strategy_names,
)
from atlasflow.testing.synthetic import make_case

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELLED = (5,)  # the source labels the liver: not ranked


@pytest.fixture(scope="module")
def case() -> CaseAttention:
    return case_attention({k: torch.from_numpy(q) for k, q in make_case((48, 44, 36), 3, 1).items()}, LABELLED)


def test_the_built_in_strategies_are_registered_reference_first() -> None:
    assert strategy_names()[:2] == ("reference", "enhanced")


@pytest.mark.parametrize("name", strategy_names())
def test_every_registered_strategy_ranks_a_simple_case(name: str, case: CaseAttention) -> None:
    strategy = get_strategy(name)
    assert strategy is get_strategy(name)  # one shared instance
    assert strategy.name == name
    assert strategy.score_base in ("heatmap_ml", "attention_ml")
    assert isinstance(strategy.needs_whole_case, bool)
    ranked = rank_case(case, AFFINE, mode=name, prior=PopulationPrior.load())
    assert isinstance(ranked, RankedCase) and ranked.mode == name
    assert ranked.organs, f"{name}: the synthetic case's disagreements rank no organ"
    scores = [o.score for o in ranked.organs]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    assert not {o.organ for o in ranked.organs} & set(LABELLED)
    for k, (box, heat) in ranked.heatmap.items():
        att_box, att = ranked.attention[k]
        assert att_box == box and att.dtype == np.bool_ and heat.dtype == np.float32
        assert att.shape == heat.shape == tuple(s.stop - s.start for s in box)
        assert float(heat.min(initial=0.0)) >= 0.0 and float(heat.max(initial=0.0)) <= 1.0
    # the same strategy given as an object ranks the same
    again = rank_case(case, AFFINE, mode=strategy, prior=PopulationPrior.load())
    assert again.score == ranked.score and [o.organ for o in again.organs] == [o.organ for o in ranked.organs]


def test_an_unknown_name_is_refused_with_the_registered_names() -> None:
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy("fancy")
    assert isinstance(info.value, ValueError)
    assert info.value.name == "fancy" and info.value.known == strategy_names()
    assert "'fancy'" in str(info.value) and "reference" in str(info.value) and "enhanced" in str(info.value)
    with pytest.raises(ValueError, match="unknown ranking strategy 'fancy'"):
        rank_case(CaseAttention((1, 1, 1)), AFFINE, mode="fancy")


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("reference")(lambda: get_strategy("reference"))


def test_a_new_strategy_joins_by_registering(monkeypatch: pytest.MonkeyPatch, case: CaseAttention) -> None:
    monkeypatch.setattr(strategy_module, "_FACTORIES", dict(strategy_module._FACTORIES))
    monkeypatch.setattr(strategy_module, "_INSTANCES", dict(strategy_module._INSTANCES))

    @register_strategy("flat")
    class Flat:
        """Every ranked organ of the reference, scored 1."""

        name = "flat"
        score_base = "attention_ml"
        needs_whole_case = True

        def rank(self, case: CaseAttention, affine: np.ndarray, *, prior: PopulationPrior | None = None) -> RankedCase:
            ref = get_strategy("reference").rank(case, affine, prior=prior)
            for o in ref.organs:
                o.score = 1.0
            return RankedCase(self.name, float(len(ref.organs)), ref.organs, ref.attention, ref.heatmap)

    assert strategy_names()[-1] == "flat"
    flat: RankingStrategy = get_strategy("flat")
    ranked = rank_case(case, AFFINE, mode="flat")
    assert ranked.mode == "flat" and ranked.score == len(ranked.organs) > 0 and flat.name == "flat"
