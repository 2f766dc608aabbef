"""Attention arithmetic (atlasflow.method.masks morphology, atlasflow.method.attention terms) on
hand-made probability tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasflow.method.attention import organ_attention, voxel_entropy
from atlasflow.method.masks import binary_dilation, binary_erosion, binary_opening

CUBE = np.ones((3, 3, 3), dtype=bool)
SHAPE = (24, 22, 20)


def _block(sl: tuple[slice, slice, slice], value: float = 1.0) -> np.ndarray:
    a = np.zeros(SHAPE, dtype=np.float32)
    a[sl] = value
    return a


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iterations", [1, 2])
def test_morphology_matches_scipy(seed: int, iterations: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_dilation(rng.random(SHAPE) > 0.93, structure=CUBE)
    mask[0, :5, :5] = True  # touches the border: scipy's border_value=0 must be honoured
    t = torch.from_numpy(mask)
    np.testing.assert_array_equal(
        binary_erosion(t, iterations).numpy(), ndimage.binary_erosion(mask, CUBE, iterations=iterations)
    )
    np.testing.assert_array_equal(
        binary_dilation(t, iterations).numpy(), ndimage.binary_dilation(mask, CUBE, iterations=iterations)
    )
    np.testing.assert_array_equal(
        binary_opening(t, iterations).numpy(), ndimage.binary_opening(mask, CUBE, iterations=iterations)
    )


def test_identical_confident_models_attend_only_to_overlap() -> None:
    organ = _block((slice(4, 14), slice(4, 14), slice(4, 14)))
    probs = torch.from_numpy(np.stack([organ] * 3))
    overlap = np.zeros(SHAPE, dtype=bool)
    overlap[12:14, 4:14, 4:14] = True  # a neighbour's mask overlaps two slabs of this organ
    att = organ_attention(probs, torch.from_numpy(overlap))
    assert not att.std_mask.any() and not att.entropy_mask.any()
    np.testing.assert_array_equal(att.attention.numpy(), overlap)
    np.testing.assert_array_equal(att.heatmap.numpy(), overlap.astype(np.float32))


def test_identical_models_without_overlap_give_zero_attention() -> None:
    organ = _block((slice(4, 14), slice(4, 14), slice(4, 14)))
    probs = torch.from_numpy(np.stack([organ] * 3))
    att = organ_attention(probs, torch.zeros(SHAPE, dtype=torch.bool))
    assert not att.attention.any()
    assert float(att.heatmap.max()) == 0.0


def test_disagreement_is_attended_exactly_where_it_survives_the_opening() -> None:
    shared = _block((slice(2, 10), slice(2, 10), slice(2, 10)))
    extra = np.zeros(SHAPE, dtype=np.float32)
    extra[12:18, 12:18, 10:16] = 1.0  # 6x6x6 block only model 3 sees: survives 2+2 opening
    extra[2:20, 19, 19] = 1.0  # a 1-voxel-thin line only model 3 sees: removed by the opening
    probs = torch.from_numpy(np.stack([shared, shared, np.maximum(shared, extra)]))
    att = organ_attention(probs, torch.zeros(SHAPE, dtype=torch.bool))
    expected = np.zeros(SHAPE, dtype=bool)
    expected[12:18, 12:18, 10:16] = True
    np.testing.assert_array_equal(att.std_mask.numpy(), expected)
    assert not att.entropy_mask.any()  # p in {0, 1}: no entropy
    np.testing.assert_array_equal(att.attention.numpy(), expected)
    heat = att.heatmap.numpy()
    np.testing.assert_allclose(heat[expected], 1.0, rtol=1e-6)
    assert heat[~expected].max() == 0.0


def test_uncertain_agreeing_models_trigger_entropy_term_and_uint8_storage() -> None:
    sl = (slice(3, 11), slice(3, 11), slice(3, 11))
    soft = _block(sl, 0.6)  # -0.6 ln 0.6 = 0.306 > 0.05, all models agree: std = 0
    u8 = torch.from_numpy((np.stack([soft] * 3) * 255).round().astype(np.uint8))
    att = organ_attention(u8, torch.zeros(SHAPE, dtype=torch.bool))
    expected = np.zeros(SHAPE, dtype=bool)
    expected[sl] = True
    assert not att.std_mask.any()
    np.testing.assert_array_equal(att.entropy_mask.numpy(), expected)
    np.testing.assert_allclose(att.heatmap.numpy()[expected], 1.0, rtol=1e-6)
    p = 153 / 255
    np.testing.assert_allclose(float(voxel_entropy(torch.tensor(p))), -p * np.log(p), rtol=1e-6)
    assert float(voxel_entropy(torch.tensor(0.0))) == 0.0


def test_heatmap_combines_terms_and_normalises_to_one() -> None:
    a = _block((slice(2, 10), slice(2, 10), slice(2, 10)))
    b = _block((slice(2, 10), slice(2, 10), slice(2, 10)), 0.5)
    probs = torch.from_numpy(np.stack([a, a, b]))
    overlap = np.zeros(SHAPE, dtype=bool)
    overlap[2:4, 2:10, 2:10] = True
    att = organ_attention(probs, torch.from_numpy(overlap))
    p = np.array([1.0, 1.0, 0.5])
    std = p.std()
    ent = float(np.mean(-p * np.log(p)))
    inside = np.zeros(SHAPE, dtype=bool)
    inside[2:10, 2:10, 2:10] = True
    raw = np.where(inside, std + ent, 0.0) + overlap
    np.testing.assert_allclose(att.heatmap.numpy(), raw / raw.max(), rtol=1e-5, atol=1e-6)
    assert float(att.heatmap.max()) == pytest.approx(1.0)


def test_model_std_matches_numpy() -> None:
    from atlasflow.method.attention import model_std

    p = np.random.default_rng(3).random((3, 9, 8, 7)).astype(np.float32)
    np.testing.assert_allclose(model_std(torch.from_numpy(p)).numpy(), p.std(axis=0), rtol=1e-5, atol=1e-6)
