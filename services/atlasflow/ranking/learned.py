"""The `learned` strategy on this site's own decisions (no grpc).

Segmentation sends each organ's features (`OrganAttention.features`) when the ensemble's
attention mode is `learned`; the worklist keeps them with the case. When a radiologist revises
or accepts an organ, the labels service reports how much the revision changed it
(RecordLabelVersion ``organ_changes``, ml; 0 = accepted) and the worklist stores that decision
with the organ's features at that moment (`LabelVersions.record_label_version`, table
``organ_decisions``).

`LearnedScorer` keeps an `atlasflow.method.learned.LearnedStrategy` fitted on those decisions:
`refit` fits it again on all decisions so far when at least ``min_new`` were added since the
last fit (the servicer calls it after every RecordLabelVersion that recorded decisions) or
when ``force`` (a review round opens), and then rescores every case whose organs carry
features (`SqlWorklist.rescore`). Until the strategy has `MIN_DECISIONS` decisions (at least
`MIN_EACH` revised and `MIN_EACH` accepted) nothing changes: organs keep the scores
segmentation sent (the reference order). Once fitted, an organ's score is the calibrated
probability that a reviewer revises it, the case priority their sum (the expected number of
organs to revise), and the organ's first reason names its top three features.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace

from atlasflow.common.organs import ORGANS
from atlasflow.method.learned import MIN_DECISIONS, MIN_EACH, LearnedStrategy, feature_label
from atlasflow.method.strategy import OrganDecision
from atlasflow.ranking.entries import OrganAttention

log = logging.getLogger(__name__)

__all__ = ["MIN_DECISIONS", "MIN_EACH", "LearnedScorer"]

#: reasons written by a learned scoring (replaced when the organ is scored again)
_MARKERS = (": learned strategy not fitted yet", ": revision chance ")


class LearnedScorer:
    """The site's `learned` model (module docstring); thread-safe."""

    def __init__(self, min_new: int = 10) -> None:
        self.min_new = max(1, int(min_new))
        self._strategy = LearnedStrategy()
        self._fitted_on = 0
        self._lock = threading.Lock()

    @property
    def fitted(self) -> bool:
        return self._strategy.fitted

    @property
    def decisions(self) -> int:
        """Decisions of the current fit."""
        return self._fitted_on

    def refit(self, decisions: Sequence[OrganDecision], *, force: bool = False) -> bool:
        """Fit on ``decisions`` (all so far) when ``force`` or at least ``min_new`` are new since
        the last fit; True when the model changed (the caller then rescores the worklist)."""
        with self._lock:
            if not decisions or (not force and len(decisions) - self._fitted_on < self.min_new):
                return False
            was_fitted = self._strategy.fitted
            strategy = LearnedStrategy()
            strategy.fit(decisions)
            self._strategy, self._fitted_on = strategy, len(decisions)
        log.info(
            "learned ranking refitted",
            extra={"fields": {"decisions": len(decisions), "fitted": strategy.fitted}},
        )
        return strategy.fitted or was_fitted

    def score(self, organs: Sequence[OrganAttention]) -> tuple[OrganAttention, ...]:
        """``organs`` with those carrying features scored by the model (unchanged until fitted)."""
        strategy = self._strategy
        featured = {o.organ: o.features for o in organs if o.features}
        if not strategy.fitted or not featured:
            return tuple(organs)
        _, scores = strategy.score_organs(featured)
        out = []
        for o in organs:
            if o.organ not in scores:
                out.append(o)
                continue
            p = scores[o.organ]
            tops = ", ".join(f"{feature_label(n)} {c:+.2f}" for n, c in strategy.explain(o.features))
            why = f"{ORGANS[o.organ]}: revision chance {p:.2f} (learned on {strategy.n_decisions} decisions; {tops})"
            kept = tuple(r for r in o.reasons if not any(m in r for m in _MARKERS))
            out.append(replace(o, score=float(p), reasons=(why, *kept)[:32]))
        return tuple(out)
