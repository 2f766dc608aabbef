"""Masked Dice+CE: an undecided organ never changes the gradient (sigmoid and softmax members)."""

from __future__ import annotations

import pytest
import torch

from atlasflow.training.loss import MaskedDiceCELoss

UNDECIDED = 4  # organ id 5 (liver), row 4 of the targets


def _inputs(activation: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = 9 if activation == "sigmoid" else 10
    logits = torch.randn(2, channels, 6, 5, 4, generator=g)
    labels = torch.randint(0, 10, (2, 6, 5, 4), generator=g)
    target = torch.stack([(labels == o) for o in range(1, 10)], dim=1).float()
    weights = torch.ones(2, 9)
    weights[:, UNDECIDED] = 0.0
    weights[1, 2] = 0.5  # a pseudo-label
    return logits, target, weights


def _grad(loss_fn: MaskedDiceCELoss, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, target, weights)
    loss.backward()
    assert x.grad is not None
    return loss.detach(), x.grad


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_undecided_organ_has_zero_gradient_and_its_target_changes_nothing(activation):
    loss_fn = MaskedDiceCELoss(activation)
    logits, target, weights = _inputs(activation)
    loss, grad = _grad(loss_fn, logits, target, weights)
    channel = UNDECIDED + (1 if activation == "softmax" else 0)
    assert torch.isfinite(loss)
    assert torch.count_nonzero(grad[:, channel]) == 0
    assert torch.count_nonzero(grad) > 0
    # a different target for the undecided organ: loss and gradient bit-identical
    other = target.clone()
    other[:, UNDECIDED] = 1.0 - other[:, UNDECIDED]
    loss2, grad2 = _grad(loss_fn, logits, other, weights)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    # and different logits of that organ change nothing either
    moved = logits.clone()
    moved[:, channel] += 3.0
    loss3, grad3 = _grad(loss_fn, moved, target, weights)
    assert torch.equal(loss, loss3)
    assert torch.equal(
        torch.cat([grad[:, :channel], grad[:, channel + 1 :]], 1),
        torch.cat([grad3[:, :channel], grad3[:, channel + 1 :]], 1),
    )


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_a_decided_organ_does_change_the_loss(activation):
    """The test above can fail: the same change on a decided organ moves the loss."""
    loss_fn = MaskedDiceCELoss(activation)
    logits, target, weights = _inputs(activation)
    base = loss_fn(logits, target, weights)
    other = target.clone()
    other[:, 0] = 1.0 - other[:, 0]
    assert not torch.equal(base, loss_fn(logits, other, weights))


def test_perfect_prediction_has_low_loss_and_shapes_are_checked():
    loss_fn = MaskedDiceCELoss("sigmoid")
    _, target, weights = _inputs("sigmoid")
    perfect = (target * 2 - 1) * 20.0
    assert float(loss_fn(perfect, target, weights)) < 0.01
    with pytest.raises(ValueError):
        loss_fn(torch.zeros(2, 10, 6, 5, 4), target, weights)


def test_softmax_background_is_a_class_not_masked():
    """Background is never masked out of the softmax: a perfect softmax prediction has a low loss
    and uniform logits cost about log(classes). (Background's logit was once masked like an
    undecided organ's, which put every background voxel's CE at ~1e4 and gave the background
    logit no gradient: loss ~9442 on the benchmark's dry run.)"""
    loss_fn = MaskedDiceCELoss("softmax")
    _, target, weights = _inputs("softmax")
    # perfect in the loss's view: the undecided organ's voxels are background among the decided
    decided = target * (weights > 0).float()[:, :, None, None, None]
    labels = torch.cat([1.0 - decided.amax(1, keepdim=True), decided], 1)  # one-hot over 10 classes
    perfect = (labels * 2 - 1) * 20.0
    assert float(loss_fn(perfect, target, weights)) < 0.01
    uniform = torch.zeros(2, 10, 6, 5, 4)
    loss, grad = _grad(loss_fn, uniform, target, weights)
    assert float(loss) < 1.0 + torch.log(torch.tensor(10.0)).item()
    assert torch.count_nonzero(grad[:, 0]) > 0
