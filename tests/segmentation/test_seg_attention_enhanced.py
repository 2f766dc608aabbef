"""Enhanced attention inside the segmentation pipeline (ensemble ``"attention": {"mode": "enhanced"}``).

On the real TotalSegmentator ``example_ct_sm`` (122x101x30, 3 mm): the pipeline's uint8 heatmap
and per-organ statistics equal the library's enhanced attention
(`atlasflow.method.attention.case_attention` + `atlasflow.method.strategy.rank_case`
``mode="enhanced"``) computed from the same members' full native-grid soft predictions; the
labels do not depend on the mode; the Triton path returns the same as in-process. The members
run once per module (their model-grid outputs are cached: the attention is what is tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest
import torch

from atlasflow.common.errors import InvalidArgument
from atlasflow.method.attention import case_attention
from atlasflow.method.strategy import rank_case
from atlasflow.segmentation.ensemble import ENSEMBLE_DIR, load_ensemble, parse_ensemble
from atlasflow.segmentation.outputs import PipelineOutput
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.testing.data import TEST_DATA
from atlasflow.testing.triton import LocalTriton

CT_SM = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct_sm.nii.gz"
LABELLED = [5]  # the source labels the liver: no attention for it, its mask still counts


class _CachedMembers(EnsemblePipeline):
    """The pipeline with its members' model-grid outputs cached per input (deterministic
    CPU inference; saves two of three inference passes per test run)."""

    _cache: dict[bytes, list[tuple[torch.Tensor, np.ndarray]]] = {}

    def _model_grid_probs(self, hu, aff, timings):
        key = hu.cpu().numpy().tobytes() + np.asarray(aff).tobytes()
        if key not in self._cache:
            self._cache[key] = super()._model_grid_probs(hu, aff, timings)
        return self._cache[key]


@dataclasses.dataclass
class Case:
    vol: np.ndarray
    affine: np.ndarray
    enhanced: PipelineOutput
    reference: PipelineOutput
    soft: dict[int, torch.Tensor]


@pytest.fixture(scope="module")
def case() -> Case:
    img = nib.load(str(CT_SM))
    vol = np.asarray(img.dataobj).astype(np.int16)
    affine = img.affine
    flags = np.zeros(9, dtype=np.uint8)
    flags[[k - 1 for k in LABELLED]] = 1
    pipe = _CachedMembers("abdomen-trio-v1", attention_mode="enhanced")
    enhanced = pipe(vol, affine, flags)
    soft = pipe.soft_predictions(vol, affine)
    pipe.config = dataclasses.replace(pipe.config, attention_mode="reference")
    reference = pipe(vol, affine, flags)
    return Case(vol, affine, enhanced, reference, soft)


def _library(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The library's enhanced attention from the full soft predictions -> (uint8 heatmap as
    the pipeline stores it, (9, 2) attention_ml / heatmap_ml)."""
    ranked = rank_case(case_attention(case.soft, LABELLED), case.affine, mode="enhanced")
    voxel_ml = abs(float(np.linalg.det(case.affine[:3, :3]))) / 1000.0
    heat = np.zeros(case.vol.shape, dtype=np.float32)
    stats = np.zeros((9, 2))
    for k, (box, h) in ranked.heatmap.items():
        heat[box] = np.maximum(heat[box], h)
        stats[k - 1] = (float(ranked.attention[k][1].sum()) * voxel_ml, float(h.sum(dtype=np.float64)) * voxel_ml)
    return (np.clip(heat, 0.0, 1.0) * 255.0).round().astype(np.uint8), stats


def test_pipeline_enhanced_heatmap_is_the_librarys_exactly(case: Case) -> None:
    expected_heat, expected_stats = _library(case)
    assert expected_heat.any(), "vacuous: the library attends nowhere on this CT"
    assert case.enhanced.heatmap.dtype == np.uint8 and case.enhanced.heatmap.shape == case.vol.shape
    np.testing.assert_array_equal(case.enhanced.heatmap, expected_heat)
    np.testing.assert_array_equal(case.enhanced.organ_stats[:, 1:3], expected_stats)
    assert np.all(case.enhanced.organ_stats[[k - 1 for k in LABELLED], 1:3] == 0)
    # inside the enhanced attention the heatmap is at least 0.5 (rank_case's rule)
    assert case.enhanced.heatmap[case.enhanced.heatmap > 0].min() >= 127


def test_mode_changes_the_attention_not_the_labels(case: Case) -> None:
    np.testing.assert_array_equal(case.enhanced.labels, case.reference.labels)
    np.testing.assert_array_equal(case.enhanced.organ_stats[:, [0, 3]], case.reference.organ_stats[:, [0, 3]])
    assert not np.array_equal(case.enhanced.heatmap, case.reference.heatmap)


def test_soft_predictions_are_what_the_labels_are_voted_from(case: Case) -> None:
    # every labelled voxel of organ k has the ensemble vote of k's uint8 stack (mean > 0.5)
    labels = case.enhanced.labels
    for k in range(1, 10):
        q = case.soft[k]
        assert q.dtype == torch.uint8 and tuple(q.shape) == (3, *case.vol.shape)
        vote = (q.sum(dim=0, dtype=torch.int32) * 2 > 255 * q.shape[0]).numpy()
        assert np.all(vote[labels == k]), k
    assert np.count_nonzero(labels) > 1000


# ----------------------------------------------------------------------------- config


def _raw() -> dict:
    return json.loads((ENSEMBLE_DIR / "abdomen-trio-v1.json").read_text())


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"format": 1, "attention": {"mode": "enhanced"}}, "attention"),
        ({"format": 3}, "format"),
        ({"format": 2, "attention": {"mode": "fancy"}}, "attention.mode"),
        ({"format": 2, "attention": {"mode": "enhanced", "extra": 1}}, "attention"),
        ({"format": 2, "attention": "enhanced"}, "attention"),
    ],
)
def test_attention_block_is_validated(patch: dict, field: str) -> None:
    raw = {**_raw(), **patch}
    with pytest.raises(InvalidArgument) as info:
        parse_ensemble(raw)
    assert info.value.reason == "INVALID_ENSEMBLE_CONFIG"
    assert info.value.metadata.get("field") == field


def test_attention_mode_defaults_to_reference_and_is_read() -> None:
    raw = _raw()
    raw.pop("attention", None)
    assert parse_ensemble({**raw, "format": 1}).attention_mode == "reference"
    assert parse_ensemble({k: v for k, v in raw.items() if k != "format"}).attention_mode == "reference"
    assert parse_ensemble({**raw, "format": 2, "attention": {"mode": "enhanced"}}).attention_mode == "enhanced"
    shipped = load_ensemble("abdomen-trio-v1")
    assert shipped.format == 2 and shipped.attention_mode in ("reference", "enhanced")
    with pytest.raises(InvalidArgument):
        EnsemblePipeline("abdomen-trio-v1", attention_mode="fancy")


# ----------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Triton (PyTriton) serving an enhanced-mode copy of abdomen-trio-v1 (version
    ``h7-enhanced-v1``, whatever mode the shipped file chooses)."""
    raw = _raw()
    raw.update(format=2, version="h7-enhanced-v1", attention={"mode": "enhanced"})
    for m in raw["members"]:
        m["checkpoint"] = str((ENSEMBLE_DIR / m["checkpoint"]).resolve())
    path = tmp_path_factory.mktemp("ens") / "h7-enhanced-v1.json"
    path.write_text(json.dumps(raw))
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    triton = LocalTriton(["--ensemble", str(path)], env=env).start(timeout_s=240)
    deadline = time.monotonic() + 240
    try:
        with TritonSegmenter(triton.url, "h7_enhanced_v1") as probe:
            while not probe.ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert probe.ready()
        yield triton.url
    finally:
        triton.stop()


def test_triton_enhanced_equals_in_process(case: Case, triton_url: str) -> None:
    with TritonSegmenter(triton_url, "h7_enhanced_v1") as client:
        remote = client.segment(case.vol, case.affine, labelled_organs=LABELLED)
    assert case.enhanced.heatmap.any()
    np.testing.assert_array_equal(remote.labels, case.enhanced.labels)
    np.testing.assert_array_equal(remote.heatmap, case.enhanced.heatmap)
    np.testing.assert_allclose(remote.organ_stats, case.enhanced.organ_stats, rtol=1e-12)
