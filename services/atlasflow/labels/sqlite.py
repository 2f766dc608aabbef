"""SQLite backend of the label repository (the embedded default; no grpc).

`SqliteLabelRepository` runs `atlasflow.labels.sql.SqlLabelRepository`'s SQL on one SQLite
file; what differs from PostgreSQL lives here: one connection serialised by a lock, and
`BEGIN IMMEDIATE` (atlasflow.common.sqlite) as the write lock that serialises writers of every
case across connections and processes. Migrations: `atlasflow.labels.schema.MIGRATIONS`,
applied on open.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from atlasflow.common import sqlite as sq
from atlasflow.labels.schema import MIGRATIONS
from atlasflow.labels.sql import SqlLabelRepository, Tx


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # Rows are sqlite3.Row (atlasflow.common.sqlite.connect): looked up by column name, which
    # is all the shared SQL does with a row.

    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return cast("Mapping[str, Any] | None", self.conn.execute(sql, tuple(args)).fetchone())

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return cast("list[Mapping[str, Any]]", self.conn.execute(sql, tuple(args)).fetchall())

    def run(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.conn.execute(sql, tuple(args))


class _SqliteBackend:
    """One connection serialised by a lock; `BEGIN IMMEDIATE` serialises writers across
    connections and processes (atlasflow.common.sqlite)."""

    for_update = ""
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path) -> None:
        self.conn = sq.connect(path)
        self.lock = threading.RLock()
        with self.lock:
            sq.migrate(self.conn, MIGRATIONS)

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        with self.lock, sq.transaction(self.conn):
            yield _SqliteTx(self.conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self.lock:
            yield _SqliteTx(self.conn)

    def lock_case(self, tx: Tx, case_id: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already holds the database's write lock."""

    def timestamp(self, dt: datetime) -> Any:
        return dt.isoformat()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class SqliteLabelRepository(SqlLabelRepository):
    """`LabelRepository` on an SQLite file (the embedded default).

    Threading: one instance holds one connection and serialises its calls with a lock;
    several instances (threads, processes) on the same file are safe (atlasflow.common.sqlite).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(_SqliteBackend(path))

    def __enter__(self) -> SqliteLabelRepository:
        return self
