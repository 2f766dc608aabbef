"""How the worklist is stored: the row <-> value encoding and the legacy hand-written SQLite
migrations (no grpc). The schema itself is migrated by Alembic (`atlasflow.ranking.migrations`,
revision 0001 = the state `LEGACY_MIGRATIONS` leave); `LEGACY_MIGRATIONS` only finish a database
made before, when it is adopted. Times are µs since the epoch (UTC) or ISO text; organs are JSON lists
``[organ, attention_ml, heatmap_ml, volume_ml, reasons, pointer, score]``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from atlasflow.ranking.entries import AttentionPointer, Lease, OrganAttention, Review, Status, WorklistEntry

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")


def to_us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def pointer_json(p: AttentionPointer | None) -> Any:
    if p is None:
        return None
    return [list(p.voxel_min), list(p.voxel_max), list(p.world_min_mm), list(p.world_max_mm), list(p.slices)]


def pointer_of(raw: Any) -> AttentionPointer | None:
    if raw is None:
        return None
    vmin, vmax, wmin, wmax, (first, last) = raw
    return AttentionPointer(_triple(vmin), _triple(vmax), _triple(wmin), _triple(wmax), (first, last))


def _triple(values: Sequence[T]) -> tuple[T, T, T]:
    """A stored [x, y, z] as the tuple it was (ints stay ints, floats floats)."""
    x, y, z = values
    return (x, y, z)


def organ_of(raw: list[Any]) -> OrganAttention:
    # Rows of schema version 1 hold [organ, attention, heatmap, volume] only.
    o, a, h, v = raw[:4]
    reasons = tuple(raw[4]) if len(raw) > 4 else ()
    pointer = pointer_of(raw[5]) if len(raw) > 5 else None
    score = raw[6] if len(raw) > 6 else None
    features = {str(k): float(x) for k, x in raw[7].items()} if len(raw) > 7 and raw[7] else {}
    return OrganAttention(
        int(o), float(a), float(h), float(v), reasons, pointer, None if score is None else float(score), features
    )


def organ_json(o: OrganAttention) -> list[Any]:
    """The stored form of one organ's attention (`organ_of` reads it back)."""
    raw: list[Any] = [o.organ, o.attention_ml, o.heatmap_ml, o.volume_ml, list(o.reasons), pointer_json(o.pointer)]
    raw.append(o.score)
    if o.features:
        raw.append(dict(sorted(o.features.items())))
    return raw


# Frozen: the hand-written migrations 1-4 of databases made before Alembic (never append here;
# add an Alembic revision instead).
LEGACY_MIGRATIONS: tuple[str, ...] = (
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
    # 3: label versions reported by the labels service (`atlasflow.ranking.label_versions`); the
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

MIGRATIONS = LEGACY_MIGRATIONS  # the name older code and tests import

# Status at read time (:now = µs since the epoch); numbers as in `Status`.
STATUS_SQL = (
    "(CASE WHEN outcome != 0 THEN outcome WHEN lease_holder != '' AND lease_expire_us > :now THEN 2 ELSE 1 END)"
)


def entry_of(row: Mapping[Any, Any], now: int) -> WorklistEntry:
    """The worklist row as an entry, status and lease as of ``now`` (µs since the epoch)."""
    outcome = int(row["outcome"])
    leased = not outcome and bool(row["lease_holder"]) and int(row["lease_expire_us"]) > now
    status = Status(outcome) if outcome else (Status.LEASED if leased else Status.PENDING)
    labelled = tuple(json.loads(row["labelled_organs"]))
    human = tuple(json.loads(row["human_organs"]))
    # reasons ask a reviewer to look; an organ the source labelled or a human decided asks
    # nothing (its attention does not count), so its reasons are not listed (kept in the row:
    # the figures and pointer stay)
    decided = set(labelled) | set(human)
    organs = tuple(
        replace(o, reasons=()) if o.organ in decided else o for o in (organ_of(r) for r in json.loads(row["organs"]))
    )
    return WorklistEntry(
        case_id=row["case_id"],
        series_id=row["series_id"],
        source_job_id=row["source_job_id"],
        priority=float(row["priority"]),
        organs=organs,
        heatmap_digest=row["heatmap_digest"],
        heatmap_size=int(row["heatmap_size"]),
        update_time=datetime.fromisoformat(row["update_time"]),
        labelled_organs=labelled,
        status=status,
        round_number=int(row["round_number"]),
        lease=(
            Lease(row["lease_holder"], from_us(row["lease_start_us"]), from_us(row["lease_expire_us"]))
            if leased
            else None
        ),
        review=(
            Review(
                Status(outcome),
                row["reviewer"],
                row["label_version_id"],
                from_us(row["review_us"]),
                int(row["review_round"]),
            )
            if outcome
            else None
        ),
        label_version_id=row["latest_label_version_id"],
        human_decided_organs=human,
    )
