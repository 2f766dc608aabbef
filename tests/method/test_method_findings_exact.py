"""organ_findings reports and scores the pipeline's exact per-organ attention when given it."""

from __future__ import annotations

import numpy as np

from atlasflow.method.findings import organ_findings


def test_exact_ml_overrides_the_box_approximation():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:15, 5:15, 10:20] = 5  # liver
    labels[25:30, 25:30, 10:20] = 8  # spleen
    heat = np.zeros_like(labels)
    heat[4:16, 4:16, 9:21] = 255  # spills into the grown box
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    approx = {f.organ: f for f in organ_findings(labels, heat, affine)}
    exact = {f.organ: f for f in organ_findings(labels, heat, affine, exact_ml={5: (12.5, 3.25), 8: (0.0, 0.0)})}
    assert approx[5].heatmap_ml > 3.25
    assert (exact[5].attention_ml, exact[5].heatmap_ml) == (12.5, 3.25)
    assert (
        "attention 12.5 ml (heatmap 3.2 ml)" in exact[5].reasons[0]
        or "attention 12.5 ml (heatmap 3.3 ml)" in exact[5].reasons[0]
    )
    penalties = sum(f.penalty_ml for f in exact[5].findings)
    assert exact[5].score == 3.25 + penalties
