"""The ``learned`` strategy: a small calibrated model of what reviewers revise, fitted on the
site's own decisions (issue 18).

Features per unranked organ (`features_from`, all ``log1p`` of ml unless said): the reference
terms (std mask, entropy mask, overlap, attention and heatmap volume), the enhanced strategy's
attention (suspect regions + swapped-kidney region) and score, the plausibility penalties by
finding code (VOLUME, POSITION, COMPONENTS, SLICE_AREA, OVERLAP, SIDE_SWAP, KIDNEY_RATIO), a
field-of-view cut flag, the organ's volume, and the reference heatmap's share of the volume.

Model: standardised features -> L2 logistic regression (C = 0.5, balanced class weights),
calibrated with Platt scaling over 3 folds (scikit-learn ``CalibratedClassifierCV``); the
target is "a human revised this organ" (``revised_ml > 0``). Organ score = calibrated
probability; case priority = ``1 - prod(1 - p)`` over the organs (the chance that anything in
the case needs a revision). Each organ's reasons name its top three features by contribution
(coefficient x standardised value) of an uncalibrated copy fitted on the same decisions.

Until `MIN_DECISIONS` organ decisions with at least `MIN_EACH` revised and `MIN_EACH` accepted
organs exist, it ranks exactly as ``reference`` does (organ order by heatmap, case priority by
attention), saying so in the reasons. ``fit`` replaces the model (refit each round on all
decisions so far).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.common.organs import ORGANS
from atlasflow.method.attention import CaseAttention
from atlasflow.method.findings import OrganFinding
from atlasflow.method.masks import Box
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import (
    CaseFrame,
    OrganDecision,
    RankedCase,
    ScoreBase,
    by_priority,
    get_strategy,
    register_strategy,
    unranked_organs,
)

#: organ decisions needed before the model replaces the reference order
MIN_DECISIONS = 100
#: ... of which at least this many revised and this many accepted
MIN_EACH = 10
FINDING_CODES = ("VOLUME", "POSITION", "COMPONENTS", "SLICE_AREA", "OVERLAP", "SIDE_SWAP", "KIDNEY_RATIO")
FEATURES = (
    "ref_std_ml",
    "ref_entropy_ml",
    "ref_overlap_ml",
    "ref_attention_ml",
    "ref_heatmap_ml",
    "ref_heat_share",
    "enh_attention_ml",
    "enh_score",
    *(f"pen_{c.lower()}" for c in FINDING_CODES),
    "fov_cut",
    "volume_ml",
)
_LABEL = {
    "ref_std_ml": "std mask",
    "ref_entropy_ml": "entropy mask",
    "ref_overlap_ml": "overlap",
    "ref_attention_ml": "reference attention",
    "ref_heatmap_ml": "reference heatmap",
    "ref_heat_share": "heatmap share of the organ",
    "enh_attention_ml": "enhanced attention",
    "enh_score": "enhanced score",
    "fov_cut": "cut by the field of view",
    "volume_ml": "volume",
}


def features_from(
    case: CaseAttention, affine: npt.NDArray[np.float64], ref: RankedCase, enh: RankedCase
) -> dict[int, dict[str, float]]:
    """The features (module doc) of every unranked organ from the case's ``reference`` and
    ``enhanced`` rankings."""
    frame = CaseFrame.of(affine)
    vml = frame.voxel_ml
    enh_organs = {o.organ: o for o in enh.organs}
    out: dict[int, dict[str, float]] = {}
    for r in unranked_organs(case):
        k = r.organ
        f = dict.fromkeys(FEATURES, 0.0)
        vol = float(r.ensemble.sum()) * vml if r.ensemble is not None else 0.0
        att = r.attention
        if att is not None:
            f["ref_std_ml"] = float(att.std_mask.sum()) * vml
            f["ref_entropy_ml"] = float(att.entropy_mask.sum()) * vml
            f["ref_overlap_ml"] = float(att.overlap.sum()) * vml
            f["ref_attention_ml"] = float(att.attention.sum()) * vml
            f["ref_heatmap_ml"] = float(att.heatmap.sum(dtype=torch.float64)) * vml
        f["ref_heat_share"] = f["ref_heatmap_ml"] / vol if vol > 0 else 0.0
        if k in enh.attention:
            f["enh_attention_ml"] = float(enh.attention[k][1].sum()) * vml
        o = enh_organs.get(k)
        if o is not None:
            f["enh_score"] = o.score
            for fd in o.findings:
                if fd.code in FINDING_CODES:
                    f[f"pen_{fd.code.lower()}"] += fd.penalty_ml
                elif fd.code == "FOV_CUT":
                    f["fov_cut"] = 1.0
        f["volume_ml"] = vol
        out[k] = {n: (v if n in ("fov_cut", "ref_heat_share") else math.log1p(max(v, 0.0))) for n, v in f.items()}
    return out


#: the features the segmentation service can give per organ (Triton returns attention, heatmap
#: and volume per organ, not the std/entropy/overlap split nor the enhanced ranking): the
#: others are 0 there, so a site's model is fitted on these alone
SERVED_FEATURES = (
    "ref_attention_ml",
    "ref_heatmap_ml",
    "ref_heat_share",
    *(f"pen_{c.lower()}" for c in FINDING_CODES),
    "fov_cut",
    "volume_ml",
)


def served_features(
    attention_ml: float, heatmap_ml: float, volume_ml: float, findings: Sequence[OrganFinding | None] = ()
) -> dict[str, float]:
    """`SERVED_FEATURES` of one organ from the segmentation service's statistics and its
    plausibility finding (transformed as `features_from` does: ``log1p`` of ml)."""
    f = dict.fromkeys(SERVED_FEATURES, 0.0)
    f["ref_attention_ml"], f["ref_heatmap_ml"], f["volume_ml"] = attention_ml, heatmap_ml, volume_ml
    f["ref_heat_share"] = heatmap_ml / volume_ml if volume_ml > 0 else 0.0
    for organ in findings:
        for fd in organ.findings if organ is not None else ():
            if fd.code in FINDING_CODES:
                f[f"pen_{fd.code.lower()}"] += fd.penalty_ml
            elif fd.code == "FOV_CUT":
                f["fov_cut"] = 1.0
    return {n: (v if n in ("fov_cut", "ref_heat_share") else math.log1p(max(v, 0.0))) for n, v in f.items()}


@register_strategy("learned")
class LearnedStrategy:
    """Calibrated logistic regression on reviewers' decisions (see module doc)."""

    name = "learned"
    #: the worker's organ score starts from the reference heatmap (the attention shown)
    score_base: ScoreBase = "heatmap_ml"
    #: the features compare organs (enhanced findings): the whole case
    needs_whole_case = True

    def __init__(self) -> None:
        self.model: Any = None
        self.explainer: Any = None
        self.n_decisions = 0

    @property
    def fitted(self) -> bool:
        return self.model is not None

    def organ_features(
        self,
        case: CaseAttention,
        affine: npt.NDArray[np.float64],
        *,
        prior: PopulationPrior | None = None,
        ranked: Mapping[str, RankedCase] | None = None,
    ) -> dict[int, dict[str, float]]:
        done = dict(ranked or {})
        for name in ("reference", "enhanced"):
            if name not in done:
                done[name] = get_strategy(name).rank(case, affine, prior=prior)
        return features_from(case, affine, done["reference"], done["enhanced"])

    def fit(self, decisions: Sequence[OrganDecision]) -> None:
        """Fit on ``decisions`` (all so far); below the minimum the model is cleared and the
        reference order is used."""
        y = np.array([d.revised_ml > 0 for d in decisions], dtype=bool)
        self.n_decisions = len(decisions)
        if len(y) < MIN_DECISIONS or int(y.sum()) < MIN_EACH or int((~y).sum()) < MIN_EACH:
            self.model = self.explainer = None
            return
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = np.array([[float(d.features.get(n, 0.0)) for n in FEATURES] for d in decisions], dtype=np.float64)

        def base() -> Any:
            return make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000))

        self.model = CalibratedClassifierCV(base(), method="sigmoid", cv=3).fit(x, y)
        self.explainer = base().fit(x, y)

    def score_organs(self, features: Mapping[int, Mapping[str, float]]) -> tuple[float, dict[int, float]]:
        if not features:
            return 0.0, {}
        keys = list(features)
        if self.model is None:  # the reference order: heatmap per organ, attention per case
            organ = {k: math.expm1(features[k]["ref_heatmap_ml"]) for k in keys}
            return sum(math.expm1(features[k]["ref_attention_ml"]) for k in keys), organ
        x = np.array([[float(features[k].get(n, 0.0)) for n in FEATURES] for k in keys], dtype=np.float64)
        p = self.model.predict_proba(x)[:, 1]
        organ = {k: float(v) for k, v in zip(keys, p)}
        return 1.0 - float(np.prod(1.0 - p)), organ

    def explain(self, features: Mapping[str, float], top: int = 3) -> list[tuple[str, float]]:
        """The ``top`` features by contribution to the organ's log-odds (name, contribution)."""
        if self.explainer is None:
            return []
        scaler, lr = self.explainer[0], self.explainer[-1]
        z = (np.array([float(features.get(n, 0.0)) for n in FEATURES]) - scaler.mean_) / scaler.scale_
        contrib = z * lr.coef_[0]
        order = np.argsort(-np.abs(contrib))[:top]
        return [(FEATURES[i], float(contrib[i])) for i in order]

    def rank(
        self, case: CaseAttention, affine: npt.NDArray[np.float64], *, prior: PopulationPrior | None = None
    ) -> RankedCase:
        """The reference attention and heatmap, organs and case scored by the model."""
        ref = get_strategy("reference").rank(case, affine, prior=prior)
        feats = self.organ_features(case, affine, prior=prior, ranked={"reference": ref})
        score, organ_scores = self.score_organs(feats)
        by_organ = {o.organ: o for o in ref.organs}
        frame = CaseFrame.of(affine)
        organs: list[OrganFinding] = []
        for k, s in organ_scores.items():
            base = by_organ.get(k)
            if self.model is None:
                why = [f"{ORGANS[k]}: learned strategy not fitted yet ({self.n_decisions} decisions): reference order"]
            else:
                tops = ", ".join(f"{feature_label(n)} {c:+.2f}" for n, c in self.explain(feats[k]))
                why = [f"{ORGANS[k]}: revision chance {s:.2f} (learned on {self.n_decisions} decisions; {tops})"]
            if base is None:
                r = case.organs[k]
                vol = float(r.ensemble.sum()) * frame.voxel_ml if r.ensemble is not None else 0.0
                base = OrganFinding(k, 0.0, [], None, 0.0, 0.0, vol, [])
            organs.append(
                OrganFinding(
                    k, s, why + base.reasons, base.pointer, base.attention_ml, base.heatmap_ml, base.volume_ml, []
                )
            )
        attention: dict[int, tuple[Box, npt.NDArray[np.bool_]]] = dict(ref.attention)
        heatmap: dict[int, tuple[Box, npt.NDArray[np.float32]]] = dict(ref.heatmap)
        return RankedCase(
            self.name, ref.score if self.model is None else score, by_priority(organs), attention, heatmap
        )


def feature_label(feature: str) -> str:
    """A feature's name for people ("std mask", "SIDE_SWAP finding")."""
    if feature.startswith("pen_"):
        return f"{feature[4:]} finding"
    return _LABEL.get(feature, feature)
