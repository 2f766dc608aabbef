"""Dice + cross-entropy with a per-organ label mask (partial-label training).

Shapes: ``logits`` ``(N, C, X, Y, Z)`` with C = 9 (sigmoid members: channel k = organ id k + 1)
or C = 10 (softmax members: channel 0 background, channel k = organ id k); ``target``
``(N, 9, X, Y, Z)`` one-hot organ masks (float, 0/1); ``weights`` ``(N, 9)`` per-organ loss
weights (0 = organ undecided: masked out; 1 = human decision; in between = pseudo-label).

- sigmoid: per organ channel a soft Dice (MONAI ``DiceLoss(sigmoid=True, reduction="none")``)
  and a binary cross-entropy; each channel's terms are multiplied by its weight and averaged
  over the weights. A channel with weight 0 enters neither term, and its probability depends
  on its own logit only, so the gradient w.r.t. its logits is exactly zero and its target is
  never read into the result.
- softmax: the softmax is taken over background + the organs with weight > 0 only (the logits
  of weight-0 organs are replaced by a constant with ``masked_fill``, whose gradient is zero);
  background's target is "none of the decided organs", which is true whatever the undecided
  organs are (organs do not overlap). CE over that reduced class set (voxel weight = the
  voxel's decided organ weight, 1 for background) and the weighted soft Dice (MONAI
  ``DiceLoss(reduction="none")`` on the organ probabilities). This is the "exclusion" form of
  partial-label softmax training; the "marginal" form (undecided organs merged into
  background) would let undecided logits change the gradient, which we do not want.

MONAI's ``DiceCELoss`` has no per-channel mask, so its two building blocks are combined here
(``lambda_dice`` / ``lambda_ce`` as in ``DiceCELoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses.dice import DiceLoss

_MASKED_LOGIT = -1.0e4  # exp(-1e4 - max) is exactly 0 in fp32/bf16


class MaskedDiceCELoss(torch.nn.Module):
    """Weighted Dice + CE over decided organs; ``activation`` is ``"sigmoid"`` or ``"softmax"``."""

    def __init__(self, activation: str, *, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError("activation must be 'sigmoid' or 'softmax'")
        self.activation = activation
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        # per (sample, channel) Dice; smoothing as MONAI's defaults
        self._dice = DiceLoss(sigmoid=activation == "sigmoid", reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, c = int(logits.shape[0]), int(logits.shape[1])
        organs = int(target.shape[1])
        if c != organs + (1 if self.activation == "softmax" else 0) or weights.shape != (n, organs):
            raise ValueError(f"shapes do not fit: logits {tuple(logits.shape)}, target {tuple(target.shape)}")
        logits = logits.float()
        target = target.float()
        w = weights.float()
        denom = w.sum().clamp_min(1e-6)
        spatial = (1,) * (logits.dim() - 2)
        if self.activation == "sigmoid":
            dice = self._dice(logits, target).reshape(n, organs)
            # BCE per voxel; a weight-0 channel's term is multiplied by 0 and its logits get zero gradient
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(2)
            dice_term = (dice * w).sum() / denom
            ce_term = (bce * w).sum() / denom
            return self.lambda_dice * dice_term + self.lambda_ce * ce_term
        # softmax over background + decided organs
        # background (channel 0) is always a class: its column is 1, never masked
        undecided = torch.cat([torch.ones_like(w[:, :1]), w], dim=1) <= 0  # (N, C)
        masked = logits.masked_fill(undecided.view(n, c, *spatial), _MASKED_LOGIT)
        decided_target = target * (w > 0).to(target.dtype).view(n, organs, *spatial)
        background = 1.0 - decided_target.amax(dim=1, keepdim=True)
        full_target = torch.cat([background, decided_target], dim=1)
        index = full_target.argmax(dim=1)  # (N, X, Y, Z)
        voxel_w = torch.cat([torch.ones_like(w[:, :1]), w], dim=1).gather(1, index.flatten(1)).view_as(index)
        ce = F.cross_entropy(masked, index, reduction="none")
        ce_term = (ce * voxel_w).sum() / voxel_w.sum().clamp_min(1e-6)
        probs = torch.softmax(masked, dim=1)[:, 1:]
        dice = self._dice(probs, decided_target).reshape(n, organs)
        dice_term = (dice * w).sum() / denom
        return self.lambda_dice * dice_term + self.lambda_ce * ce_term
