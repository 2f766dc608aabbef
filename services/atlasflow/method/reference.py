"""The ``reference`` strategy: the AbdomenAtlas recipe's priority and organ order
(`atlasflow.method.attention`, steps 1-6).

Per unlabelled organ: the recipe's attention and heatmap; reasons = the volume (ml) of each
term's mask (std, entropy, overlap); score = the sum of the uint8 heatmap
``floor(heatmap*255)`` (the reference's organ order key). Case priority = total attention
voxels (the reference script's). No plausibility findings.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from atlasflow.common.organs import ORGANS
from atlasflow.method.attention import CaseAttention
from atlasflow.method.findings import OrganFinding
from atlasflow.method.masks import Box
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import (
    CaseFrame,
    RankedCase,
    ScoreBase,
    by_priority,
    organ_entry,
    register_strategy,
    unranked_organs,
)

#: reasons: (`OrganAttention` field, how the reason names it)
_TERMS = (("std_mask", "std mask"), ("entropy_mask", "entropy mask"), ("overlap", "overlap"))


@register_strategy("reference")
class ReferenceStrategy:
    """The recipe as AbdomenAtlas ranks (see module doc)."""

    name = "reference"
    #: the worker scores an organ from its heatmap volume
    score_base: ScoreBase = "heatmap_ml"
    #: the recipe's terms are per organ: the pipeline streams them organ by organ
    needs_whole_case = False

    def rank(
        self, case: CaseAttention, affine: npt.NDArray[np.float64], *, prior: PopulationPrior | None = None
    ) -> RankedCase:
        """``prior`` is not used (no plausibility findings)."""
        frame = CaseFrame.of(affine)
        attention: dict[int, tuple[Box, npt.NDArray[np.bool_]]] = {}
        heatmap: dict[int, tuple[Box, npt.NDArray[np.float32]]] = {}
        organs: list[OrganFinding] = []
        for r in unranked_organs(case):
            assert r.box is not None and r.ensemble is not None
            att = r.attention
            reasons: list[str] = []
            if att is None:
                a = np.zeros(tuple(r.ensemble.shape), dtype=bool)
                h = np.zeros(a.shape, dtype=np.float32)
            else:
                a = att.attention.cpu().numpy()
                h = att.heatmap.cpu().numpy()
                for what, label in _TERMS:
                    ml = float(getattr(att, what).sum()) * frame.voxel_ml
                    if ml > 0:
                        reasons.append(f"{ORGANS[r.organ]}: {label} {ml:.1f} ml")
            score = float(np.floor(h * 255.0).sum())  # the reference's organ order key
            attention[r.organ] = (r.box, a)
            heatmap[r.organ] = (r.box, h)
            organs.append(
                organ_entry(frame, r, attention=a, heatmap=h, look=a, score=score, reasons=reasons, findings=[])
            )
        return RankedCase(self.name, float(case.score()), by_priority(organs), attention, heatmap)
