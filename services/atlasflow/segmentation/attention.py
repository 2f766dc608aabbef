"""A ranking strategy's attention of one whole case, as the segmentation pipeline returns it:
`atlasflow.method.attention.case_attention` followed by the strategy's ``rank``
(`atlasflow.method.strategy`), the same functions the ranking tools call.

All volumes are ``(X, Y, Z)`` on one grid (RAS voxel axes of the native CT); per-model stacks
are ``(M, X, Y, Z)``. See `atlasflow.method.attention` for the recipe, its exactness and speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.method.attention import case_attention
from atlasflow.method.masks import Box
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import RankingStrategy


@dataclass
class StrategyOrgan:
    """A strategy's attention of one unlabelled organ on the crop ``box`` of the case grid.

    ``attention``: bool ``(*box)``; ``heatmap``: float32 ``(*box)`` in [0, 1] (for the
    ``enhanced`` strategy: 0 outside the attention, at least 0.5 inside)."""

    box: Box
    attention: npt.NDArray[np.bool_]
    heatmap: npt.NDArray[np.float32]


def strategy_attention(
    probs: Mapping[int, torch.Tensor],
    affine: npt.NDArray[np.float64],
    labelled_organs: Iterable[int] = (),
    *,
    strategy: RankingStrategy,
    prior: PopulationPrior | None = None,
    available: Mapping[int, Sequence[bool]] | None = None,
) -> dict[int, StrategyOrgan]:
    """The strategy's attention of one case, per unlabelled organ.

    ``probs``: organ id 1..9 -> uint8 ``(M, X, Y, Z)`` soft predictions ``p*255`` of the M
    members, all on the native grid (``affine``: voxel -> RAS mm), on any torch device;
    every organ of the case (labelled ones too: their masks take part in the findings).
    Exactly `atlasflow.method.attention.case_attention` followed by ``strategy.rank``: its
    ``attention`` and ``heatmap`` crops, nothing recomputed here. ``prior`` only changes
    findings that are reasons and penalties, not the attention (default: the bundled prior).
    ``available``: organ id -> per-member flags of a heterogeneous ensemble (imported members
    without an opinion on an organ; `case_attention`).
    """
    case = case_attention(probs, labelled_organs, available=available)
    ranked = strategy.rank(case, affine, prior=prior)
    return {
        k: StrategyOrgan(box, np.asarray(ranked.attention[k][1], dtype=bool), np.asarray(heat, dtype=np.float32))
        for k, (box, heat) in ranked.heatmap.items()
    }
