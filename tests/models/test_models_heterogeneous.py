"""Heterogeneous ensembles: members with different label sets and spacings on one common grid.

Real data: TotalSegmentator's ``example_seg.nii.gz`` (its own 117-class label map, ids of
class map ``total`` v2) on ``example_ct_sm.nii.gz``'s grid (122x101x30, 3 mm, RAS) is member A.
Member B is a five-organ model (liver, spleen, kidneys, stomach; no pancreas, no vessels, no
gallbladder) whose output lies on another grid: A's organs re-sampled onto a 6 x 6 x 4.5 mm LAS
grid (flipped x, shifted origin) and its liver grown by one voxel (a disagreement to see).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.method.attention import case_attention, organ_attention
from atlasflow.method.masks import largest_component, mask_to_own_components
from atlasflow.method.strategy import get_strategy
from atlasflow.models.class_maps import TOTALSEGMENTATOR_TOTAL_V2, load_class_map, organ_channels, organ_of
from atlasflow.segmentation.heterogeneous import (
    MemberOutput,
    common_grid,
    ensemble_labels,
    heterogeneous_attention,
    native_label_maps,
    resample_nearest,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
SEG = DATA / "tests" / "reference_files" / "example_seg.nii.gz"
B_LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "stomach"}


def test_totalsegmentator_class_map_has_117_classes_and_maps_all_nine_organs() -> None:
    ts = load_class_map(TOTALSEGMENTATOR_TOTAL_V2)
    assert sorted(ts) == list(range(118)) and ts[0] == "background"
    assert len(set(ts.values())) == 118
    tsv = dict(
        (int(i), n.strip())
        for i, n in (
            line.split("\t")
            for line in (DATA / "labels_total_v2.tsv").read_text().splitlines()
            if line and not line.startswith("#")
        )
    )
    assert {k: v for k, v in ts.items() if k} == tsv
    mapped = organ_channels(ts)
    expected = {
        "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gall_bladder": 4, "liver": 5,
        "stomach": 6, "pancreas": 7, "aorta": 52, "postcava": 63,
    }  # fmt: skip
    assert {ORGANS[o]: i for o, i in mapped.items()} == expected
    assert organ_of("kidney") is None and organ_of("vertebrae_L1") is None and organ_of("Inferior-Vena-Cava") == 7


@pytest.fixture(scope="module")
def members() -> tuple[MemberOutput, MemberOutput, np.ndarray, tuple[int, int, int]]:
    img = nib.load(str(SEG))
    ts = np.asanyarray(img.dataobj).astype(np.int16)
    aff = img.affine.astype(np.float64)
    shape = (int(ts.shape[0]), int(ts.shape[1]), int(ts.shape[2]))
    a = MemberOutput("totalseg", load_class_map(TOTALSEGMENTATOR_TOTAL_V2), aff, label_map=ts)
    # B's grid: 6 x 6 x 4.5 mm, x flipped (LAS), origin off by a fraction of a voxel
    b_aff = np.diag([-6.0, 6.0, 4.5, 1.0])
    corner = aff @ np.array([shape[0] - 1, 0, 0, 1.0])
    b_aff[:3, 3] = corner[:3] + np.array([1.0, -0.7, -0.4])
    b_shape = (63, 53, 22)
    ours = np.zeros(ts.shape, dtype=np.int16)
    for b_id, name in B_LABELS.items():
        if b_id:
            ours[ts == {"liver": 5, "spleen": 1, "kidney_left": 3, "kidney_right": 2, "stomach": 6}[name]] = b_id
    b_map = resample_nearest(ours, aff, b_aff, b_shape)
    b_map[ndimage.binary_dilation(b_map == 1) & (b_map == 0)] = 1  # liver one voxel larger
    b = MemberOutput("five-organs", B_LABELS, b_aff, label_map=b_map)
    return a, b, aff, shape


def _dice(x: np.ndarray, y: np.ndarray) -> float:
    return 2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0)


def test_member_at_another_spacing_aligns_on_the_case_grid(members) -> None:
    a, b, aff, shape = members
    grid = common_grid([a, b], aff, shape)
    assert all(grid.probs[o].shape == (2, *shape) for o in ORGANS)
    ts = np.asarray(a.label_map)
    dice = {}
    for name, ts_id in (("liver", 5), ("spleen", 1), ("kidney_left", 3), ("kidney_right", 2), ("stomach", 6)):
        o = ORGAN_IDS[name]
        assert grid.available[o] == [True, True]
        np.testing.assert_array_equal(grid.probs[o][0].numpy() > 0, ts == ts_id)  # A: its own grid, exact
        dice[name] = _dice(grid.probs[o][1].numpy() > 0, ts == ts_id)
    print("\nmember B (6x6x4.5 mm LAS) vs A on the case grid, Dice:", {k: round(v, 3) for k, v in dice.items()})
    assert min(dice.values()) >= 0.75 and dice["liver"] >= 0.85
    # the same member on an exact re-orientation of the case grid (x flipped) comes back voxel-exact
    flip = aff @ np.array([[-1, 0, 0, shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flipped = MemberOutput("flipped", a.labels, flip, label_map=np.asarray(a.label_map)[::-1].copy())
    g2 = common_grid([flipped], aff, shape)
    np.testing.assert_array_equal(g2.probs[ORGAN_IDS["liver"]][0].numpy() > 0, ts == 5)
    # probabilities go through linear resampling: a constant 0.6 plane stays 0.6 inside the grid
    probs = np.zeros((6, *b.label_map.shape), dtype=np.float32)  # type: ignore[union-attr]
    probs[1] = 0.6
    g3 = common_grid([MemberOutput("soft", B_LABELS, b.affine, probs=probs)], aff, shape)
    inner = g3.probs[ORGAN_IDS["liver"]][0][10:-10, 10:-10, 5:-5]
    assert int(inner.min()) == int(inner.max()) == round(0.6 * 255)


def test_missing_organ_is_no_opinion_in_the_vote_and_the_attention(members) -> None:
    a, b, aff, shape = members
    grid = common_grid([a, b], aff, shape)
    pancreas = ORGAN_IDS["pancreas"]
    assert grid.available[pancreas] == [True, False]
    avail = grid.availability()
    assert avail.shape == (2, 9) and not avail[1, pancreas - 1] and avail[1, ORGAN_IDS["liver"] - 1]
    assert [ORGANS[o] for o in ORGANS if not grid.available[o][1]] == ["aorta", "gall_bladder", "pancreas", "postcava"]

    # soft pancreas for A (blurred), so that A alone has entropy to show
    soft = 0.75 * ndimage.gaussian_filter((np.asarray(a.label_map) == 7).astype(np.float32), 1.0)
    grid.probs[pancreas][0] = torch.from_numpy(np.clip(soft * 255.0, 0, 255).round().astype(np.uint8))

    # the vote: only A votes on the pancreas (B's zeros would halve it below 0.5)
    labels = ensemble_labels(grid)
    a_pancreas = grid.probs[pancreas][0].numpy().astype(np.int32) * 2 > 255
    assert (labels == pancreas).sum() > 0
    a_main = largest_component(torch.from_numpy(a_pancreas))[0].numpy()
    assert not ((labels == pancreas) & ~a_main).any()  # A's vote alone decides ...
    assert (labels[a_main] != 0).all()  # ... and none of it is background (only lost to overlaps)
    as_background = (grid.probs[pancreas].numpy().astype(np.int32).sum(0) * 2 > 255 * 2).sum()
    assert as_background == 0  # counted as background, the pancreas would vanish from the vote

    # the attention: the pancreas's terms are A's alone
    case = heterogeneous_attention(grid)
    res = case.organs[pancreas]
    assert res.attention is not None and res.box is not None
    q = grid.probs[pancreas][0:1][(slice(None), *res.box)].clone()
    masked = mask_to_own_components(q)
    alone = organ_attention(masked, res.attention.overlap)
    torch.testing.assert_close(res.attention.heatmap, alone.heatmap)
    assert torch.equal(res.attention.attention, alone.attention)
    assert int(res.attention.std_mask.sum()) == 0  # one opinion: no disagreement ...
    assert int(res.attention.entropy_mask.sum()) > 0  # ... but A's own uncertainty is there
    with_b = case_attention(grid.probs).organs[pancreas]  # B's zeros read as background votes
    assert with_b.attention is not None
    print(
        f"\npancreas attention voxels: A only {res.attention_voxels()}, B read as background {with_b.attention_voxels()}"
        f" (std voxels {int(with_b.attention.std_mask.sum())})"
    )
    assert int(with_b.attention.std_mask.sum()) > 0  # a disagreement that no member has
    assert not torch.equal(with_b.attention.heatmap, res.attention.heatmap)

    # organs both members predict: both take part; the pancreas stack holds A only
    liver = case.organs[ORGAN_IDS["liver"]]
    assert liver.probs is not None and liver.probs.shape[0] == 2
    assert res.probs is not None and res.probs.shape[0] == 1
    # the ranking strategies take the per-organ member counts as they come
    for mode in ("reference", "enhanced"):
        ranked = get_strategy(mode).rank(case, aff)
        assert pancreas in ranked.heatmap
    # an organ no member predicts: no support, no attention
    only_b = common_grid([b], aff, shape)
    assert heterogeneous_attention(only_b).organs[pancreas].attention is None
    assert not (ensemble_labels(only_b) == pancreas).any()


def test_native_label_maps_make_the_planes_of_common_grid(members) -> None:
    a, b, aff, shape = members
    grid = common_grid([a, b], aff, shape)
    lazy = native_label_maps([a, b], aff, shape)  # B resampled (nearest), A taken as is
    assert lazy.available == grid.available
    pancreas, liver = ORGAN_IDS["pancreas"], ORGAN_IDS["liver"]
    for o in ORGANS:
        assert torch.equal(lazy.planes(o), grid.probs[o]), ORGANS[o]
    assert torch.equal(lazy.planes(pancreas, only_available=True), grid.probs[pancreas][:1])  # B: no opinion
    box = (slice(5, 40), slice(3, 30), slice(2, 9))
    assert torch.equal(lazy.crop(box).planes(liver), grid.probs[liver][(slice(None), *box)])
