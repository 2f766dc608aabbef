"""Attention map arithmetic (AbdomenAtlas ``create_attention.py`` recipe) in torch.

Runs on whatever device holds the probabilities (the attention map belongs next to the
models, DESIGN.md). All volumes are ``(X, Y, Z)`` on one grid (RAS voxel axes of the native CT);
per-model stacks are ``(M, X, Y, Z)``.

Per organ, given each model's soft prediction already zeroed outside a 1-voxel dilation of
that model's own post-processed mask (probabilities in [0, 1]):
- inconsistency: ``std`` over models (population std, as ``np.std``); mask = ``std > 0.1``
  then a binary opening (2 erosions, 2 dilations, 3x3x3 structuring element);
- uncertainty: mean over models of ``-p ln p`` (0 at p = 0); mask = ``entropy > 0.05``,
  same opening;
- overlap: voxels where this organ's ensemble mask overlaps another structure's mask
  (given by the caller);
- attention = union of the three masks; heatmap = ``std*std_mask + entropy*entropy_mask +
  overlap``, divided by its maximum (all-zero stays zero).

Morphology matches ``scipy.ndimage`` with ``structure=np.ones((3,3,3))`` and the default
``border_value=0`` (voxels outside the volume count as background), so a computation on a crop
that contains every non-zero voxel equals the computation on the full volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STD_THRESHOLD = 0.1
ENTROPY_THRESHOLD = 0.05
OPENING_ITERATIONS = 2


def binary_erosion(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Erode a bool ``(X, Y, Z)`` mask with a 3x3x3 cube, outside = background (scipy default)."""
    x = mask.to(torch.float32)[None, None]
    for _ in range(iterations):
        x = -F.max_pool3d(-F.pad(x, (1, 1, 1, 1, 1, 1), value=0.0), kernel_size=3, stride=1)
    return x[0, 0] > 0.5


def binary_dilation(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Dilate a bool ``(X, Y, Z)`` mask with a 3x3x3 cube (outside = background)."""
    x = mask.to(torch.float32)[None, None]
    for _ in range(iterations):
        x = F.max_pool3d(x, kernel_size=3, stride=1, padding=1)
    return x[0, 0] > 0.5


def binary_opening(mask: torch.Tensor, iterations: int = OPENING_ITERATIONS) -> torch.Tensor:
    """``iterations`` erosions then ``iterations`` dilations, 3x3x3 cube (scipy ``binary_opening``)."""
    if iterations <= 0:
        return mask.clone()
    return binary_dilation(binary_erosion(mask, iterations), iterations)


def voxel_entropy(p: torch.Tensor) -> torch.Tensor:
    """``-p ln p`` elementwise for probabilities in [0, 1] (0 where p == 0)."""
    p = p.to(torch.float32)
    return -p * torch.log(p.clamp_min(1e-12)) * (p > 0)


@dataclass
class OrganAttention:
    """Per-organ attention on one grid ``(X, Y, Z)``.

    ``attention``: bool union mask; ``heatmap``: float32 in [0, 1]; ``std_mask``,
    ``entropy_mask``: the opened masks; ``overlap``: the overlap mask used.
    """

    attention: torch.Tensor
    heatmap: torch.Tensor
    std_mask: torch.Tensor
    entropy_mask: torch.Tensor
    overlap: torch.Tensor


def organ_attention(
    probs: torch.Tensor,
    overlap: torch.Tensor,
    *,
    std_threshold: float = STD_THRESHOLD,
    entropy_threshold: float = ENTROPY_THRESHOLD,
    opening_iterations: int = OPENING_ITERATIONS,
) -> OrganAttention:
    """Attention for one organ.

    ``probs``: ``(M, X, Y, Z)`` per-model soft predictions in [0, 1] (float) or uint8
    ``p*255`` (the reference's storage), already zeroed outside each model's dilated mask.
    ``overlap``: bool ``(X, Y, Z)``.
    """
    if probs.dtype == torch.uint8:
        p = probs.to(torch.float32) / 255.0
    else:
        p = probs.to(torch.float32)
    if p.ndim != 4:
        raise ValueError("probs must be (M, X, Y, Z)")
    overlap = overlap.to(device=p.device, dtype=torch.bool)
    std = p.std(dim=0, unbiased=False) if p.shape[0] > 1 else torch.zeros_like(p[0])
    entropy = voxel_entropy(p).mean(dim=0)
    std_mask = binary_opening(std > std_threshold, opening_iterations)
    entropy_mask = binary_opening(entropy > entropy_threshold, opening_iterations)
    attention = std_mask | entropy_mask | overlap
    heatmap = std * std_mask + entropy * entropy_mask + overlap.to(torch.float32)
    peak = heatmap.max() if heatmap.numel() else torch.tensor(0.0)
    if float(peak) > 0:
        heatmap = heatmap / peak
    return OrganAttention(
        attention=attention,
        heatmap=heatmap,
        std_mask=std_mask,
        entropy_mask=entropy_mask,
        overlap=overlap,
    )
