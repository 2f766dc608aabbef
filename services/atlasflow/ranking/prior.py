"""The population prior that ranking learns from the labels stored so far (no grpc).

The bundled prior (`atlasflow.method.prior.PopulationPrior.load()`, built from the
bundled label maps) is updated with the human-decided organs of each case's latest label
version, as the labels service reports them (`RecordLabelVersion.human_organ_geometry`). Only
human decisions (radiologist revisions, original labels) teach the prior: AI labels are what
the prior is there to check. `LearnedPriorCache` keeps the learned prior (as JSON) until the
stored geometry changes, for `GetPopulationPrior`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from atlasflow.method.prior import PopulationPrior


@dataclass(frozen=True)
class OrganSummary:
    """The geometry `PopulationPrior.update` reads from an organ: volume (ml), centroid (RAS+
    mm) and whether the field of view cuts the organ (first or last axial slice)."""

    organ: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    fov_cut: bool

    def to_list(self) -> list[float | bool]:
        return [self.volume_ml, *self.centroid_mm, self.fov_cut]

    @classmethod
    def from_list(cls, organ: int, raw: Sequence[float | bool]) -> OrganSummary:
        """Inverse of `to_list` (``[volume_ml, x, y, z, fov_cut]``, as stored in JSON)."""
        v, x, y, z, cut = raw
        return cls(int(organ), float(v), (float(x), float(y), float(z)), bool(cut))

    def valid(self) -> bool:
        return self.volume_ml > 0 and math.isfinite(self.volume_ml) and all(math.isfinite(c) for c in self.centroid_mm)


def learned_prior(
    cases: Iterable[Mapping[int, OrganSummary]], base: PopulationPrior | None = None
) -> tuple[PopulationPrior, int]:
    """(the base prior updated with each case's organ summaries, number of cases added);
    cases without organs are skipped. `base` defaults to the bundled prior."""
    prior = base if base is not None else PopulationPrior.load()
    added = 0
    for geoms in cases:
        if geoms:
            prior.update(geoms)
            added += 1
    if added:
        prior.notes = (
            prior.notes + "; " if prior.notes else ""
        ) + f"updated with the human-decided organs of {added} stored case(s)"
    return prior, added


GeometrySource = Callable[[], tuple[list[dict[int, OrganSummary]], str]]


class LearnedPriorCache:
    """The learned prior as JSON, relearned only when the stored geometry changed.

    source: returns (per case, its human-decided organ summaries; a change tag that differs
    whenever any of them changed), e.g. `SqlWorklist.learned_geometry`. Thread-safe:
    `current` may run in several worker threads at once (one learns, the others wait).
    """

    def __init__(self, source: GeometrySource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._cached: tuple[str, str, int] | None = None  # (change tag, prior JSON, cases added)

    def current(self) -> tuple[str, int]:
        """(the prior as JSON (`PopulationPrior.to_dict`), number of stored cases it learned
        from). Blocking: reads the store and may relearn the prior; call it from a worker thread."""
        with self._lock:
            cases, tag = self._source()
            if self._cached is None or self._cached[0] != tag:
                prior, added = learned_prior(cases)
                self._cached = (tag, json.dumps(prior.to_dict()), added)
            return self._cached[1], self._cached[2]
