"""The worker's per-organ scores sent to ranking (`Worker._organ_attention`): heatmap ml +
plausibility penalties in reference mode, attention ml + penalties in enhanced mode, and an
organ the ensemble did not label but the models' attention flags is scored, not dropped; the
learned mode sends each organ's features."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.method.findings import organ_findings
from atlasflow.method.learned import SERVED_FEATURES
from atlasflow.method.strategy import get_strategy
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.worker import Worker
from atlasflow.testing.data import TEST_DATA

REF = TEST_DATA / "totalsegmentator/tests/reference_files"
GALL_BLADDER, LIVER = 2, 5


@pytest.fixture()
def worker(tmp_path: Path) -> Worker:
    jobs = JobStore(tmp_path)
    w = Worker(jobs, LocalBlobStore(tmp_path / "blobs"), {}, Metrics("seg-scores"), members=[])
    yield w
    jobs.close()


def test_scores_by_mode_and_unlabelled_organ(worker: Worker) -> None:
    img = nib.load(REF / "example_seg_fast_force_split.nii.gz")
    labels = totalseg_to_atlas(np.asanyarray(img.dataobj)).astype(np.uint8)
    labels[labels == GALL_BLADDER] = 0  # the ensemble missed the gall bladder ...
    heat = np.zeros(labels.shape, np.uint8)
    liver_edge = np.argwhere(labels == LIVER)[:50]
    heat[tuple(liver_edge.T)] = 200
    stats = [  # ... which the models' attention flags (Triton's exact per-organ statistics)
        {"organ": LIVER, "attention_ml": 1.35, "heatmap_ml": 1.06, "volume_ml": 1500.0},
        {"organ": GALL_BLADDER, "attention_ml": 38.0, "heatmap_ml": 20.0, "volume_ml": 0.0},
        {"organ": 9, "attention_ml": 0.0, "heatmap_ml": 0.0, "volume_ml": 300.0},
    ]
    ref = {o.organ: o for o in worker._organ_attention(stats, labels, heat, img.affine, [], get_strategy("reference"))}
    enh = {o.organ: o for o in worker._organ_attention(stats, labels, heat, img.affine, [], get_strategy("enhanced"))}
    exact = {s["organ"]: (s["attention_ml"], s["heatmap_ml"]) for s in stats}
    f = {x.organ: x for x in organ_findings(labels, heat, img.affine, worker.prior, (), exact_ml=exact)}
    penalties = f[LIVER].score - f[LIVER].heatmap_ml
    assert ref[LIVER].score == pytest.approx(1.06 + penalties)
    assert enh[LIVER].score == pytest.approx(1.35 + penalties)
    # the gall bladder is not in the labels: scored by its attention, with a reason, no pointer
    assert ref[GALL_BLADDER].HasField("score") and ref[GALL_BLADDER].score == pytest.approx(20.0)
    assert enh[GALL_BLADDER].score == pytest.approx(38.0)
    assert "not in the ensemble's labels" in ref[GALL_BLADDER].reasons[0]
    assert not ref[GALL_BLADDER].HasField("pointer")
    # labelled by the source: no score for it even with attention
    lab = {o.organ: o for o in worker._organ_attention(stats, labels, heat, img.affine, [GALL_BLADDER])}
    assert not lab[GALL_BLADDER].HasField("score")


def test_the_learned_mode_sends_each_organs_features(worker: Worker) -> None:
    """With the `learned` strategy every organ carries its served features (what ranking fits the
    site's model on); the other modes send none."""
    img = nib.load(REF / "example_seg_fast_force_split.nii.gz")
    labels = totalseg_to_atlas(np.asanyarray(img.dataobj)).astype(np.uint8)
    heat = np.zeros(labels.shape, np.uint8)
    stats = [{"organ": LIVER, "attention_ml": 12.0, "heatmap_ml": 6.0, "volume_ml": 1500.0}]
    learned = worker._organ_attention(stats, labels, heat, img.affine, [], get_strategy("learned"))[0]
    assert set(learned.features) == set(SERVED_FEATURES)
    assert learned.features["ref_attention_ml"] == pytest.approx(math.log1p(12.0))
    assert learned.features["ref_heat_share"] == pytest.approx(6.0 / 1500.0)
    assert learned.features["volume_ml"] == pytest.approx(math.log1p(1500.0))
    reference = worker._organ_attention(stats, labels, heat, img.affine, [], get_strategy("reference"))[0]
    assert not reference.features
