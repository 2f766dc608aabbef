"""PostgreSQL backend of the label repository (psycopg 3; production deployments).

Same SQL and behaviour as the SQLite store (atlasflow.labels.sql.SqlLabelRepository, the
contract in atlasflow.labels.repository); what differs lives here:

- Connections: a small thread-safe pool (default at most 8), autocommit connections; writes run
  in `conn.transaction()`, reads are single statements (READ COMMITTED).
- Concurrent writers: a version write takes `pg_advisory_xact_lock(<64-bit hash of case_id>)`
  before reading the case head, and `SELECT ... FOR UPDATE` on the head row, so writers of one
  case serialise while other cases proceed in parallel; the partial UNIQUE indexes (one root per
  case, one child per version) and UNIQUE request_id are the backstop: a violation is retried
  once and then decided by the committed state.
- Migrations: `atlasflow.labels.schema.PG_MIGRATIONS` (the same numbers and contents as
  SQLite's `MIGRATIONS`, in PostgreSQL's dialect), versioned in `schema_migrations` like SQLite's, applied under a
  transaction-scoped advisory lock so that replicas starting together apply each one once.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from atlasflow.common.errors import FailedPrecondition, Unavailable
from atlasflow.common.sqlite import utc_now
from atlasflow.labels.repository import DOMAIN
from atlasflow.labels.schema import PG_MIGRATIONS
from atlasflow.labels.sql import SqlLabelRepository, Tx

_MIGRATION_LOCK = 0x61746C61_7366_6C6F & 0x7FFFFFFFFFFFFFFF  # "atlasflo"


def _qmarks(sql: str) -> str:
    """`?` placeholders -> psycopg's `%s` (our SQL holds no literal `?` or `%`)."""
    return sql.replace("%", "%%").replace("?", "%s")


def case_lock_key(case_id: str) -> int:
    """Signed 64-bit advisory-lock key of a case id (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(b"labels-case:" + case_id.encode()).digest()[:8], "big", signed=True)


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return self.conn.execute(_qmarks(sql), tuple(args)).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return self.conn.execute(_qmarks(sql), tuple(args)).fetchall()

    def run(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.conn.execute(_qmarks(sql), tuple(args))


class _PgBackend:
    for_update = " FOR UPDATE"
    integrity_errors: tuple[type[BaseException], ...] = (psycopg.errors.IntegrityError,)

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.closed = False
        with self._conn() as conn:
            migrate(conn, PG_MIGRATIONS)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.connect_timeout_s
            )
        except psycopg.OperationalError:
            raise Unavailable("DATABASE_UNAVAILABLE", "the labels database is not reachable", domain=DOMAIN) from None

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        self.slots.acquire()
        try:
            try:
                conn = self.idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            except psycopg.OperationalError:
                conn.close()  # broken connection: never returned to the pool
                raise Unavailable("DATABASE_UNAVAILABLE", "the labels database failed", domain=DOMAIN) from None
            except BaseException:
                if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.close()
                else:
                    self.idle.put(conn)
                raise
            else:
                if self.closed:
                    conn.close()
                else:
                    self.idle.put(conn)
        finally:
            self.slots.release()

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        with self._conn() as conn, conn.transaction():
            yield _PgTx(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._conn() as conn:
            yield _PgTx(conn)

    def lock_case(self, tx: Tx, case_id: str) -> None:
        tx.run("SELECT pg_advisory_xact_lock(?)", (case_lock_key(case_id),))

    def timestamp(self, dt: datetime) -> Any:
        return dt

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


def migrate(conn: psycopg.Connection[Any], migrations: Sequence[str]) -> int:
    """Apply the missing migrations in order, each in its own transaction; return the version.

    Concurrent starters serialise on an advisory lock; a database newer than `migrations`
    raises FailedPrecondition("SCHEMA_TOO_NEW").
    """
    with conn.transaction():  # IF NOT EXISTS alone races between concurrent starters
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
    for version, script in enumerate(migrations, start=1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,)).fetchone()
            if done:
                continue
            conn.execute(script)
            conn.execute("INSERT INTO schema_migrations(version, applied_at) VALUES (%s, %s)", (version, utc_now()))
    row = conn.execute("SELECT MAX(version) AS v FROM schema_migrations").fetchone()
    current = int((row or {}).get("v") or 0)
    if current > len(migrations):
        raise FailedPrecondition(
            "SCHEMA_TOO_NEW",
            "the database was written by a newer atlasflow version",
            domain="atlasflow",
            metadata={"db_version": str(current), "code_version": str(len(migrations))},
        )
    return current


class PostgresLabelRepository(SqlLabelRepository):
    """`LabelRepository` on PostgreSQL. url: libpq URL, e.g.
    "postgresql://atlasflow@db:5432/atlasflow"."""

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        super().__init__(_PgBackend(url, max_connections=max_connections))

    def __enter__(self) -> PostgresLabelRepository:
        return self
