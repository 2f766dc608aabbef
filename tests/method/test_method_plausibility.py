"""Plausibility findings on the bundled real label maps (TotalSegmentator predictions mapped to
AbdomenAtlas ids): a clean case raises no error findings, FOV cuts are reported without
penalty, and each injected implausibility is found with its reason and a pointer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from atlasflow.common.organs import ORGAN_IDS
from atlasflow.method.findings import assess, organ_findings, pointer, slice_area_outliers
from atlasflow.method.geometry import measure_labels
from atlasflow.method.prior import PopulationPrior
from atlasflow.testing.error_sim import build_bundled_prior, bundled_label_maps

KL, KR, SPLEEN, LIVER = ORGAN_IDS["kidney_left"], ORGAN_IDS["kidney_right"], ORGAN_IDS["spleen"], ORGAN_IDS["liver"]
ERROR_CODES = {"VOLUME", "POSITION", "SIDE_SWAP", "KIDNEY_RATIO", "SLICE_AREA"}


@pytest.fixture(scope="module")
def ct() -> tuple[np.ndarray, np.ndarray]:
    _, labels, affine = bundled_label_maps()[0]  # 122x101x112, 3 mm, the demo CT's grid
    return labels, affine


def _codes(labels: np.ndarray, affine: np.ndarray) -> dict[int, set[str]]:
    return {k: {f.code for f in fs} for k, fs in assess(measure_labels(labels, affine), PopulationPrior.load()).items()}


def test_bundled_prior_file_is_what_the_builder_makes() -> None:
    built = build_bundled_prior().to_dict()
    shipped = PopulationPrior.load().to_dict()
    assert built["cases"] == shipped["cases"] == 50
    assert built["log_volume"] == shipped["log_volume"]
    assert set(shipped["log_volume"]) == {
        "gall_bladder",
        "kidney_left",
        "kidney_right",
        "pancreas",
    }  # uncut organs only


def test_clean_case_has_no_error_findings_and_reports_fov_cuts(ct: tuple[np.ndarray, np.ndarray]) -> None:
    labels, affine = ct
    codes = _codes(labels, affine)
    assert all(not (c & ERROR_CODES) for c in codes.values()), codes
    assert "FOV_CUT" in codes[LIVER] and "FOV_CUT" not in codes[KL]
    found = organ_findings(labels, np.zeros_like(labels), affine)
    cut = [o for o in found if o.organ == LIVER][0]
    assert cut.score == 0.0 and any("cut by FOV" in r for r in cut.reasons)


def test_swapped_kidneys(ct: tuple[np.ndarray, np.ndarray]) -> None:
    labels, affine = ct
    sw = labels.copy()
    sw[labels == KL], sw[labels == KR] = KR, KL
    found = organ_findings(sw, np.zeros_like(sw), affine)
    assert {found[0].organ, found[1].organ} == {KL, KR}
    assert any("swapped" in r for r in found[0].reasons)
    vb = found[0].pointer["voxel_box"]
    idx = np.argwhere(sw == found[0].organ)
    assert (vb["x_min"], vb["x_max"]) == (idx[:, 0].min(), idx[:, 0].max())


def test_shrunken_kidney_extra_component_and_slice_gap(ct: tuple[np.ndarray, np.ndarray]) -> None:
    labels, affine = ct
    lab = labels.copy()
    kl = np.argwhere(labels == KL)
    lab[(labels == KL) & (np.arange(labels.shape[2])[None, None, :] > np.percentile(kl[:, 2], 20))] = 0  # keep 20 %
    assert {"VOLUME", "KIDNEY_RATIO"} & _codes(lab, affine)[KL]
    lab = labels.copy()
    lab[5:9, 5:9, 60:64] = SPLEEN  # a detached island
    lab[(labels == KR) & (np.arange(labels.shape[2])[None, None, :] == 90)] = 0  # a missing slice
    codes = _codes(lab, affine)
    assert "COMPONENTS" in codes[SPLEEN] and "SLICE_AREA" in codes[KR]


def test_slice_area_outliers_ignore_smooth_organs() -> None:
    zz = np.arange(30)
    radius = 6 + 4 * np.sin(zz / 29 * np.pi)
    yy, xx = np.mgrid[:24, :24]
    mask = ((xx - 12) ** 2 + (yy - 12) ** 2)[:, :, None] <= radius[None, None, :] ** 2
    assert slice_area_outliers(mask, 2) == []
    mask[:, :, 15] = ndimage.binary_erosion(mask[:, :, 15], iterations=3)
    assert slice_area_outliers(mask, 2) == [15]


def test_prior_updates_and_round_trips(ct: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    labels, affine = ct
    p = PopulationPrior.load()
    before = p.log_volume[KL].n, p.log_volume[KL].mean
    big = ndimage.zoom(labels, 1.2, order=0)
    p.update_from_labels(big, affine)
    assert p.log_volume[KL].n == before[0] + 1 and p.log_volume[KL].mean > before[1]
    p.save(tmp_path / "p.json")
    assert PopulationPrior.load(tmp_path / "p.json").to_dict() == p.to_dict()


def test_pointer_world_box_and_speed(ct: tuple[np.ndarray, np.ndarray]) -> None:
    las = np.array([[-2.0, 0, 0, 100.0], [0, 2.0, 0, -50.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])
    ptr = pointer((slice(10, 20), slice(0, 5), slice(3, 4)), las, 2)
    assert ptr["voxel_box"] == {"x_min": 10, "y_min": 0, "z_min": 3, "x_max": 19, "y_max": 4, "z_max": 3}
    assert ptr["world_box"]["x_min_mm"] == 100 - 2 * 19 and ptr["world_box"]["x_max_mm"] == 80.0
    assert ptr["slices"] == {"first": 3, "last": 3}
    labels, affine = ct
    heat = np.zeros_like(labels)
    heat[labels == LIVER] = 90
    t0 = time.perf_counter()
    organ_findings(labels, heat, affine)
    assert time.perf_counter() - t0 < 2.0


def _ball_probs(with_error: list[bool], p_err: float) -> tuple[np.ndarray, np.ndarray]:
    """Three models of a ball (radius 10, 40^3 grid) whose models in ``with_error`` also label a
    6^3 block next to it, with probability ``p_err`` there; returns uint8 (3, X, Y, Z) and the
    block."""
    xx, yy, zz = np.mgrid[:40, :40, :40]
    d = np.sqrt((xx - 18.0) ** 2 + (yy - 20.0) ** 2 + (zz - 20.0) ** 2) - 10.0
    block = np.zeros((40, 40, 40), dtype=bool)
    block[29:35, 17:23, 17:23] = True
    q = np.zeros((3, 40, 40, 40), dtype=np.uint8)
    for m in range(3):
        p = 1.0 / (1.0 + np.exp(np.clip(2.0 * d, -30, 30)))
        if with_error[m]:
            p = np.where(block, p_err, p)
        q[m] = np.round(p * 255).astype(np.uint8)
    return q, block


def _vote(q: np.ndarray) -> np.ndarray:
    """The label as the recipe makes it here: each model masked to its own mask first, so the
    majority of the decisions ``p > 0.5`` wins."""
    return (q >= 128).sum(axis=0) * 2 > q.shape[0]


def test_suspect_regions_find_doubtful_majorities_and_shared_doubt_not_a_lone_dissenter() -> None:
    from atlasflow.method.suspect import SUSPECT_GROW, suspect_regions

    vml = 0.027  # 3 mm voxels: the 6^3 block is 5.8 ml
    # two doubtful models outvote a sure one: the label holds the block, and it is suspect
    q, block = _ball_probs([True, True, False], 0.7)
    label = _vote(q)
    assert label[block].all()
    att, ev = suspect_regions(q, label, vml)
    assert att[block].mean() > 0.5 and ev["contested_ml"] > 0
    # the ball's boundary is not, beyond the few voxels a kept region grows back into
    near = ndimage.binary_dilation(block, structure=np.ones((3, 3, 3), dtype=bool), iterations=2 + SUSPECT_GROW)
    assert not att[~near].any()
    # one doubtful model outvoted by two sure ones: the label is right, nothing to look at
    q, block = _ball_probs([True, False, False], 0.7)
    label = _vote(q)
    assert not label[block].any()
    att, _ = suspect_regions(q, label, vml)
    assert not att.any()
    # all three share the error but doubt it (disagreement is blind): unsure agreement
    q, block = _ball_probs([True, True, True], 0.65)
    label = _vote(q)
    att, ev = suspect_regions(q, label, vml)
    assert att[block].mean() > 0.5 and ev["unsure_ml"] > 0
    # ... and held surely by all three, it is invisible to the models' probabilities
    q, block = _ball_probs([True, True, True], 0.99)
    att, _ = suspect_regions(q, _vote(q), vml)
    assert not att.any()


def test_thin_organ_doubt_from_its_own_thinness_is_not_suspect_but_deeper_doubt_is() -> None:
    """A thin plate (4 voxels thick) of soft but right models is in the unsure band all over
    (no voxel is far from its boundary): no attention (the band rule alone flagged it; doubt
    beyond the profile in a thick organ is the shared-doubt case of the test above)."""
    from atlasflow.method.suspect import UNSURE_BAND, suspect_regions

    plate = np.zeros((50, 50, 12), dtype=bool)
    plate[5:45, 5:45, 4:8] = True
    inside = ndimage.distance_transform_edt(plate)
    outside = ndimage.distance_transform_edt(~plate)
    sd = np.where(plate, inside - 0.5, -(outside - 0.5))
    q = np.zeros((3, *plate.shape), dtype=np.uint8)
    for m, sharp in enumerate((0.6, 0.8, 1.0)):
        q[m] = np.round(255 / (1 + np.exp(-sharp * sd))).astype(np.uint8)
    label = _vote(q)
    mean = q.mean(axis=0) / 255
    in_band = (mean > UNSURE_BAND[0]) & (mean < UNSURE_BAND[1])
    assert in_band[plate].mean() > 0.5  # the band alone would flag the whole thin organ
    att, _ = suspect_regions(q, label, 0.027)
    assert not att.any()
