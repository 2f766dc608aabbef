"""The `learned` strategy on this site's own decisions (no grpc).

Segmentation sends each organ's features (`OrganAttention.features`) when the ensemble's
attention mode is `learned`; the worklist keeps them with the case. When a radiologist revises
or accepts an organ, the labels service reports how much the revision changed it
(RecordLabelVersion ``organ_changes``, ml; 0 = accepted) and the worklist stores that decision
with the organ's features at that moment (`LabelVersions.record_label_version`, table
``organ_decisions``).

`LearnedScorer` keeps an `atlasflow.method.learned.LearnedStrategy` fitted on those decisions.
The model in force is shared through the database, so every replica scores alike (table
``learned_model``, `atlasflow.ranking.entries.ModelState`): it is the model fitted on the
decisions with ``seq <= fitted_seq`` in seq order, and the fit is deterministic (no shuffling),
so a replica whose in-memory model is of another generation fits the same one again from the
same rows (`LearnedScorer.adopt`) instead of the model travelling as bytes. `LearnedScorer.refit`
(the servicer calls it after every RecordLabelVersion that recorded decisions, with ``force``
when a review round opens, and once at start) fits a new model when at least ``min_new``
decisions (counted in the database, whichever replica recorded them) are newer than the one in
force, or any are and ``force``; publishes it (`SqlWorklist.publish_model`: of two replicas that
refit at once, the model on more decisions wins, the other adopts it); and rescores the cases
scored with an older generation (`SqlWorklist.rescore`; stopped when superseded, finished by
the next refit on any replica when the replica doing it dies). A submission is scored with the
in-memory model and stored only if that generation is still in force (`ModelChanged`: adopt and
score again). A decision is stored once per (case, organ, label version) whichever replica gets
the event, however often it arrives: nothing is counted twice.

Until the strategy has `MIN_DECISIONS` decisions (at least
`MIN_EACH` revised and `MIN_EACH` accepted) nothing changes: organs keep the scores
segmentation sent (the reference order). Once fitted, an organ's score is the calibrated
probability that a reviewer revises it, the case priority their sum (the expected number of
organs to revise), and the organ's first reason names its top three features.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from atlasflow.common.organs import ORGANS
from atlasflow.method.learned import MIN_DECISIONS, MIN_EACH, LearnedStrategy, feature_label
from atlasflow.method.strategy import OrganDecision
from atlasflow.ranking.entries import ModelState, OrganAttention

log = logging.getLogger(__name__)

__all__ = ["MIN_DECISIONS", "MIN_EACH", "LearnedScorer", "LearnedStore"]

#: reasons written by a learned scoring (replaced when the organ is scored again)
_MARKERS = (": learned strategy not fitted yet", ": revision chance ")


class LearnedStore(Protocol):
    """What the scorer needs of the worklist store (`atlasflow.ranking.worklist.SqlWorklist`)."""

    def model_state(self) -> ModelState: ...

    def organ_decisions(self, through_seq: int | None = None) -> list[OrganDecision]: ...

    def decision_horizon(self) -> tuple[int, int]: ...

    def publish_model(self, fitted_seq: int, fitted: bool) -> ModelState: ...

    def rescore(
        self, score: Callable[[Sequence[OrganAttention]], Sequence[OrganAttention]], generation: int
    ) -> int: ...


class LearnedScorer:
    """This replica's copy of the site's `learned` model (module docstring); thread-safe.

    store: the worklist store (`SqlWorklist`) the model's decisions and state live in;
    min_new: decisions newer than the model in force that make `refit` fit a new one."""

    def __init__(self, store: LearnedStore, min_new: int = 10) -> None:
        self.store = store
        self.min_new = max(1, int(min_new))
        self._current = (LearnedStrategy(), ModelState())
        self._lock = threading.Lock()

    @property
    def fitted(self) -> bool:
        return self._current[0].fitted

    @property
    def state(self) -> ModelState:
        """The model in memory (the one in force once `adopt` or `refit` ran)."""
        return self._current[1]

    def adopt(self, state: ModelState | None = None) -> ModelState:
        """Make the in-memory model the one in force (``state``; None: read it), fitting it again
        on the same decisions when this replica has another generation. Blocking."""
        with self._lock:
            state = state if state is not None else self.store.model_state()
            if state.generation != self._current[1].generation:
                strategy = LearnedStrategy()
                if state.fitted:
                    strategy.fit(self.store.organ_decisions(state.fitted_seq))
                self._current = (strategy, state)
            return self._current[1]

    def refit(self, *, force: bool = False) -> int:
        """Fit and publish a new model when enough decisions are new (module docstring), adopt
        the model in force and rescore the cases scored with an older one; the number of cases
        whose priority changed. Blocking."""
        horizon, new = self.store.decision_horizon()
        if new and (force or new >= self.min_new):
            strategy = LearnedStrategy()
            strategy.fit(self.store.organ_decisions(horizon))
            state = self.store.publish_model(horizon, strategy.fitted)
            with self._lock:
                if state.fitted_seq == horizon and state.generation > self._current[1].generation:
                    self._current = (strategy, state)  # ours (and newer than the copy): no second fit
            log.info(
                "learned ranking refitted",
                extra={
                    "fields": {
                        "decisions": strategy.n_decisions,
                        "fitted": strategy.fitted,
                        "published": state.fitted_seq == horizon,
                        "generation": state.generation,
                    }
                },
            )
        self.adopt()
        strategy, state = self._current
        if state.generation == 0:
            return 0
        return self.store.rescore(lambda organs: self._score(strategy, organs), state.generation)

    def score(self, organs: Sequence[OrganAttention]) -> tuple[tuple[OrganAttention, ...], int]:
        """(``organs`` with those carrying features scored by the in-memory model (unchanged
        until fitted), that model's generation)."""
        strategy, state = self._current
        return self._score(strategy, organs), state.generation

    @staticmethod
    def _score(strategy: LearnedStrategy, organs: Sequence[OrganAttention]) -> tuple[OrganAttention, ...]:
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
