"""The worklist's value types (no grpc, no SQL): review status, organ attention, entries,
leases, reviews, rounds, list filters; and the identifier check the store's operations share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import ORGANS

DOMAIN = "atlasflow.ranking"


class Status(IntEnum):
    """Review status; the numbers are those of proto `WorklistStatus`."""

    PENDING = 1
    LEASED = 2
    ACCEPTED = 3
    REVISED = 4


REVIEWED = (Status.ACCEPTED, Status.REVISED)


@dataclass(frozen=True)
class AttentionPointer:
    """Where to look: the bounding box of an organ's attention region.

    voxel_min / voxel_max: inclusive voxel indices (i, j, k) on the CT grid, axes (X, Y, Z) of
    the RAS+ volume. world_min_mm / world_max_mm: the same box in RAS+ mm (envelope of the
    corner voxel centres through the affine). slices: inclusive axial (Z index) range.
    """

    voxel_min: tuple[int, int, int]
    voxel_max: tuple[int, int, int]
    world_min_mm: tuple[float, float, float]
    world_max_mm: tuple[float, float, float]
    slices: tuple[int, int]


@dataclass(frozen=True)
class OrganAttention:
    """Attention summary of one organ in one case.

    attention_ml: volume of the attention region (union of inconsistency, uncertainty and
    overlap masks), ml. heatmap_ml: heatmap mass over the region (sum of heatmap values in
    [0, 1] times the voxel volume), ml. volume_ml: ensemble mask volume, ml. reasons: short
    human-readable findings ("std mask 12 ml"). pointer: where to look (None: no region).
    score: optional organ priority from the attention library (None: use attention_ml).
    features: the organ's features for the `learned` strategy (name -> value; empty: none).
    """

    organ: int
    attention_ml: float
    heatmap_ml: float
    volume_ml: float
    reasons: tuple[str, ...] = ()
    pointer: AttentionPointer | None = None
    score: float | None = None
    features: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """A reviewer's lease; times are timezone-aware UTC."""

    reviewer: str
    start_time: datetime
    expire_time: datetime


@dataclass(frozen=True)
class Review:
    """A completed review; outcome is Status.ACCEPTED or Status.REVISED."""

    outcome: Status
    reviewer: str
    label_version_id: str
    complete_time: datetime
    round_number: int


@dataclass(frozen=True)
class WorklistEntry:
    """One case on the worklist; `organs` ordered by heatmap_ml descending (ties: organ id).

    status/lease are as of read time; lease is set only while LEASED, review only when
    ACCEPTED or REVISED; round_number is the latest round that selected the case (0: none).
    """

    case_id: str
    series_id: str
    source_job_id: str
    priority: float
    organs: tuple[OrganAttention, ...]
    heatmap_digest: str
    heatmap_size: int
    update_time: datetime
    labelled_organs: tuple[int, ...] = ()
    status: Status = Status.PENDING
    round_number: int = 0
    lease: Lease | None = None
    review: Review | None = None
    label_version_id: str = ""
    human_decided_organs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Round:
    """A review round (see `atlasflow.ranking.rounds`). close_time None while open."""

    round_number: int
    budget_fraction: float
    candidate_count: int
    case_count: int
    accepted_count: int
    revised_count: int
    unreviewed_count: int
    creator: str
    create_time: datetime
    close_time: datetime | None

    @property
    def is_open(self) -> bool:
        return self.close_time is None


@dataclass(frozen=True)
class WorklistFilter:
    """ListWorklist filters, combined with AND; values within one filter with OR.

    organs: organ ids (see "Organ filter" in `atlasflow.ranking.worklist`); round_number: cases
    selected into that round (0: any); statuses: statuses at read time (empty: any), `Status`
    numbers (`validated` rejects unknown ones).
    """

    organs: frozenset[int] = frozenset()
    round_number: int = 0
    statuses: frozenset[int] = frozenset()

    def validated(self) -> WorklistFilter:
        bad = [o for o in self.organs if int(o) not in ORGANS]
        if bad:
            raise InvalidArgument(
                "INVALID_FILTER",
                "organ filter must hold AbdomenAtlas organ ids",
                domain=DOMAIN,
                metadata={"organ": str(bad[0])},
            )
        if self.round_number < 0:
            raise InvalidArgument("INVALID_FILTER", "round_number must be >= 0", domain=DOMAIN)
        try:
            statuses = frozenset(Status(int(s)) for s in self.statuses)
        except ValueError:
            raise InvalidArgument("INVALID_FILTER", "status filter holds an unknown status", domain=DOMAIN) from None
        return WorklistFilter(frozenset(int(o) for o in self.organs), int(self.round_number), statuses)

    def scope(self) -> str:
        """Canonical text of the filter (binds page tokens to it)."""
        return (
            f"o={','.join(map(str, sorted(self.organs)))};r={self.round_number};"
            f"s={','.join(str(int(s)) for s in sorted(self.statuses))}"
        )


@dataclass(frozen=True)
class ModelState:
    """The learned model every replica scores with (table ``learned_model``): fitted on the
    organ decisions with ``seq <= fitted_seq`` (in seq order, so any replica refits the same
    model from the same rows); ``generation`` changes whenever scores may change; ``fitted``:
    the decisions were enough for a model (else organs keep segmentation's scores)."""

    fitted_seq: int = 0
    generation: int = 0
    fitted: bool = False


class ModelChanged(Exception):
    """A submission was scored with another generation of the learned model than the one now in
    force (another replica published a newer one): score it again and retry. Internal (never
    reaches a caller)."""

    def __init__(self, state: ModelState) -> None:
        super().__init__(f"learned model generation is now {state.generation}")
        self.state = state


def check_id(name: str, value: str) -> None:
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument(
            "INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)", domain=DOMAIN, metadata={"field": name}
        )
