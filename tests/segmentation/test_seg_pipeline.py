"""EnsemblePipeline on small synthetic CTs: output contract, exact reorientation, resampling geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasflow.common.errors import InvalidArgument
from atlasflow.method.masks import largest_component
from atlasflow.segmentation.grid import model_grid, resample
from atlasflow.segmentation.outputs import STATS_COLUMNS, PipelineOutput, labelled_flags
from atlasflow.segmentation.pipeline import EnsemblePipeline


def _rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU: air, an elliptic soft-tissue body, a brighter 'organ' blob, a bone rod."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 30
    vol[((x - 0.3) / 0.35) ** 2 + (y / 0.3) ** 2 + ((z - 0.1) / 0.5) ** 2 < 1] = 60
    vol[(x**2 + (y + 0.5) ** 2) < 0.01] = 700
    rng = np.random.default_rng(seed)
    return (vol + rng.normal(0, 10, shape)).astype(np.int16)


# Oblique, feet-first-like (X and Z flipped) RAS affine, 2.5 x 2.5 x 3 mm.
OBLIQUE_FFS = np.eye(4)
OBLIQUE_FFS[:3, :3] = _rotation_z(17.0) @ np.diag([-2.5, 2.5, -3.0])
OBLIQUE_FFS[:3, 3] = [60.0, -40.0, 120.0]


@pytest.fixture(scope="module")
def pipeline() -> EnsemblePipeline:
    return EnsemblePipeline("abdomen-trio-v1")


@pytest.fixture(scope="module")
def oblique_result(pipeline: EnsemblePipeline) -> tuple[np.ndarray, PipelineOutput]:
    vol = _phantom((40, 34, 26))
    return vol, pipeline(vol, OBLIQUE_FFS, labelled_flags([5, 8]))


def test_output_contract_on_oblique_ffs_volume(oblique_result: tuple[np.ndarray, PipelineOutput]) -> None:
    vol, out = oblique_result
    assert out.labels.shape == vol.shape and out.labels.dtype == np.uint8
    assert out.heatmap.shape == vol.shape and out.heatmap.dtype == np.uint8
    assert int(out.labels.max()) <= 9
    assert out.organ_stats.shape == (9, len(STATS_COLUMNS)) and out.organ_stats.dtype == np.float64
    assert np.all(np.isfinite(out.organ_stats)) and np.all(out.organ_stats >= 0)
    assert out.weights_trained is True  # the shipped demo checkpoints
    voxel_ml = abs(np.linalg.det(OBLIQUE_FFS[:3, :3])) / 1000.0
    counts = np.bincount(out.labels.ravel(), minlength=10)[1:]
    np.testing.assert_allclose(out.organ_stats[:, 0], counts * voxel_ml)
    # labelled organs (liver 5, spleen 8) get no attention
    assert np.all(out.organ_stats[[4, 7], 1:3] == 0)
    # every organ with voxels has at least one component
    assert np.all(out.organ_stats[counts > 0, 3] >= 1)
    # attention volume is bounded by the whole volume
    assert np.all(out.organ_stats[:, 1] <= vol.size * voxel_ml + 1e-6)


def test_all_labelled_means_no_heatmap(
    pipeline: EnsemblePipeline, oblique_result: tuple[np.ndarray, PipelineOutput]
) -> None:
    vol, first = oblique_result
    out = pipeline(vol, OBLIQUE_FFS, np.ones(9, dtype=np.uint8))
    assert not out.heatmap.any()
    assert np.all(out.organ_stats[:, 1:3] == 0)
    np.testing.assert_array_equal(out.labels, first.labels)  # labels do not depend on the flags


def test_reorientation_round_trips_exactly(pipeline: EnsemblePipeline) -> None:
    """Same physical image stored RAS and stored as LPS with axes permuted: identical results.
    The image: the real upper-abdomen CT slab TotalSegmentator ships (example_ct_sm, RAS, 3 mm)."""
    import nibabel as nib

    from atlasflow.testing.data import TEST_DATA

    img = nib.load(TEST_DATA / "totalsegmentator/tests/reference_files/example_ct_sm.nii.gz")
    ras = np.asanyarray(img.dataobj).astype(np.int16)
    aff = img.affine
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    a = pipeline(ras, aff)
    assert a.labels.any() and a.heatmap.any()  # non-trivial output, so equality below means something
    # stored axes (Y, X, Z) with X and Y reversed: stored[i, j, k] = ras[n0-1-j, n1-1-i, k]
    stored = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(1, 0, 2))
    ijk_to_ras_idx = np.zeros((4, 4))
    ijk_to_ras_idx[0, 1] = -1
    ijk_to_ras_idx[0, 3] = ras.shape[0] - 1
    ijk_to_ras_idx[1, 0] = -1
    ijk_to_ras_idx[1, 3] = ras.shape[1] - 1
    ijk_to_ras_idx[2, 2] = 1
    ijk_to_ras_idx[3, 3] = 1
    aff_b = aff @ ijk_to_ras_idx
    b = pipeline(stored, aff_b)
    back = lambda arr: arr.transpose(1, 0, 2)[::-1, ::-1, :]  # noqa: E731
    np.testing.assert_array_equal(back(b.labels), a.labels)
    np.testing.assert_array_equal(back(b.heatmap), a.heatmap)
    np.testing.assert_allclose(b.organ_stats, a.organ_stats)


def test_resample_reproduces_linear_field_on_oblique_grid() -> None:
    """Trilinear resampling of a world-linear field is exact inside the source."""
    src_shape = (20, 18, 16)
    coef = np.array([0.3, -0.2, 0.5])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in src_shape), indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ OBLIQUE_FFS[:3, :3].T + OBLIQUE_FFS[:3, 3]
    field = (world @ coef).reshape(src_shape).astype(np.float32)
    g_aff, g_shape = model_grid(OBLIQUE_FFS, src_shape, (2.0, 2.0, 2.0))
    out = resample(torch.from_numpy(field)[None], OBLIQUE_FFS, g_aff, g_shape)[0].numpy()
    gijk = np.stack(np.meshgrid(*(np.arange(n) for n in g_shape), indexing="ij"), -1).reshape(-1, 3)
    gworld = gijk @ g_aff[:3, :3].T + g_aff[:3, 3]
    src_idx = (gworld - OBLIQUE_FFS[:3, 3]) @ np.linalg.inv(OBLIQUE_FFS[:3, :3]).T
    inside = np.all((src_idx >= 0) & (src_idx <= np.array(src_shape) - 1), axis=1)
    assert inside.sum() > 1000
    np.testing.assert_allclose(out.reshape(-1)[inside], (gworld @ coef)[inside], atol=1e-3)
    assert np.all(out.reshape(-1)[~np.all((src_idx >= -1) & (src_idx <= np.array(src_shape)), axis=1)] == 0)


def test_model_grid_covers_input_and_is_ras_aligned() -> None:
    g_aff, g_shape = model_grid(OBLIQUE_FFS, (40, 34, 26), (3.0, 3.0, 3.0))
    assert np.allclose(g_aff[:3, :3], np.diag([3.0, 3.0, 3.0]))
    corners = np.array([[i, j, k, 1] for i in (0, 39) for j in (0, 33) for k in (0, 25)]).T
    idx = (np.linalg.inv(g_aff) @ OBLIQUE_FFS @ corners)[:3]
    assert idx.min() >= -1e-6 and np.all(idx.max(axis=1) <= np.array(g_shape) - 1 + 1e-6)


def test_largest_component_uses_26_connectivity() -> None:
    m = np.zeros((8, 8, 8), dtype=bool)
    m[1, 1, 1] = m[2, 2, 2] = m[3, 3, 3] = True  # diagonal chain: one 26-connected component
    m[6, 6, 6] = True
    kept, n = largest_component(m)
    assert n == 2 and kept.sum() == 3 and not kept[6, 6, 6]


@pytest.mark.parametrize(
    ("volume", "affine", "flags", "reason"),
    [
        (np.zeros((8, 8), np.int16), np.eye(4), None, "INVALID_VOLUME"),
        (np.zeros((8, 8, 8), np.int16), np.zeros((4, 4)), None, "INVALID_AFFINE"),
        (np.zeros((8, 8, 8), np.int16), np.eye(3), None, "INVALID_AFFINE"),
        (np.zeros((8, 8, 8), np.int16), np.eye(4), np.array([1, 2, 3], np.uint8), "INVALID_LABELLED_ORGANS"),
    ],
)
def test_bad_inputs_are_invalid_argument(pipeline: EnsemblePipeline, volume, affine, flags, reason) -> None:
    with pytest.raises(InvalidArgument) as err:
        pipeline(volume, affine, flags)
    assert err.value.reason == reason


def test_labelled_flags() -> None:
    assert labelled_flags([1, 9]).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(InvalidArgument):
        labelled_flags([10])


def test_separable_resampling_matches_grid_sample_path() -> None:
    """Axis-aligned LPS-like grid at other spacing: separable path == generic trilinear path."""
    rng = np.random.default_rng(5)
    src = torch.from_numpy(rng.random((2, 17, 15, 11)).astype(np.float32))
    src_aff = np.diag([-0.8, -0.8, 2.5, 1.0])
    src_aff[:3, 3] = [10.0, 12.0, -5.0]
    g_aff, g_shape = model_grid(src_aff, (17, 15, 11), (1.5, 1.3, 1.1))
    g_aff[:3, 3] -= 0.7  # shift so the grids do not align and edges fall outside the source
    fast = resample(src, src_aff, g_aff, g_shape)
    oblique = g_aff.copy()
    oblique[:3, :3] = oblique[:3, :3] @ _rotation_z(1e-3)  # defeats the axis-aligned check
    slow = resample(src, src_aff, oblique, g_shape)
    torch.testing.assert_close(fast, slow, atol=2e-3, rtol=0)
    assert float(fast.abs().sum()) > 0
