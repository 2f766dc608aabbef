"""The worklist store's database: one `atlasflow.common.db.Database` (SQLite file or
PostgreSQL), the clock, and the reads every part of the store shares (a case's row, entry and
rank; the open round). No grpc.

Concurrency: the store is thread-safe (one pooled connection per call); any number of stores
(threads, processes, replicas) may share one database. Every change runs in one write
transaction (SQLite: ``BEGIN IMMEDIATE``, writers serialised; PostgreSQL: READ COMMITTED with
row locks, ``SELECT ... FOR UPDATE`` on the case a change reads before it writes, ``FOR UPDATE
SKIP LOCKED`` where `lease_next` claims work, and advisory locks per case / for rounds). Reads
run in one snapshot (`Database.read`).

`atlasflow.ranking.worklist.SqlWorklist` is this store with its operations: attention and lists
(worklist.py), leases and reviews (leases.py), rounds (rounds.py), label versions and the
learned prior's geometry (label_versions.py).

Per-process state (replicas)
----------------------------
Any number of ranking processes may serve one PostgreSQL database (SQLite: one process; the
chart allows several replicas only with PostgreSQL). What one process keeps in memory, and why
that is safe:

- the connection pool (`atlasflow.common.db.PoolSettings`): per process, nothing shared;
- the learned model (`atlasflow.ranking.learned.LearnedScorer`): SHARED THROUGH THE DATABASE.
  The model in force is a row (``learned_model``: the decisions it was fitted on and its
  generation); a process fits that same model again when its copy is of another generation,
  a submission is stored only when it was scored with the generation in force (checked in
  its transaction), rescoring checks it case by case and any replica finishes a rescore a
  killed one left (``worklist.scored_generation``); decisions are counted in the database;
- the learned population prior (`atlasflow.ranking.prior.LearnedPriorCache`): HARMLESS, a cache
  keyed by a tag read from the database on every call; every process derives the same prior
  from the same rows;
- metrics (`atlasflow.common.metrics.Metrics`): counters and latencies are per process (sum
  them over replicas); the queue-depth and lease gauges are read from the shared database, so
  every replica reports the same whole-worklist value (take ``max``, not ``sum``);
- background loops: NONE. Lease expiry is computed at read time from stored expiries (no
  sweeper); labels (RecordLabelVersion, from its outbox) and segmentation (SubmitAttention)
  push to whichever replica the Service picks, and both are idempotent in the database
  (per-case advisory lock; a version is kept only when newer, a decision once per (case,
  organ, version), a submission once per (case, job)). At start a process adopts the model in
  force and finishes any stale rescoring (`atlasflow.ranking.app.build_app`);
- settings (default lease length) and the clock: each process uses its own clock for lease
  expiry, so replicas need synchronised clocks (NTP; skew well below a lease's minutes);
  page tokens are self-contained cursors, valid on any replica.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa

from atlasflow.common import sqlite as sq
from atlasflow.common.db import Database, PoolSettings, open_database
from atlasflow.common.errors import NotFound
from atlasflow.ranking.entries import DOMAIN, ModelChanged, ModelState, WorklistEntry
from atlasflow.ranking.migrations import MIGRATIONS
from atlasflow.ranking.schema import entry_of, to_us

Row = sa.RowMapping


def one(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
    """The first row of `sql` (named ``:params``) as a mapping, or None."""
    return conn.execute(sa.text(sql), dict(params or {})).mappings().first()


def rows(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    return list(conn.execute(sa.text(sql), dict(params or {})).mappings().all())


def scalar(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    return conn.execute(sa.text(sql), dict(params or {})).scalar()


def run(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> int:
    """Execute a change; return the number of rows it touched."""
    return int(conn.execute(sa.text(sql), dict(params or {})).rowcount)


class WorklistStore:
    """The database behind the worklist (migrated on open).

    database: a file path (SQLite, the embedded default) or a ``sqlite:///`` /
    ``postgresql://`` URL (atlasflow.common.db.database_url); clock: returns timezone-aware UTC
    now (injectable for tests); pool: PostgreSQL pool settings."""

    def __init__(
        self,
        database: str | Path,
        *,
        clock: Callable[[], datetime] = sq.utc_now,
        pool: PoolSettings | None = None,
    ) -> None:
        self._clock = clock
        self._db: Database = open_database(database, MIGRATIONS, pool=pool)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now_us(self) -> int:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock must return timezone-aware datetimes")
        return to_us(now)

    def _row(self, conn: sa.Connection, case_id: str, *, lock: bool = False) -> Row:
        """The worklist row of `case_id` (``lock``: row-locked until the transaction ends on
        PostgreSQL), or NotFound("CASE_NOT_FOUND")."""
        row = one(
            conn, "SELECT * FROM worklist WHERE case_id = :c" + (self._db.for_update() if lock else ""), {"c": case_id}
        )
        if row is None:
            raise NotFound(
                "CASE_NOT_FOUND", "case is not on the worklist", domain=DOMAIN, metadata={"case_id": case_id[:80]}
            )
        return row

    def _entry_and_rank(self, conn: sa.Connection, case_id: str, now: int) -> tuple[WorklistEntry, int]:
        row = self._row(conn, case_id)
        return entry_of(row, now), self._rank(conn, row["priority"], row["case_id"])

    def _rank(self, conn: sa.Connection, priority: float, case_id: str) -> int:
        ahead = scalar(
            conn,
            "SELECT COUNT(*) FROM worklist WHERE priority > :p OR (priority = :p AND case_id < :c)",
            {"p": priority, "c": case_id},
        )
        return int(ahead) + 1

    def _model_state(self, conn: sa.Connection, *, share: bool = False) -> ModelState:
        """The learned model in force (``share``: row-locked FOR SHARE on PostgreSQL until the
        transaction ends, so a newer model is not published meanwhile)."""
        row = one(
            conn,
            "SELECT fitted_seq, generation, fitted FROM learned_model WHERE id = 1"
            + (" FOR SHARE" if share and self._db.is_postgresql else ""),
        )
        if row is None:  # the migration inserts the row; never deleted
            return ModelState()
        return ModelState(int(row["fitted_seq"]), int(row["generation"]), bool(row["fitted"]))

    def _check_generation(self, conn: sa.Connection, generation: int | None) -> None:
        """ModelChanged unless `generation` (None: any) is the learned model's in force; the
        model row stays share-locked until the transaction ends (`_model_state`)."""
        if generation is None:
            return
        state = self._model_state(conn, share=True)
        if state.generation != generation:
            raise ModelChanged(state)

    def _open_round_number(self, conn: sa.Connection) -> int | None:
        number = scalar(
            conn, "SELECT round_number FROM rounds WHERE close_us IS NULL ORDER BY round_number DESC LIMIT 1"
        )
        return None if number is None else int(number)
