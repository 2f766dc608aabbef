"""Ranking strategies: the `RankingStrategy` protocol, the registry of named strategies, and
`rank_case`, which ranks one case with one of them.

A strategy turns a case's reference attention (`atlasflow.method.attention.CaseAttention`: the
recipe's terms, the ensemble masks and the models' soft predictions per organ) into a
`RankedCase`: per unlabelled organ an attention and a heatmap crop, a score, reasons and a
pointer, and the case's priority. The services never branch on a strategy's name: an ensemble
file (``"attention": {"mode": <name>}``), ``atlasflow rank --mode <name>`` and the segmentation
worker name a registered strategy and receive it from `get_strategy`.

Registered (in ``atlasflow/method/__init__.py``, in this order): ``reference``
(`atlasflow.method.reference`, the AbdomenAtlas recipe), ``enhanced``
(`atlasflow.method.enhanced`, suspect regions + plausibility findings) and ``learned``
(`atlasflow.method.learned`, a calibrated model of reviewers' decisions; a `FittableStrategy`).
A new strategy is a class with the protocol's members, decorated with
``@register_strategy("<name>")`` in its own module, which the package's ``__init__`` imports.
The default (`DEFAULT_STRATEGY`) is chosen from benchmarks/bench_ranking.py's
leave-one-family-out table (docs/ranking.md): at or above ``reference`` on every held-out
simulator family on all three figures, which only ``reference`` itself is today.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from atlasflow.method.attention import CaseAttention, OrganResult
from atlasflow.method.findings import Finding, OrganFinding, pointer
from atlasflow.method.geometry import slice_axis_of
from atlasflow.method.masks import Box, bounding_box, offset_box
from atlasflow.method.prior import PopulationPrior

#: The per-organ statistic (`atlasflow.segmentation.outputs.STATS_COLUMNS`) that a strategy's
#: organ score starts from before plausibility penalties are added.
ScoreBase = Literal["heatmap_ml", "attention_ml"]
#: The strategy used where none is named (ensemble files without ``"attention"``, ``--mode``).
DEFAULT_STRATEGY = "reference"


@dataclass
class RankedCase:
    """A case ranked by one strategy. ``mode``: the strategy's name. ``score``: the case
    priority (reference = attention voxels, as the reference script; enhanced = sum of organ
    scores, ml-equivalent). ``organs``: unlabelled organs with a non-zero score, by priority.
    ``attention`` / ``heatmap``: organ id -> (box, bool crop) / (box, float32 crop in [0, 1])
    on the case grid."""

    mode: str
    score: float
    organs: list[OrganFinding]
    attention: dict[int, tuple[Box, npt.NDArray[np.bool_]]]
    heatmap: dict[int, tuple[Box, npt.NDArray[np.float32]]]


class RankingStrategy(Protocol):
    """How a case is ranked: what is attended, how organs and the case are scored.

    ``name``: the registered name (what ensemble files and ``--mode`` say).
    ``score_base``: the per-organ statistic the segmentation worker's organ score starts from
    (``heatmap_ml`` or ``attention_ml``; plausibility penalties are added to it).
    ``needs_whole_case``: False when the strategy's heatmap is the recipe's per-organ terms
    (std, entropy, overlap), which the segmentation pipeline computes organ by organ while it
    votes the labels; True when the pipeline must hand the whole case to `rank` (every
    organ's soft predictions) and take its attention and heatmap.
    """

    @property
    def name(self) -> str: ...

    @property
    def score_base(self) -> ScoreBase: ...

    @property
    def needs_whole_case(self) -> bool: ...

    def rank(
        self, case: CaseAttention, affine: npt.NDArray[np.float64], *, prior: PopulationPrior | None = None
    ) -> RankedCase:
        """Rank one case. ``affine``: 4x4 voxel -> RAS+ mm of the case grid; ``prior``: the
        population prior for plausibility findings (None: the bundled one, if the strategy
        uses findings at all)."""
        ...


@dataclass(frozen=True)
class OrganDecision:
    """What a reviewer decided about one organ of one case, as a fittable strategy learns it:
    ``features`` (the strategy's `FittableStrategy.organ_features` of that organ, by name) and
    ``revised_ml`` (the volume a human changed; 0 = accepted as it was)."""

    features: Mapping[str, float]
    revised_ml: float


class FittableStrategy(RankingStrategy, Protocol):
    """A strategy with parameters fitted on reviewers' decisions (optional: `rank` alone is the
    contract). ``organ_features``: per unranked organ, named numbers (``ranked``: rankings of
    the same case already computed, by strategy name, reused); ``fit``: (re)fit on decisions;
    ``score_organs``: (case score, organ id -> score) from ``organ_features``' output, which is
    what `rank` does after computing the features (benchmarks score stored features)."""

    def organ_features(
        self,
        case: CaseAttention,
        affine: npt.NDArray[np.float64],
        *,
        prior: PopulationPrior | None = None,
        ranked: Mapping[str, RankedCase] | None = None,
    ) -> dict[int, dict[str, float]]: ...

    def fit(self, decisions: Sequence[OrganDecision]) -> None: ...

    def score_organs(self, features: Mapping[int, Mapping[str, float]]) -> tuple[float, dict[int, float]]: ...


class UnknownStrategyError(ValueError):
    """A strategy name that is not registered; ``name`` and ``known`` (registered names)."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown ranking strategy {name!r} (registered: {', '.join(known)})")
        self.name = name
        self.known = known


_Factory = TypeVar("_Factory", bound=Callable[[], RankingStrategy])
_FACTORIES: dict[str, Callable[[], RankingStrategy]] = {}
_INSTANCES: dict[str, RankingStrategy] = {}


def register_strategy(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator: register a zero-argument factory (usually the strategy class) under
    ``name``; `get_strategy` builds it once, on first use. A name can be registered once."""

    def add(factory: _Factory) -> _Factory:
        if name in _FACTORIES:
            raise ValueError(f"ranking strategy {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return add


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, in registration order (``reference`` first)."""
    return tuple(_FACTORIES)


def get_strategy(name: str) -> RankingStrategy:
    """The strategy registered as ``name`` (one shared instance). Raises
    `UnknownStrategyError` (a ValueError) for a name that is not registered."""
    strategy = _INSTANCES.get(name)
    if strategy is None:
        factory = _FACTORIES.get(name)
        if factory is None:
            raise UnknownStrategyError(name, strategy_names())
        strategy = _INSTANCES[name] = factory()
        if strategy.name != name:
            raise ValueError(f"ranking strategy registered as {name!r} calls itself {strategy.name!r}")
    return strategy


def new_strategy(name: str) -> RankingStrategy:
    """A fresh, unshared instance of the strategy registered as ``name`` (to fit one without
    touching the shared instance of `get_strategy`)."""
    get_strategy(name)  # the name check
    return _FACTORIES[name]()


def rank_case(
    case: CaseAttention,
    affine: npt.NDArray[np.float64],
    *,
    mode: str | RankingStrategy = DEFAULT_STRATEGY,
    prior: PopulationPrior | None = None,
) -> RankedCase:
    """Rank one case from its reference attention with a strategy (``mode``: the strategy or
    its registered name; see `atlasflow.method.reference` and `atlasflow.method.enhanced`)."""
    strategy = get_strategy(mode) if isinstance(mode, str) else mode
    return strategy.rank(case, np.asarray(affine, dtype=np.float64), prior=prior)


# ----------------------------------------------------------------------------- shared by strategies


@dataclass(frozen=True)
class CaseFrame:
    """The grid facts every strategy needs: ``affine`` (float64 4x4 voxel -> RAS+ mm),
    ``voxel_ml`` and the slice axis (the voxel axis closest to S)."""

    affine: npt.NDArray[np.float64]
    voxel_ml: float
    slice_axis: int

    @classmethod
    def of(cls, affine: npt.NDArray[np.float64]) -> CaseFrame:
        a = np.asarray(affine, dtype=np.float64)
        return cls(a, abs(float(np.linalg.det(a[:3, :3]))) / 1000.0, slice_axis_of(a))


def organ_entry(
    frame: CaseFrame,
    r: OrganResult,
    *,
    attention: npt.NDArray[np.bool_],
    heatmap: npt.NDArray[np.float32],
    look: npt.NDArray[np.bool_],
    score: float,
    reasons: list[str],
    findings: list[Finding],
) -> OrganFinding:
    """One organ's `OrganFinding` from what a strategy decided on the crop ``r.box``:
    ``attention`` (bool), ``heatmap`` (float32), ``look`` (bool, where the pointer sends the
    reader), ``score``, ``reasons`` (the first 32 are kept) and ``findings``."""
    assert r.box is not None
    box = bounding_box(look)
    ptr = pointer(offset_box(box, r.box), frame.affine, frame.slice_axis) if box is not None else None
    heat_ml = float(heatmap.sum(dtype=np.float64)) * frame.voxel_ml
    vol = float(r.ensemble.sum()) * frame.voxel_ml if r.ensemble is not None else 0.0
    return OrganFinding(
        r.organ, score, reasons[:32], ptr, float(attention.sum()) * frame.voxel_ml, heat_ml, vol, findings
    )


def by_priority(organs: list[OrganFinding]) -> list[OrganFinding]:
    """Organs with a non-zero score, by decreasing score (stable)."""
    return [o for o in sorted(organs, key=lambda o: -o.score) if o.score > 0]


def unranked_organs(case: CaseAttention) -> list[OrganResult]:
    """The organs a strategy ranks: not labelled by the source, with support (a box)."""
    return [r for r in case.organs.values() if not r.labelled and r.box is not None]
