"""The ranked worklist of cases for radiologists, with leases and review rounds, on SQLite (no grpc).

Priority
--------
Case priority (DESIGN.md, AbdomenAtlas `create_attention.py`): the total attention volume, in
ml, over the organs the case's source did NOT label (partial-label template); per case, organs
are ordered by heatmap mass (ml) descending. Volumes are in ml, never voxel counts, so cases of
different spacing compare fairly. When the attention library gives organs a `score` (enhanced
mode), the priority is the sum of the scores (unset = 0) over the unlabelled organs instead.

Rank: 1-based position in the WHOLE worklist by (priority descending, case_id ascending) at
read time, whatever filter a list uses.

Idempotency: one entry per case. Submissions are keyed by (case_id, source_job_id): a repeat
of a key already seen changes nothing and returns the case's current entry (the first write of
a key wins, also after a restart); a submission with a NEW job id for the case replaces the
case's attention (the newer segmentation supersedes the older one, in order of arrival). A new
submission never touches the case's review status, lease or rounds: a reviewed case stays done.

Label versions (`record_label_version`, fed by the labels service's outbox)
--------------------------------------------------------------------------
Every label version the labels service stores is reported here with the organs a human decided
in it (a radiologist's revision, in that version or an ancestor, or the source's original
label). Those organs leave the priority exactly like source-labelled organs: the attention
asked a question a human has answered. Delivery is at least once and in any order: an event is
kept only when its `version_number` (1-based position in the case's chain of versions) is
higher than the recorded one, so a replay or a late older event changes nothing. A case
without attention yet is remembered (`case_labels`) and its first submission uses it. Review
status, lease and rounds are untouched (CompleteReview closes a review).

Review status (`Status`, numbers = proto `WorklistStatus`)
---------------------------------------------------------
    PENDING  -> LEASED     lease / lease_next
    LEASED   -> LEASED     renew, or lease by the holder
    LEASED   -> PENDING    release by the holder, or the lease's expiry passes
    LEASED   -> ACCEPTED   complete(ACCEPTED) by the holder of an unexpired lease
    LEASED   -> REVISED    complete(REVISED) by the holder of an unexpired lease
ACCEPTED / REVISED are terminal. LEASED vs PENDING is computed at read time from the stored
lease expiry and the injectable clock, so an expired lease needs no sweeper. Every lease change
runs in one `BEGIN IMMEDIATE` transaction with a conditional UPDATE, so two reviewers (threads,
processes) never hold the same case.

Rounds
------
`start_round(f)` closes the open round (if any) and selects the top ceil(f x U) of the U
unreviewed cases (ACCEPTED/REVISED excluded; PENDING and LEASED included) by priority. A case
remembers its latest round (`round_number`); round membership history is kept for the round
filter and the round statistics. `lease_next` hands out the open round's cases.

Organ filter
------------
A case matches organ o when o contributes a positive amount to its priority: attention_ml > 0
(or score > 0 for scored cases) and o is neither labelled by the source nor decided by a human.
Kept as a bit mask.

Paging: keyset cursor on (priority, case_id) of the last item returned (tokens bound to the
filter), so moving through the pages never duplicates or skips an entry whose priority does not
change meanwhile.

Threading: one `SqliteWorklist` holds one connection and serialises its calls with a lock; open
one instance per thread/process for parallel writers (see atlasflow.common.sqlite).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import IntEnum
from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from atlasflow.common.organs import ORGANS
from atlasflow.ranking.prior import OrganSummary

DOMAIN = "atlasflow.ranking"
DEFAULT_LEASE_S = 15 * 60.0
MAX_LEASE_S = 8 * 3600.0
MAX_REASONS = 32
MAX_REASON_CHARS = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    """

    organ: int
    attention_ml: float
    heatmap_ml: float
    volume_ml: float
    reasons: tuple[str, ...] = ()
    pointer: AttentionPointer | None = None
    score: float | None = None


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
    """A review round (see the module docstring). close_time None while open."""

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

    organs: organ ids (see "Organ filter" in the module docstring); round_number: cases
    selected into that round (0: any); statuses: statuses at read time (empty: any).
    """

    organs: frozenset[int] = frozenset()
    round_number: int = 0
    statuses: frozenset[Status] = frozenset()

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


# ------------------------------------------------------------------------------ validation


def _invalid(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("INVALID_ATTENTION", message, domain=DOMAIN, metadata=metadata)


def _invalid_event(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("INVALID_LABEL_VERSION", message, domain=DOMAIN, metadata=metadata)


def _finite_nonneg(*values: float) -> bool:
    return all(math.isfinite(v) and v >= 0.0 for v in values)


def _validate_pointer(p: AttentionPointer, organ: int) -> AttentionPointer:
    vmin = tuple(int(v) for v in p.voxel_min)
    vmax = tuple(int(v) for v in p.voxel_max)
    wmin = tuple(float(v) for v in p.world_min_mm)
    wmax = tuple(float(v) for v in p.world_max_mm)
    first, last = (int(v) for v in p.slices)
    ok = (
        len(vmin) == len(vmax) == len(wmin) == len(wmax) == 3
        and all(0 <= a <= b for a, b in zip(vmin, vmax))
        and all(math.isfinite(a) and math.isfinite(b) and a <= b for a, b in zip(wmin, wmax))
        and 0 <= first <= last
    )
    if not ok:
        raise _invalid("pointer box must be ordered (min <= max), voxel indices >= 0, mm finite", organ=str(organ))
    return AttentionPointer(vmin, vmax, wmin, wmax, (first, last))  # type: ignore[arg-type]


def validate_organs(organs: Iterable[OrganAttention]) -> tuple[OrganAttention, ...]:
    """Check organ ids (1..9, no repeats), volumes and scores (finite, >= 0), reasons (at most
    32, each printable and at most 256 characters) and pointers; return them ordered by
    heatmap_ml descending, ties by organ id. Raises InvalidArgument("INVALID_ATTENTION")."""
    out: list[OrganAttention] = []
    seen: set[int] = set()
    for oa in organs:
        organ = int(oa.organ)
        if organ not in ORGANS:
            raise _invalid("organ must be one of the nine AbdomenAtlas organs", organ=str(oa.organ))
        if organ in seen:
            raise _invalid("organ listed twice", organ=str(organ))
        seen.add(organ)
        values = (float(oa.attention_ml), float(oa.heatmap_ml), float(oa.volume_ml))
        if not _finite_nonneg(*values):
            raise _invalid("attention volumes must be finite and >= 0 ml", organ=str(organ))
        score = None if oa.score is None else float(oa.score)
        if score is not None and not _finite_nonneg(score):
            raise _invalid("organ score must be finite and >= 0", organ=str(organ))
        reasons = tuple(str(r) for r in oa.reasons)
        if len(reasons) > MAX_REASONS or any(
            not r or len(r) > MAX_REASON_CHARS or not r.isprintable() for r in reasons
        ):
            raise _invalid(
                f"at most {MAX_REASONS} reasons, each 1-{MAX_REASON_CHARS} printable characters", organ=str(organ)
            )
        pointer = None if oa.pointer is None else _validate_pointer(oa.pointer, organ)
        out.append(OrganAttention(organ, *values, reasons=reasons, pointer=pointer, score=score))
    return tuple(sorted(out, key=lambda o: (-o.heatmap_ml, o.organ)))


def _contributions(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> dict[int, float]:
    organs = list(organs)
    known = {int(o) for o in labelled_organs}
    scored = any(o.score is not None for o in organs)
    return {
        int(o.organ): float((o.score or 0.0) if scored else o.attention_ml) for o in organs if int(o.organ) not in known
    }


def case_priority(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> float:
    """Total attention_ml (ml) over the organs NOT labelled by the case's source.

    organs: per-organ attention summaries; labelled_organs: organ ids the source dataset
    labelled (their labels are trusted, so their attention does not call for review). When any
    organ carries a `score`, the scores (unset = 0) are summed instead of attention_ml.
    """
    return float(math.fsum(_contributions(organs, labelled_organs).values()))


def attention_mask(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> int:
    """Bit mask (bit o = organ id o) of the organs contributing > 0 to the priority."""
    mask = 0
    for organ, value in _contributions(organs, labelled_organs).items():
        if value > 0.0:
            mask |= 1 << organ
    return mask


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument(
            "INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)", domain=DOMAIN, metadata={"field": name}
        )


def check_principal(principal: str) -> str:
    """The caller's principal, or Unauthenticated("PRINCIPAL_REQUIRED") when missing."""
    if not principal:
        raise Unauthenticated(
            "PRINCIPAL_REQUIRED", "the caller's principal (metadata x-atlasflow-principal) is required", domain=DOMAIN
        )
    if len(principal) > 256 or not principal.isprintable():
        raise InvalidArgument("INVALID_PRINCIPAL", "principal must be printable, <= 256 chars", domain=DOMAIN)
    return principal


def _lease_seconds(seconds: float | None, default: float) -> float:
    if seconds is None or seconds == 0:
        return default
    if not (math.isfinite(seconds) and 1.0 <= seconds <= MAX_LEASE_S):
        raise InvalidArgument(
            "INVALID_LEASE_DURATION",
            f"lease duration must be between 1 s and {int(MAX_LEASE_S)} s",
            domain=DOMAIN,
            metadata={"seconds": str(seconds)},
        )
    return float(seconds)


# ---------------------------------------------------------------------------- persistence


def _us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _pointer_json(p: AttentionPointer | None) -> Any:
    if p is None:
        return None
    return [list(p.voxel_min), list(p.voxel_max), list(p.world_min_mm), list(p.world_max_mm), list(p.slices)]


def _pointer_of(raw: Any) -> AttentionPointer | None:
    if raw is None:
        return None
    vmin, vmax, wmin, wmax, sl = raw
    return AttentionPointer(tuple(vmin), tuple(vmax), tuple(wmin), tuple(wmax), tuple(sl))  # type: ignore[arg-type]


def _organ_of(raw: list[Any]) -> OrganAttention:
    # Rows of schema version 1 hold [organ, attention, heatmap, volume] only.
    o, a, h, v = raw[:4]
    reasons = tuple(raw[4]) if len(raw) > 4 else ()
    pointer = _pointer_of(raw[5]) if len(raw) > 5 else None
    score = raw[6] if len(raw) > 6 else None
    return OrganAttention(
        int(o), float(a), float(h), float(v), reasons, pointer, None if score is None else float(score)
    )


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE worklist (
        case_id TEXT PRIMARY KEY,
        series_id TEXT NOT NULL,
        source_job_id TEXT NOT NULL,
        priority REAL NOT NULL,
        organs TEXT NOT NULL,
        labelled_organs TEXT NOT NULL,
        heatmap_digest TEXT NOT NULL DEFAULT '',
        heatmap_size INTEGER NOT NULL DEFAULT 0,
        update_time TEXT NOT NULL
    );
    CREATE INDEX worklist_by_rank ON worklist(priority DESC, case_id);
    CREATE TABLE worklist_submissions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        case_id TEXT NOT NULL,
        source_job_id TEXT NOT NULL,
        submit_time TEXT NOT NULL,
        UNIQUE (case_id, source_job_id)
    );
    """,
    # 2: review status, leases (times in µs since the epoch, UTC), rounds, organ bit mask.
    """
    ALTER TABLE worklist ADD COLUMN attention_mask INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN round_number INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN lease_holder TEXT NOT NULL DEFAULT '';
    ALTER TABLE worklist ADD COLUMN lease_start_us INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN lease_expire_us INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN outcome INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN reviewer TEXT NOT NULL DEFAULT '';
    ALTER TABLE worklist ADD COLUMN label_version_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE worklist ADD COLUMN review_us INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE worklist ADD COLUMN review_round INTEGER NOT NULL DEFAULT 0;
    UPDATE worklist SET attention_mask = (
        SELECT COALESCE(SUM(1 << CAST(json_extract(o.value, '$[0]') AS INTEGER)), 0)
        FROM json_each(worklist.organs) AS o
        WHERE json_extract(o.value, '$[1]') > 0
          AND json_extract(o.value, '$[0]') NOT IN
              (SELECT l.value FROM json_each(worklist.labelled_organs) AS l));
    CREATE INDEX worklist_by_round ON worklist(round_number, outcome, priority DESC, case_id);
    CREATE TABLE rounds (
        round_number INTEGER PRIMARY KEY,
        budget_fraction REAL NOT NULL,
        candidate_count INTEGER NOT NULL,
        creator TEXT NOT NULL,
        request_id TEXT UNIQUE,
        create_us INTEGER NOT NULL,
        close_us INTEGER
    );
    CREATE TABLE round_cases (
        round_number INTEGER NOT NULL REFERENCES rounds(round_number),
        case_id TEXT NOT NULL REFERENCES worklist(case_id),
        selection_rank INTEGER NOT NULL,
        priority REAL NOT NULL,
        PRIMARY KEY (round_number, case_id)
    );
    CREATE INDEX round_cases_by_case ON round_cases(case_id);
    """,
    # 3: label versions reported by the labels service (see "Label versions" above); the
    # worklist row carries a copy of its case's latest one.
    """
    CREATE TABLE case_labels (
        case_id TEXT PRIMARY KEY,
        label_version_id TEXT NOT NULL,
        version_number INTEGER NOT NULL,
        human_organs TEXT NOT NULL,
        revised_organs TEXT NOT NULL,
        reviewer TEXT NOT NULL DEFAULT '',
        record_time TEXT NOT NULL
    );
    ALTER TABLE worklist ADD COLUMN latest_label_version_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE worklist ADD COLUMN human_organs TEXT NOT NULL DEFAULT '[]';
    """,
    # 4: geometry of the human-decided organs of the latest version, {organ: [ml, r, a, s, cut]}
    # (the learned population prior, atlasflow.ranking.prior).
    """
    ALTER TABLE case_labels ADD COLUMN geometry TEXT NOT NULL DEFAULT '{}';
    """,
)

# Status at read time (:now = µs since the epoch); numbers as in `Status`.
_STATUS_SQL = (
    "(CASE WHEN outcome != 0 THEN outcome WHEN lease_holder != '' AND lease_expire_us > :now THEN 2 ELSE 1 END)"
)


class SqliteWorklist:
    """The worklist store on an SQLite file (the embedded default).

    clock: returns timezone-aware UTC now (injectable for tests); default_lease_s: lease
    length when a call gives none (seconds, 1 s .. 8 h).
    """

    def __init__(
        self, path: str | Path, *, clock: Callable[[], datetime] = sq.utc_now, default_lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        self.default_lease_s = _lease_seconds(default_lease_s, DEFAULT_LEASE_S)
        self._clock = clock
        self._conn = sq.connect(path)
        self._lock = threading.RLock()
        with self._lock:
            sq.migrate(self._conn, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteWorklist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now_us(self) -> int:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock must return timezone-aware datetimes")
        return _us(now)

    # ------------------------------------------------------------------------ attention

    def submit(
        self,
        case_id: str,
        series_id: str,
        source_job_id: str,
        organs: Sequence[OrganAttention],
        labelled_organs: Sequence[int] = (),
        heatmap_digest: str = "",
        heatmap_size: int = 0,
    ) -> tuple[WorklistEntry, int]:
        """Record the attention summary of `case_id` from segmentation job `source_job_id`.

        Returns (the case's entry after re-ranking, its 1-based rank). Idempotent by
        (case_id, source_job_id); see the module docstring for replacement. Review status,
        lease and rounds of the case are kept.
        """
        _check_id("case_id", case_id)
        _check_id("series_id", series_id)
        _check_id("source_job_id", source_job_id)
        ordered = validate_organs(organs)
        labelled = tuple(sorted({int(o) for o in labelled_organs}))
        if any(o not in ORGANS for o in labelled):
            raise _invalid("labelled_organs must be AbdomenAtlas organ ids")
        if heatmap_size < 0:
            raise _invalid("heatmap size must be >= 0")
        now = self._clock().isoformat()
        organs_json = json.dumps(
            [
                [o.organ, o.attention_ml, o.heatmap_ml, o.volume_ml, list(o.reasons), _pointer_json(o.pointer), o.score]
                for o in ordered
            ]
        )
        with self._lock, sq.transaction(self._conn):
            known = self._conn.execute(
                "SELECT label_version_id, human_organs FROM case_labels WHERE case_id = ?", (case_id,)
            ).fetchone()
            version_id = known["label_version_id"] if known else ""
            human = known["human_organs"] if known else "[]"
            excluded = set(labelled) | set(json.loads(human))
            priority = case_priority(ordered, excluded)
            mask = attention_mask(ordered, excluded)
            seen = self._conn.execute(
                "SELECT 1 FROM worklist_submissions WHERE case_id = ? AND source_job_id = ?", (case_id, source_job_id)
            ).fetchone()
            if not seen:
                self._conn.execute(
                    "INSERT INTO worklist_submissions(case_id, source_job_id, submit_time) VALUES (?, ?, ?)",
                    (case_id, source_job_id, now),
                )
                self._conn.execute(
                    "INSERT INTO worklist(case_id, series_id, source_job_id, priority, organs,"
                    " labelled_organs, heatmap_digest, heatmap_size, update_time, attention_mask,"
                    " latest_label_version_id, human_organs)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(case_id) DO UPDATE SET series_id = excluded.series_id,"
                    " source_job_id = excluded.source_job_id, priority = excluded.priority,"
                    " organs = excluded.organs, labelled_organs = excluded.labelled_organs,"
                    " heatmap_digest = excluded.heatmap_digest,"
                    " heatmap_size = excluded.heatmap_size, update_time = excluded.update_time,"
                    " attention_mask = excluded.attention_mask,"
                    " latest_label_version_id = excluded.latest_label_version_id,"
                    " human_organs = excluded.human_organs",
                    (
                        case_id,
                        series_id,
                        source_job_id,
                        priority,
                        organs_json,
                        json.dumps(labelled),
                        heatmap_digest,
                        int(heatmap_size),
                        now,
                        mask,
                        version_id,
                        human,
                    ),
                )
            return self._entry_and_rank(case_id, self._now_us())

    def record_label_version(
        self,
        case_id: str,
        label_version_id: str,
        version_number: int,
        human_organs: Iterable[int] = (),
        revised_organs: Iterable[int] = (),
        reviewer: str = "",
        geometry: Iterable[OrganSummary] = (),
    ) -> tuple[WorklistEntry, int] | None:
        """Record that `case_id` has label version `label_version_id` (see "Label versions").

        version_number: 1-based position in the case's chain (orders late events);
        human_organs: organ ids decided by a human in that version (they leave the priority);
        revised_organs: ids a radiologist revised in that very version; reviewer: its author;
        geometry: summaries of human-decided organs present in the version (the learned prior).
        Returns (entry, rank) after re-ranking, or None while the case has no attention.
        """
        for name, value in (("case_id", case_id), ("label_version_id", label_version_id)):
            if not value or len(value) > 256 or not value.isprintable():
                raise _invalid_event(f"{name} is required (printable, <= 256 chars)", field=name)
        if int(version_number) < 1:
            raise _invalid_event("version_number must be >= 1", field="version_number")
        human = tuple(sorted({int(o) for o in human_organs}))
        revised = tuple(sorted({int(o) for o in revised_organs}))
        if any(o not in ORGANS for o in human + revised):
            raise _invalid_event("organs must be AbdomenAtlas organ ids")
        if not set(revised) <= set(human):
            raise _invalid_event("revised_organs must be among human_decided_organs")
        if len(reviewer) > 256 or not reviewer.isprintable():
            raise _invalid_event("reviewer must be printable, <= 256 chars", field="reviewer")
        geoms: dict[int, OrganSummary] = {}
        for g in geometry:
            if g.organ not in human or g.organ in geoms or not g.valid():
                raise _invalid_event(
                    "organ geometry must be finite, volume > 0, one per human-decided organ",
                    field="human_organ_geometry",
                )
            geoms[g.organ] = g
        with self._lock, sq.transaction(self._conn):
            known = self._conn.execute(
                "SELECT version_number FROM case_labels WHERE case_id = ?", (case_id,)
            ).fetchone()
            if known is None or int(known["version_number"]) < int(version_number):
                self._conn.execute(
                    "INSERT INTO case_labels(case_id, label_version_id, version_number,"
                    " human_organs, revised_organs, reviewer, record_time, geometry)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(case_id) DO UPDATE SET"
                    " label_version_id = excluded.label_version_id,"
                    " version_number = excluded.version_number,"
                    " human_organs = excluded.human_organs,"
                    " revised_organs = excluded.revised_organs, reviewer = excluded.reviewer,"
                    " record_time = excluded.record_time, geometry = excluded.geometry",
                    (
                        case_id,
                        label_version_id,
                        int(version_number),
                        json.dumps(human),
                        json.dumps(revised),
                        reviewer,
                        self._clock().isoformat(),
                        json.dumps({str(k): g.to_list() for k, g in sorted(geoms.items())}),
                    ),
                )
                row = self._conn.execute("SELECT * FROM worklist WHERE case_id = ?", (case_id,)).fetchone()
                if row is not None:
                    organs = [_organ_of(o) for o in json.loads(row["organs"])]
                    excluded = set(json.loads(row["labelled_organs"])) | set(human)
                    self._conn.execute(
                        "UPDATE worklist SET priority = ?, attention_mask = ?,"
                        " latest_label_version_id = ?, human_organs = ? WHERE case_id = ?",
                        (
                            case_priority(organs, excluded),
                            attention_mask(organs, excluded),
                            label_version_id,
                            json.dumps(human),
                            case_id,
                        ),
                    )
            if self._conn.execute("SELECT 1 FROM worklist WHERE case_id = ?", (case_id,)).fetchone() is None:
                return None
            return self._entry_and_rank(case_id, self._now_us())

    def learned_geometry(self) -> tuple[list[dict[int, OrganSummary]], str]:
        """(per case, the human-decided organ summaries of its latest recorded label version,
        ordered by case_id; a change tag that differs whenever any of them changed)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT case_id, label_version_id, geometry FROM case_labels WHERE geometry != '{}' ORDER BY case_id"
            ).fetchall()
        cases = [
            {int(k): OrganSummary.from_list(int(k), v) for k, v in json.loads(r["geometry"]).items()} for r in rows
        ]
        tag = hashlib.sha256(",".join(r["label_version_id"] for r in rows).encode()).hexdigest()
        return cases, tag

    def get(self, case_id: str) -> tuple[WorklistEntry, int]:
        """(entry, 1-based rank) of `case_id`, or NotFound("CASE_NOT_FOUND")."""
        with self._lock:
            return self._entry_and_rank(case_id, self._now_us())

    def list(
        self, page_size: int = 0, page_token: str = "", where: WorklistFilter | None = None
    ) -> tuple[list[tuple[WorklistEntry, int]], str, int]:
        """A page of the worklist, highest priority first, optionally filtered.

        page_size: 0 -> 50, max 1000, negative -> INVALID_PAGE_SIZE. page_token: from a
        previous call with the same filter, else INVALID_PAGE_TOKEN. Returns
        ([(entry, rank), ...], next_page_token ("" at the end), number of matching cases).
        """
        flt = (where or WorklistFilter()).validated()
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        scope = flt.scope()
        cursor = sq.decode_page_token(page_token, "worklist", scope=scope, domain=DOMAIN)
        clauses: list[str] = []
        with self._lock:
            now = self._now_us()
            params: dict[str, Any] = {"now": now}
            if flt.organs:
                clauses.append("(attention_mask & :omask) != 0")
                params["omask"] = sum(1 << o for o in flt.organs)
            if flt.round_number:
                clauses.append(
                    "EXISTS (SELECT 1 FROM round_cases rc WHERE rc.round_number ="
                    " :round AND rc.case_id = worklist.case_id)"
                )
                params["round"] = flt.round_number
            if flt.statuses:
                clauses.append(f"{_STATUS_SQL} IN ({','.join(str(int(s)) for s in flt.statuses)})")
            filtered = bool(clauses)
            total = int(
                self._conn.execute(
                    "SELECT COUNT(*) FROM worklist" + (" WHERE " + " AND ".join(clauses) if clauses else ""), params
                ).fetchone()[0]
            )
            if cursor is not None:
                p, c = cursor.get("p"), cursor.get("c")
                if not isinstance(p, (int, float)) or isinstance(p, bool) or not isinstance(c, str):
                    raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
                clauses.append("(priority < :p OR (priority = :p AND case_id > :c))")
                params.update(p=p, c=c)
            params["limit"] = size + 1
            rows = self._conn.execute(
                "SELECT * FROM worklist"
                + (" WHERE " + " AND ".join(clauses) if clauses else "")
                + " ORDER BY priority DESC, case_id LIMIT :limit",
                params,
            ).fetchall()
            more = len(rows) > size
            rows = rows[:size]
            if filtered:
                ranks = [self._rank(r["priority"], r["case_id"]) for r in rows]
            else:
                first = self._rank(rows[0]["priority"], rows[0]["case_id"]) if rows else 0
                ranks = [first + i for i in range(len(rows))]
        items = [(self._entry(r, now), rank) for r, rank in zip(rows, ranks)]
        token = (
            sq.encode_page_token("worklist", {"p": rows[-1]["priority"], "c": rows[-1]["case_id"]}, scope=scope)
            if more
            else ""
        )
        return items, token, total

    def count_by_status(self) -> dict[Status, int]:
        """Number of cases per status at read time (every status present, possibly 0)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_STATUS_SQL} AS s, COUNT(*) AS n FROM worklist GROUP BY s", {"now": self._now_us()}
            ).fetchall()
        counts = {s: 0 for s in Status}
        counts.update({Status(int(r["s"])): int(r["n"]) for r in rows})
        return counts

    # --------------------------------------------------------------------------- leases

    def lease(self, case_id: str, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Lease `case_id` to `reviewer` for `seconds` (None/0: the default).

        The holder leasing again renews. Errors: CASE_NOT_FOUND; CASE_ALREADY_REVIEWED and
        LEASE_HELD_BY_OTHER (FailedPrecondition); PRINCIPAL_REQUIRED; INVALID_LEASE_DURATION.
        """
        check_principal(reviewer)
        length = _lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            if self._active(row, now) and row["lease_holder"] != reviewer:
                raise FailedPrecondition(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def lease_next(self, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Lease the highest-priority PENDING case of the open round to `reviewer`.

        If `reviewer` already holds an unexpired lease on an unreviewed case of the open round,
        that lease is renewed and returned. Errors: NO_OPEN_ROUND (FailedPrecondition),
        NO_CASE_AVAILABLE (NotFound), PRINCIPAL_REQUIRED, INVALID_LEASE_DURATION.
        """
        check_principal(reviewer)
        length = _lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            rnd = self._open_round_number()
            if rnd is None:
                raise FailedPrecondition("NO_OPEN_ROUND", "no review round is open; start one", domain=DOMAIN)
            held = self._conn.execute(
                "SELECT case_id FROM worklist WHERE round_number = ? AND outcome = 0"
                " AND lease_holder = ? AND lease_expire_us > ?"
                " ORDER BY priority DESC, case_id LIMIT 1",
                (rnd, reviewer, now),
            ).fetchone()
            if held is not None:
                case_id = held["case_id"]
            else:
                free = self._conn.execute(
                    "SELECT case_id FROM worklist WHERE round_number = ? AND outcome = 0"
                    " AND (lease_holder = '' OR lease_expire_us <= ?)"
                    " ORDER BY priority DESC, case_id LIMIT 1",
                    (rnd, now),
                ).fetchone()
                if free is None:
                    raise NotFound(
                        "NO_CASE_AVAILABLE",
                        "no pending case left in the open round",
                        domain=DOMAIN,
                        metadata={"round_number": str(rnd)},
                    )
                case_id = free["case_id"]
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def renew(self, case_id: str, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Extend `reviewer`'s unexpired lease to now + `seconds` (None/0: the default).

        Errors: LEASE_HELD_BY_OTHER (PermissionDenied); LEASE_EXPIRED, LEASE_REQUIRED,
        CASE_ALREADY_REVIEWED (FailedPrecondition); CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        length = _lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def release(self, case_id: str, reviewer: str) -> tuple[WorklistEntry, int]:
        """Give `reviewer`'s lease back (the case becomes PENDING).

        Succeeds without change when nobody holds the case (or the lease expired, or the case
        was reviewed meanwhile). Errors: LEASE_HELD_BY_OTHER (PermissionDenied) when another
        reviewer holds an unexpired lease; CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["lease_holder"] and row["lease_holder"] != reviewer and self._active(row, now):
                raise PermissionDenied(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            self._conn.execute(
                "UPDATE worklist SET lease_holder = '', lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = ? AND lease_holder = ?",
                (case_id, reviewer),
            )
            return self._entry_and_rank(case_id, now)

    def complete(
        self, case_id: str, reviewer: str, outcome: Status, label_version_id: str = ""
    ) -> tuple[WorklistEntry, int]:
        """Complete the review of `case_id` as ACCEPTED or REVISED; only by the holder of an
        unexpired lease. The lease ends. A repeat by the same reviewer with the same outcome
        and label version returns the case unchanged.

        Errors: INVALID_OUTCOME; LEASE_HELD_BY_OTHER (PermissionDenied); LEASE_EXPIRED,
        LEASE_REQUIRED, CASE_ALREADY_REVIEWED (FailedPrecondition); CASE_NOT_FOUND;
        PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        try:
            outcome = Status(int(outcome))
        except ValueError:
            outcome = Status.PENDING
        if outcome not in REVIEWED:
            raise InvalidArgument("INVALID_OUTCOME", "outcome must be ACCEPTED or REVISED", domain=DOMAIN)
        if label_version_id:
            _check_id("label_version_id", label_version_id)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                if (row["outcome"], row["reviewer"], row["label_version_id"]) == (
                    int(outcome),
                    reviewer,
                    label_version_id,
                ):
                    return self._entry_and_rank(case_id, now)
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            cur = self._conn.execute(
                "UPDATE worklist SET outcome = ?, reviewer = ?, label_version_id = ?,"
                " review_us = ?, review_round = round_number, lease_holder = '',"
                " lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = ? AND outcome = 0 AND lease_holder = ? AND lease_expire_us > ?",
                (int(outcome), reviewer, label_version_id, now, case_id, reviewer, now),
            )
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; never complete twice
                raise FailedPrecondition("LEASE_REQUIRED", "the lease changed meanwhile", domain=DOMAIN)
            return self._entry_and_rank(case_id, now)

    # --------------------------------------------------------------------------- rounds

    def start_round(self, budget_fraction: float, creator: str, request_id: str = "") -> Round:
        """Close the open round and select the top ceil(budget_fraction x U) of the U
        unreviewed cases by priority (ties: case_id) into a new round.

        budget_fraction in (0, 1] (INVALID_BUDGET otherwise); the product is computed in
        decimal from the fraction's shortest repr, so 0.07 x 100 selects 7, not 8. A repeated
        `request_id` returns the round it started. Errors: NO_UNREVIEWED_CASES
        (FailedPrecondition), PRINCIPAL_REQUIRED.
        """
        check_principal(creator)
        f = float(budget_fraction)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise InvalidArgument(
                "INVALID_BUDGET",
                "budget_fraction must be in (0, 1]",
                domain=DOMAIN,
                metadata={"budget_fraction": str(budget_fraction)},
            )
        if request_id:
            _check_id("request_id", request_id)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            if request_id:
                prev = self._conn.execute(
                    "SELECT round_number FROM rounds WHERE request_id = ?", (request_id,)
                ).fetchone()
                if prev is not None:
                    return self._round(int(prev[0]))
            candidates = int(self._conn.execute("SELECT COUNT(*) FROM worklist WHERE outcome = 0").fetchone()[0])
            if candidates == 0:
                raise FailedPrecondition("NO_UNREVIEWED_CASES", "every case has been reviewed", domain=DOMAIN)
            n = min(candidates, math.ceil(Decimal(repr(f)) * candidates))
            self._conn.execute("UPDATE rounds SET close_us = ? WHERE close_us IS NULL", (now,))
            number = int(self._conn.execute("SELECT COALESCE(MAX(round_number), 0) + 1 FROM rounds").fetchone()[0])
            self._conn.execute(
                "INSERT INTO rounds(round_number, budget_fraction, candidate_count, creator,"
                " request_id, create_us) VALUES (?, ?, ?, ?, ?, ?)",
                (number, f, candidates, creator, request_id or None, now),
            )
            self._conn.execute(
                "INSERT INTO round_cases(round_number, case_id, selection_rank, priority)"
                " SELECT ?, case_id, ROW_NUMBER() OVER (ORDER BY priority DESC, case_id),"
                " priority FROM worklist WHERE outcome = 0"
                " ORDER BY priority DESC, case_id LIMIT ?",
                (number, n),
            )
            self._conn.execute(
                "UPDATE worklist SET round_number = ? WHERE case_id IN"
                " (SELECT case_id FROM round_cases WHERE round_number = ?)",
                (number, number),
            )
            return self._round(number)

    def get_round(self, round_number: int = 0) -> Round:
        """Round `round_number` (0: the open round), or NotFound("ROUND_NOT_FOUND")."""
        with self._lock:
            number = self._open_round_number() if round_number == 0 else int(round_number)
            if number is None or number < 0:
                raise NotFound(
                    "ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(round_number)}
                )
            return self._round(number)

    def list_rounds(self, page_size: int = 0, page_token: str = "") -> tuple[list[Round], str, int]:
        """A page of rounds, newest first: (rounds, next_page_token, total)."""
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        cursor = sq.decode_page_token(page_token, "rounds", domain=DOMAIN)
        before = None
        if cursor is not None:
            before = cursor.get("n")
            if not isinstance(before, int) or isinstance(before, bool):
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
        with self._lock:
            total = int(self._conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
            numbers = [
                int(r[0])
                for r in self._conn.execute(
                    "SELECT round_number FROM rounds WHERE round_number < ? ORDER BY round_number DESC LIMIT ?",
                    (before if before is not None else 2**62, size + 1),
                ).fetchall()
            ]
            more = len(numbers) > size
            rounds = [self._round(n) for n in numbers[:size]]
        token = sq.encode_page_token("rounds", {"n": rounds[-1].round_number}) if more else ""
        return rounds, token, total

    # -------------------------------------------------------------------------- helpers

    def _row(self, case_id: str) -> sqlite3.Row:
        row = self._conn.execute("SELECT * FROM worklist WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise NotFound(
                "CASE_NOT_FOUND", "case is not on the worklist", domain=DOMAIN, metadata={"case_id": case_id[:80]}
            )
        return row

    def _entry_and_rank(self, case_id: str, now: int) -> tuple[WorklistEntry, int]:
        row = self._row(case_id)
        return self._entry(row, now), self._rank(row["priority"], row["case_id"])

    @staticmethod
    def _active(row: sqlite3.Row, now: int) -> bool:
        return bool(row["lease_holder"]) and int(row["lease_expire_us"]) > now

    @staticmethod
    def _lease_meta(row: sqlite3.Row) -> dict[str, str]:
        return {
            "case_id": row["case_id"][:80],
            "reviewer": row["lease_holder"],
            "expire_time": _from_us(row["lease_expire_us"]).isoformat(),
        }

    @staticmethod
    def _already_reviewed(case_id: str) -> FailedPrecondition:
        return FailedPrecondition(
            "CASE_ALREADY_REVIEWED",
            "the case has already been reviewed",
            domain=DOMAIN,
            metadata={"case_id": case_id[:80]},
        )

    def _require_holder(self, row: sqlite3.Row, reviewer: str, now: int) -> None:
        holder = row["lease_holder"]
        if holder == reviewer and self._active(row, now):
            return
        if holder and holder != reviewer and self._active(row, now):
            raise PermissionDenied(
                "LEASE_HELD_BY_OTHER", "another reviewer holds this case", domain=DOMAIN, metadata=self._lease_meta(row)
            )
        if holder == reviewer:
            raise FailedPrecondition(
                "LEASE_EXPIRED",
                "the lease has expired; lease the case again",
                domain=DOMAIN,
                metadata=self._lease_meta(row),
            )
        raise FailedPrecondition(
            "LEASE_REQUIRED",
            "lease the case before this call",
            domain=DOMAIN,
            metadata={"case_id": row["case_id"][:80]},
        )

    def _take(self, case_id: str, reviewer: str, now: int, seconds: float) -> None:
        expire = now + int(round(seconds * 1_000_000))
        cur = self._conn.execute(
            "UPDATE worklist SET lease_holder = ?, lease_start_us = ?, lease_expire_us = ?"
            " WHERE case_id = ? AND outcome = 0"
            " AND (lease_holder = '' OR lease_holder = ? OR lease_expire_us <= ?)",
            (reviewer, now, expire, case_id, reviewer, now),
        )
        if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; never two holders
            raise FailedPrecondition(
                "LEASE_HELD_BY_OTHER",
                "the case was leased meanwhile",
                domain=DOMAIN,
                metadata={"case_id": case_id[:80]},
            )

    def _open_round_number(self) -> int | None:
        row = self._conn.execute(
            "SELECT round_number FROM rounds WHERE close_us IS NULL ORDER BY round_number DESC LIMIT 1"
        ).fetchone()
        return None if row is None else int(row[0])

    def _round(self, number: int) -> Round:
        row = self._conn.execute("SELECT * FROM rounds WHERE round_number = ?", (number,)).fetchone()
        if row is None:
            raise NotFound("ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(number)})
        stats = self._conn.execute(
            "SELECT COUNT(*) AS n,"
            " COALESCE(SUM(w.outcome = 3 AND w.review_round = :r), 0) AS accepted,"
            " COALESCE(SUM(w.outcome = 4 AND w.review_round = :r), 0) AS revised,"
            " COALESCE(SUM(w.outcome = 0), 0) AS unreviewed"
            " FROM round_cases rc JOIN worklist w ON w.case_id = rc.case_id"
            " WHERE rc.round_number = :r",
            {"r": number},
        ).fetchone()
        return Round(
            round_number=number,
            budget_fraction=float(row["budget_fraction"]),
            candidate_count=int(row["candidate_count"]),
            case_count=int(stats["n"]),
            accepted_count=int(stats["accepted"]),
            revised_count=int(stats["revised"]),
            unreviewed_count=int(stats["unreviewed"]),
            creator=row["creator"],
            create_time=_from_us(row["create_us"]),
            close_time=None if row["close_us"] is None else _from_us(row["close_us"]),
        )

    def _rank(self, priority: float, case_id: str) -> int:
        ahead = self._conn.execute(
            "SELECT COUNT(*) FROM worklist WHERE priority > ? OR (priority = ? AND case_id < ?)",
            (priority, priority, case_id),
        ).fetchone()[0]
        return int(ahead) + 1

    @staticmethod
    def _entry(row: sqlite3.Row, now: int) -> WorklistEntry:
        outcome = int(row["outcome"])
        leased = not outcome and bool(row["lease_holder"]) and int(row["lease_expire_us"]) > now
        status = Status(outcome) if outcome else (Status.LEASED if leased else Status.PENDING)
        return WorklistEntry(
            case_id=row["case_id"],
            series_id=row["series_id"],
            source_job_id=row["source_job_id"],
            priority=float(row["priority"]),
            organs=tuple(_organ_of(o) for o in json.loads(row["organs"])),
            heatmap_digest=row["heatmap_digest"],
            heatmap_size=int(row["heatmap_size"]),
            update_time=datetime.fromisoformat(row["update_time"]),
            labelled_organs=tuple(json.loads(row["labelled_organs"])),
            status=status,
            round_number=int(row["round_number"]),
            lease=(
                Lease(row["lease_holder"], _from_us(row["lease_start_us"]), _from_us(row["lease_expire_us"]))
                if leased
                else None
            ),
            review=(
                Review(
                    Status(outcome),
                    row["reviewer"],
                    row["label_version_id"],
                    _from_us(row["review_us"]),
                    int(row["review_round"]),
                )
                if outcome
                else None
            ),
            label_version_id=row["latest_label_version_id"],
            human_decided_organs=tuple(json.loads(row["human_organs"])),
        )
