"""Attention map arithmetic for the segmentation pipeline: a thin re-export of the one attention
library, `atlasflow.common.attention` (which the ranking service uses too).

All volumes are ``(X, Y, Z)`` on one grid (RAS voxel axes of the native CT); per-model stacks
are ``(M, X, Y, Z)``. See `atlasflow.common.attention` for the recipe, its exactness and speed.
"""

from __future__ import annotations

from atlasflow.common.attention import (
    ENTROPY_THRESHOLD,
    OPENING_ITERATIONS,
    STD_THRESHOLD,
    OrganAttention,
    binary_dilation,
    binary_erosion,
    binary_opening,
    model_std,
    organ_attention,
    voxel_entropy,
)

__all__ = [
    "ENTROPY_THRESHOLD",
    "OPENING_ITERATIONS",
    "STD_THRESHOLD",
    "OrganAttention",
    "binary_dilation",
    "binary_erosion",
    "binary_opening",
    "model_std",
    "organ_attention",
    "voxel_entropy",
]
