"""The ``enhanced`` strategy: attention where a label is likely wrong, scored in
ml-equivalents with the plausibility findings.

Per unlabelled organ: the attention is `atlasflow.method.suspect.suspect_regions` of the
models' soft predictions as given (``OrganResult.probs``; the reference masks are not used)
plus the regions of the plausibility findings listed in `ATTENTION_FINDINGS` (swapped
kidneys); every finding of the ensemble masks (`atlasflow.method.findings.assess`) is a reason
and adds its penalty: the organ score is its attention volume (ml) plus the penalties; the
heatmap is the reference heatmap inside the attention, at least 0.5, 0 outside; the pointer
covers the attention and the regions of all findings; FOV cuts are reported only. Case
priority = sum of the organ scores.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from atlasflow.common.organs import ORGANS
from atlasflow.method.attention import CaseAttention
from atlasflow.method.findings import Finding, OrganFinding, assess, finding_region
from atlasflow.method.geometry import OrganGeometry, measure_masks
from atlasflow.method.masks import Box, intersect_box, relative_box
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
from atlasflow.method.suspect import suspect_regions

#: findings whose region joins the enhanced attention (the others are reasons and score only:
#: a whole organ or its dropped components are not where a label's error lies)
ATTENTION_FINDINGS = frozenset({"SIDE_SWAP"})
#: evidence of `suspect_regions` -> how the reason names it
_EVIDENCE = (
    ("contested_ml", "outvoted models surer than the winners"),
    ("unsure_ml", "models agree but doubt"),
)


def case_findings(
    case: CaseAttention, frame: CaseFrame, prior: PopulationPrior
) -> tuple[dict[int, OrganGeometry], dict[int, list[Finding]]]:
    """Geometry and plausibility findings of the case's ensemble masks (every organ with a
    non-empty mask, labelled ones too), with their dropped components and their overlaps."""
    masks = {
        k: (r.box, r.ensemble.cpu().numpy())
        for k, r in case.organs.items()
        if r.box is not None and r.ensemble is not None and bool(r.ensemble.any())
    }
    extras: dict[int, npt.NDArray[np.bool_]] = {}
    for k in masks:
        extra = case.organs[k].ensemble_extra
        assert extra is not None
        extras[k] = extra.cpu().numpy()
    geoms = measure_masks(masks, frame.affine, case.shape, extras)
    overlaps: dict[int, dict[int, float]] = {}
    for k, (bk, mk) in masks.items():
        for j, (bj, mj) in masks.items():
            if j == k:
                continue
            inter = intersect_box(bk, bj)
            if inter is not None:
                n = int((mk[relative_box(inter, bk)] & mj[relative_box(inter, bj)]).sum())
                if n:
                    overlaps.setdefault(k, {})[j] = n * frame.voxel_ml
    return geoms, assess(geoms, prior, overlaps)


@register_strategy("enhanced")
class EnhancedStrategy:
    """Suspect regions + plausibility findings (see module doc)."""

    name = "enhanced"
    #: the worker scores an organ from its attention volume, as `rank` does
    score_base: ScoreBase = "attention_ml"
    #: findings compare organs with each other: the pipeline hands over the whole case
    needs_whole_case = True

    def rank(
        self, case: CaseAttention, affine: npt.NDArray[np.float64], *, prior: PopulationPrior | None = None
    ) -> RankedCase:
        """``prior``: for the findings (None: the bundled prior)."""
        frame = CaseFrame.of(affine)
        geoms, findings = case_findings(case, frame, prior or PopulationPrior.load())
        attention: dict[int, tuple[Box, npt.NDArray[np.bool_]]] = {}
        heatmap: dict[int, tuple[Box, npt.NDArray[np.float32]]] = {}
        organs: list[OrganFinding] = []
        for r in unranked_organs(case):
            assert r.box is not None and r.ensemble is not None
            k, att = r.organ, r.attention
            shape = tuple(r.ensemble.shape)
            h = att.heatmap.cpu().numpy() if att is not None else np.zeros(shape, dtype=np.float32)
            evidence: dict[str, float] = {}
            if r.probs is not None:
                a, evidence = suspect_regions(r.probs, r.ensemble, frame.voxel_ml)
            else:
                a = np.zeros(shape, dtype=bool)
            reasons = [
                f"{ORGANS[k]}: {label} {evidence[what]:.1f} ml"
                for what, label in _EVIDENCE
                if evidence.get(what, 0.0) > 0
            ]
            fs = findings.get(k, [])
            look = a  # where the pointer sends the reader: the attention and every finding's region
            if fs and k in geoms:
                g = geoms[k]
                inner = relative_box(g.box, r.box)
                region = finding_region(g, [f for f in fs if f.code in ATTENTION_FINDINGS])
                if region.any():
                    a = a.copy()
                    a[inner] |= region
                look = a.copy()
                look[inner] |= finding_region(g, fs)
                reasons += [f.reason for f in fs]
            h = np.where(a, np.maximum(h, np.float32(0.5)), np.float32(0)).astype(np.float32)
            score = float(a.sum()) * frame.voxel_ml + sum(f.penalty_ml for f in fs)
            attention[k] = (r.box, a)
            heatmap[k] = (r.box, h)
            organs.append(
                organ_entry(frame, r, attention=a, heatmap=h, look=look, score=score, reasons=reasons, findings=fs)
            )
        ranked = by_priority(organs)
        return RankedCase(self.name, sum(o.score for o in ranked), ranked, attention, heatmap)
