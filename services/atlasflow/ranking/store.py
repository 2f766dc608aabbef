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
from atlasflow.ranking.entries import DOMAIN, WorklistEntry
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

    def _open_round_number(self, conn: sa.Connection) -> int | None:
        number = scalar(
            conn, "SELECT round_number FROM rounds WHERE close_us IS NULL ORDER BY round_number DESC LIMIT 1"
        )
        return None if number is None else int(number)
