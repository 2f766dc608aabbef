"""The worklist store's connection: one SQLite file, one connection, one lock, the clock, and the
reads every part of the store shares (a case's row, entry and rank; the open round). No grpc.

Threading: one store holds one connection and serialises its calls with a lock; open one
instance per thread/process for parallel writers (see atlasflow.common.sqlite). Every change
runs in one ``BEGIN IMMEDIATE`` transaction.

`atlasflow.ranking.worklist.SqliteWorklist` is this store with its operations: attention and
lists (worklist.py), leases and reviews (leases.py), rounds (rounds.py), label versions and the
learned prior's geometry (label_versions.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Self

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import NotFound
from atlasflow.ranking.entries import DOMAIN, WorklistEntry
from atlasflow.ranking.schema import MIGRATIONS, entry_of, to_us


class WorklistStore:
    """The SQLite file behind the worklist (migrated on open).

    clock: returns timezone-aware UTC now (injectable for tests)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], datetime] = sq.utc_now) -> None:
        self._clock = clock
        self._conn = sq.connect(path)
        self._lock = threading.RLock()
        with self._lock:
            sq.migrate(self._conn, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now_us(self) -> int:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock must return timezone-aware datetimes")
        return to_us(now)

    def _row(self, case_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = self._conn.execute("SELECT * FROM worklist WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise NotFound(
                "CASE_NOT_FOUND", "case is not on the worklist", domain=DOMAIN, metadata={"case_id": case_id[:80]}
            )
        return row

    def _entry_and_rank(self, case_id: str, now: int) -> tuple[WorklistEntry, int]:
        row = self._row(case_id)
        return entry_of(row, now), self._rank(row["priority"], row["case_id"])

    def _rank(self, priority: float, case_id: str) -> int:
        ahead = self._conn.execute(
            "SELECT COUNT(*) FROM worklist WHERE priority > ? OR (priority = ? AND case_id < ?)",
            (priority, priority, case_id),
        ).fetchone()[0]
        return int(ahead) + 1

    def _open_round_number(self) -> int | None:
        row = self._conn.execute(
            "SELECT round_number FROM rounds WHERE close_us IS NULL ORDER BY round_number DESC LIMIT 1"
        ).fetchone()
        return None if row is None else int(row[0])
