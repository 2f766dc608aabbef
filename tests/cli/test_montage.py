"""The demo montage: size, orientation (radiological view) and content, on real data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atlasflow.cli.montage import (
    CELL_PX,
    GAP_PX,
    MARGIN_PX,
    ORGAN_COLOURS,
    TITLE_H,
    axial_view,
    coronal_view,
    main,
    montage_size,
    render_montage,
    to_ras,
)
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.testing.data import TEST_DATA

REF = TEST_DATA / "totalsegmentator/tests/reference_files"
LIVER = ORGAN_IDS["liver"]
SPLEEN = ORGAN_IDS["spleen"]


@pytest.fixture(scope="module")
def real():
    ct, affine = from_nifti_bytes((REF / "example_ct.nii.gz").read_bytes())
    seg, _ = from_nifti_bytes((REF / "example_seg_fast_force_split.nii.gz").read_bytes())
    labels = totalseg_to_atlas(seg)
    heat = np.zeros(ct.shape, np.float32)
    heat[labels == ORGAN_IDS["pancreas"]] = 0.5  # hot colour map: orange
    return ct, labels, heat, affine


def test_views_are_radiological():
    """Index -> image mapping on a tiny RAS volume: patient right = image left, anterior up."""
    vol = np.zeros((3, 4, 5), np.int16)
    vol[2, 0, 1] = 1  # most RIGHT (x index max), most POSTERIOR, z=1
    img = axial_view(vol, 1)
    assert img.shape == (4, 3)  # (rows = A..P, cols = R..L)
    assert img[3, 0] == 1  # bottom row (posterior), left column (patient right)
    vol = np.zeros((3, 4, 5), np.int16)
    vol[0, 2, 4] = 1  # most LEFT, most SUPERIOR
    img = coronal_view(vol, 2)
    assert img.shape == (5, 3) and img[0, 2] == 1  # top row, right column


@pytest.mark.parametrize("flip_axes", [(), (0,), (0, 1), (2,)])
def test_to_ras_undoes_flips(flip_axes):
    vol = np.arange(24).reshape(2, 3, 4)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    flipped, faff = vol.copy(), affine.copy()
    for ax in flip_axes:  # same world content, axis stored reversed
        flipped = np.flip(flipped, ax)
        faff[:, 3] += faff[:, ax] * (vol.shape[ax] - 1)
        faff[:, ax] *= -1
    out, spacing = to_ras(flipped, faff)
    assert np.array_equal(out, vol) and list(spacing) == [2.0, 3.0, 4.0]


def _panel(png: Image.Image, col: int, row: int) -> np.ndarray:
    x = MARGIN_PX + col * (CELL_PX + GAP_PX)
    y = MARGIN_PX + TITLE_H + row * (CELL_PX + 16 + GAP_PX)
    return np.asarray(png.convert("RGB"))[y : y + CELL_PX, x : x + CELL_PX].astype(int)


def _colour_mask(panel: np.ndarray, oid: int) -> np.ndarray:
    """Pixels tinted by organ `oid`: close to the blend of its colour with some grey."""
    c = np.asarray(ORGAN_COLOURS[oid])
    tint = panel - panel.mean(axis=-1, keepdims=True)
    want = c - c.mean()
    return (np.abs(tint - 0.45 * want) < 18).all(axis=-1) & (np.abs(want) > 30).any()


@pytest.mark.parametrize("n_slices", [1, 4, 6])
def test_montage_png_size_and_orientation(tmp_path, real, n_slices):
    ct, labels, heat, affine = real
    out = render_montage(
        ct, labels, heat, affine, tmp_path / "m.png", n_slices=n_slices, title="atlasflow demo - untrained models"
    )
    png = Image.open(out)
    assert png.format == "PNG" and png.size == montage_size(n_slices)
    # Axial panels (row 0): the liver (patient right) is on the image LEFT, spleen on the right.
    liver_cols, spleen_cols = [], []
    for col in range(n_slices):
        p = _panel(png, col, 0)
        liver_cols += list(np.nonzero(_colour_mask(p, LIVER))[1])
        spleen_cols += list(np.nonzero(_colour_mask(p, SPLEEN))[1])
    assert len(liver_cols) > 100
    assert np.mean(liver_cols) < CELL_PX / 2
    if spleen_cols:
        assert np.mean(spleen_cols) > CELL_PX / 2
    # Heatmap row: orange pixels exist (pancreas at 0.5); the labelled row has none of them.
    hot_px = [0, 0]
    for row in (0, 1):
        for col in range(n_slices + 1):
            p = _panel(png, col, row)
            hot_px[row] += int(((p[..., 0] > 180) & (p[..., 1] > 70) & (p[..., 1] < 150) & (p[..., 2] < 60)).sum())
    assert hot_px[1] > 20 and hot_px[0] == 0


def test_same_picture_for_any_storage_orientation(tmp_path, real):
    ct, labels, heat, affine = real
    a = render_montage(ct, labels, heat, affine, tmp_path / "a.png", n_slices=2)
    faff = affine.copy()
    faff[:, 3] += faff[:, 0] * (ct.shape[0] - 1)
    faff[:, 0] *= -1  # stored LAS
    b = render_montage(np.flip(ct, 0), np.flip(labels, 0), np.flip(heat, 0), faff, tmp_path / "b.png", n_slices=2)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_cli_main(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    ct = np.full((20, 20, 10), 40, np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[2:8, 5:15, 2:8] = LIVER
    heat = (labels > 0).astype(np.uint8) * 255  # stored as p*255
    for name, arr in (("ct", ct), ("lab", labels), ("heat", heat)):
        (tmp_path / f"{name}.nii.gz").write_bytes(to_nifti_bytes(arr, affine))
    out = tmp_path / "out.png"
    assert (
        main(
            [
                str(tmp_path / "ct.nii.gz"),
                str(tmp_path / "lab.nii.gz"),
                str(tmp_path / "heat.nii.gz"),
                str(out),
                "--slices",
                "3",
            ]
        )
        == 0
    )
    assert Image.open(out).size == montage_size(3)


def test_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        render_montage(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), np.zeros((4, 4, 4)), np.eye(4), tmp_path / "x.png")
