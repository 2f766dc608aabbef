"""The attention library's reference mode equals the straightforward numpy + scipy version of the
recipe (atlasflow.testing.attention_baseline) on random-but-structured cases: masks exactly, the
heatmap within 1e-6; plus the partial-label template, float input and the reference ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.method.attention import case_attention
from atlasflow.method.masks import bounding_box, largest_component, support_box
from atlasflow.testing.attention_baseline import reference_attention_numpy
from atlasflow.testing.synthetic import make_case


def _random_case(seed: int, shape: tuple[int, int, int]) -> dict[int, np.ndarray]:
    """The benchmark's synthetic case plus voxel noise and random speckle (thin structures, small
    islands, values at the 0.5 / 128 boundary) so every branch of the recipe is exercised."""
    rng = np.random.default_rng(seed)
    case = make_case(shape, 3, seed)
    for k, q in case.items():
        noise = rng.integers(-25, 26, size=q.shape)
        q[:] = np.clip(q.astype(np.int16) + noise * (q > 0), 0, 255).astype(np.uint8)
        speck = rng.random(q.shape) > 0.9995
        q[speck] = rng.choice(np.array([127, 128, 255], dtype=np.uint8), size=int(speck.sum()))
        box = support_box(torch.from_numpy(q))
        if box is not None and k % 2 == seed % 2:  # one model misses the top half: disagreement
            z0 = box[2].stop - max(1, (box[2].stop - box[2].start) // 2)
            q[(2, box[0], box[1], slice(z0, box[2].stop))] = 0
    return case


@pytest.mark.parametrize("seed,labelled", [(0, ()), (1, (2, 5)), (2, (9,)), (3, ())])
def test_reference_mode_equals_numpy_scipy_baseline(seed: int, labelled: tuple[int, ...]) -> None:
    shape = (48 + seed * 3, 44, 40 - seed)
    case = _random_case(seed, shape)
    ref = reference_attention_numpy(case, labelled)
    lib = case_attention({k: torch.from_numpy(v.copy()) for k, v in case.items()}, labelled_organs=labelled)
    total = 0
    for k, r in ref.items():
        res = lib.organs[k]
        np.testing.assert_array_equal(res.paste("ensemble", lib.shape).numpy(), r["ensemble"])
        if k in labelled:
            assert res.attention is None and "attention" not in r
            continue
        for what in ("attention", "std_mask", "entropy_mask", "overlap"):
            np.testing.assert_array_equal(res.paste(what, lib.shape).numpy(), r[what], err_msg=f"{k} {what}")
        np.testing.assert_allclose(res.paste("heatmap", lib.shape).numpy(), r["heatmap"], rtol=0, atol=1e-6)
        total += int(r["attention"].sum())
    assert lib.score() == total
    assert total > 0  # the case really exercises the recipe
    assert any(r["std_mask"].any() for r in ref.values() if "std_mask" in r)
    assert any(r["overlap"].any() for r in ref.values() if "overlap" in r)
    # reference organ order: by the uint8 heatmap sums, zero-attention organs left out
    sums = {k: int(np.floor(r["heatmap"] * 255).sum()) for k, r in ref.items() if "heatmap" in r}
    expected = [k for k in sorted(sums, key=lambda k: -sums[k]) if sums[k] > 0]
    assert lib.organ_order() == expected


def test_float_input_is_rounded_to_the_reference_uint8_storage() -> None:
    case = make_case((40, 40, 36), 3, 5)
    floats = {k: v.astype(np.float32) / 255.0 for k, v in case.items()}
    a = case_attention(floats)
    b = case_attention({k: torch.from_numpy(v) for k, v in case.items()})
    for k in case:
        assert torch.equal(a.organs[k].paste("attention", a.shape), b.organs[k].paste("attention", b.shape))
    assert a.score() == b.score()


def test_boxes_and_largest_component() -> None:
    m = np.zeros((10, 11, 12), dtype=bool)
    assert bounding_box(m) is None
    m[2:4, 5, 7:9] = True
    m[8, 9, 10] = True
    assert bounding_box(m) == (slice(2, 9), slice(5, 10), slice(7, 11))
    q = np.zeros((3, 10, 11, 12), dtype=np.uint8)
    q[1, 4, 2, 3] = 1
    q[2, 6, 8, 1] = 9
    assert support_box(torch.from_numpy(q)) == (slice(4, 7), slice(2, 9), slice(1, 4))
    big, n = largest_component(torch.from_numpy(m))
    assert n == 2 and int(big.sum()) == 4
