"""Attention map arithmetic for the segmentation pipeline: a thin layer over the one attention
library, `atlasflow.common.attention` (reference recipe) and `atlasflow.common.plausibility`
(enhanced attention), which the ranking tools use too.

All volumes are ``(X, Y, Z)`` on one grid (RAS voxel axes of the native CT); per-model stacks
are ``(M, X, Y, Z)``. See `atlasflow.common.attention` for the recipe, its exactness and speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from atlasflow.common.attention import (
    ENTROPY_THRESHOLD,
    OPENING_ITERATIONS,
    STD_THRESHOLD,
    Box,
    OrganAttention,
    binary_dilation,
    binary_erosion,
    binary_opening,
    bounding_box,
    case_attention,
    model_std,
    organ_attention,
    support_box,
    voxel_entropy,
)
from atlasflow.common.plausibility import PopulationPrior, rank_case

__all__ = [
    "ENTROPY_THRESHOLD",
    "OPENING_ITERATIONS",
    "STD_THRESHOLD",
    "EnhancedOrgan",
    "OrganAttention",
    "binary_dilation",
    "binary_erosion",
    "binary_opening",
    "bounding_box",
    "enhanced_attention",
    "model_std",
    "organ_attention",
    "support_box",
    "voxel_entropy",
]


@dataclass
class EnhancedOrgan:
    """Enhanced attention of one unlabelled organ on the crop ``box`` of the case grid.

    ``attention``: bool ``(*box)``; ``heatmap``: float32 ``(*box)`` in [0, 1] (0 outside the
    attention, at least 0.5 inside)."""

    box: Box
    attention: np.ndarray
    heatmap: np.ndarray


def enhanced_attention(
    probs: Mapping[int, torch.Tensor],
    affine: np.ndarray,
    labelled_organs: Iterable[int] = (),
    *,
    prior: PopulationPrior | None = None,
) -> dict[int, EnhancedOrgan]:
    """The library's enhanced attention of one case, per unlabelled organ.

    ``probs``: organ id 1..9 -> uint8 ``(M, X, Y, Z)`` soft predictions ``p*255`` of the M
    members, all on the native grid (``affine``: voxel -> RAS mm), on any torch device;
    every organ of the case (labelled ones too: their masks take part in the findings).
    Exactly `atlasflow.common.attention.case_attention` followed by
    `atlasflow.common.plausibility.rank_case` ``(mode="enhanced")``: their ``attention`` and
    ``heatmap`` crops, nothing recomputed here. ``prior`` only changes findings that are
    reasons and penalties, not the attention (default: the bundled prior).
    """
    case = case_attention(probs, labelled_organs)
    ranked = rank_case(case, affine, mode="enhanced", prior=prior)
    return {
        k: EnhancedOrgan(box, np.asarray(ranked.attention[k][1], dtype=bool), np.asarray(heat, dtype=np.float32))
        for k, (box, heat) in ranked.heatmap.items()
    }
