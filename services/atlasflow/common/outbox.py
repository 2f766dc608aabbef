"""Durable hand-offs between services: the transactional outbox.

A step commits its result and the request for the next step in ONE SQLite transaction
(`enqueue` inside the caller's transaction). A dispatcher then delivers each row by calling
the next service; a row is marked done only after the callee acknowledged it. A crash between
commit and delivery leaves the row pending and it is delivered after restart; the callee's
RPCs are idempotent by the row's `dedupe_key`, so a replay is harmless.

Each row keeps the W3C traceparent of the step that wrote it, so the delivery continues the
study's trace across the asynchronous gap.

The dispatcher reads rows through an `OutboxStore`: `SqlOutboxStore` for an `outbox` table in a
service's `atlasflow.common.db` database (SQLite or PostgreSQL; also a service's own outbox
table with other columns: labels' ``version_events``, next to the versions, atlasflow.labels.sql),
or `SqliteOutboxStore` for the hand-written SQLite table of a service not yet moved onto
common/db.

Replicas (`SqlOutboxStore`): several dispatchers on one database claim due rows with a lease
(``claimed_by``, ``claim_expires_at``): on PostgreSQL the claiming SELECT is ``FOR UPDATE SKIP
LOCKED`` (replicas skip each other's rows instead of queueing on them), on SQLite the claim runs
in a ``BEGIN IMMEDIATE`` transaction (one writer at a time). A claimed row is not handed to
another dispatcher until its claim expires, so a replica that died mid-delivery leaves its rows
to the others after `SqlOutboxStore.claim_s`. Delivery is at least once: a replica killed after
the callee acknowledged but before `mark` commits, or one whose claim expired during a slow
call, delivers again; receivers are idempotent by the row's ``dedupe_key`` (exactly once in
effect). Schema: `create_outbox_table` (a new service's Alembic baseline) or
`add_outbox_claim_columns` (a legacy `OUTBOX_MIGRATION` table adopted by Alembic).

Metrics: ``atlasflow_queue_depth{queue="outbox"}`` (pending rows) and
``atlasflow_outbox_lag_seconds`` (age of the oldest pending row; stores with
``oldest_pending_age``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry import trace

from atlasflow.common.db import Database
from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.common.telemetry import context_from_traceparent

# The lock guarding a shared SQLite connection: a threading.Lock or RLock (anything usable in `with`).
DbLock = AbstractContextManager[Any]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# The hand-written outbox table, FROZEN: the legacy schemas of ingest and segmentation apply it
# to databases made before Alembic (adopted, then `add_outbox_claim_columns`). New tables come
# from `create_outbox_table`; never change this one.
OUTBOX_MIGRATION = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    dedupe_key TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    traceparent TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending'   -- pending | done | dead
);
CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
"""

# Codes that will not get better by retrying: the row is parked as 'dead' (visible, counted).
PERMANENT_CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "UNIMPLEMENTED",
    "DATA_LOSS",
}


def create_outbox_table(op: Any, table: str = "outbox", *, claims: bool = True) -> None:
    """Create the outbox table in an Alembic revision (`op`: ``alembic.op``): portable types,
    claim columns included. ``claims=False``: exactly the legacy `OUTBOX_MIGRATION` table (a
    baseline revision that adopts hand-written databases; a later revision then calls
    `add_outbox_claim_columns`)."""
    op.create_table(
        table,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False, unique=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("traceparent", sa.Text(), nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False, server_default=""),
        sa.Column("state", sa.Text(), nullable=False, server_default="pending"),  # pending | done | dead
        *(_claim_columns() if claims else []),
        sqlite_autoincrement=True,
    )
    op.create_index(f"{table}_due", table, ["state", "next_attempt_at"])


def _claim_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("claimed_by", sa.Text(), nullable=False, server_default=""),
        sa.Column("claim_expires_at", sa.Double(), nullable=False, server_default="0"),
        sa.Column("create_time", sa.Double(), nullable=False, server_default="0"),
    ]


def add_outbox_claim_columns(op: Any, table: str = "outbox") -> None:
    """Add the claim columns to a legacy `OUTBOX_MIGRATION` table (an Alembic revision after a
    service's baseline); the rows' ``create_time`` starts as their ``next_attempt_at``."""
    for column in _claim_columns():
        op.add_column(table, column)
    op.execute(sa.text(f"UPDATE {table} SET create_time = next_attempt_at"))


def enqueue(
    conn: sqlite3.Connection | sa.Connection, topic: str, dedupe_key: str, payload: bytes, traceparent: str = ""
) -> None:
    """Add a hand-off inside the caller's open transaction (no commit here): an sqlite3
    connection (the hand-written table) or a SQLAlchemy connection of a `common.db` database
    (`SqlOutboxStore`'s table). A second row with the same ``dedupe_key`` is ignored."""
    now = time.time()
    if isinstance(conn, sa.Connection):
        conn.execute(
            sa.text(
                "INSERT INTO outbox(topic, dedupe_key, payload, traceparent, next_attempt_at, create_time)"
                " VALUES (:topic, :key, :payload, :tp, :now, :now) ON CONFLICT (dedupe_key) DO NOTHING"
            ),
            {"topic": topic, "key": dedupe_key, "payload": payload, "tp": traceparent, "now": now},
        )
        return
    conn.execute(
        "INSERT OR IGNORE INTO outbox(topic, dedupe_key, payload, traceparent, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
        (topic, dedupe_key, payload, traceparent, now),
    )


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    dedupe_key: str
    payload: bytes
    traceparent: str
    attempts: int


Handler = Callable[[OutboxRow], Awaitable[None]]


def _grpc_code_name(exc: BaseException) -> str:
    if isinstance(exc, AtlasflowError):
        return exc.code
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            c = code()
            return getattr(c, "name", str(c))
        except Exception:  # noqa: BLE001
            return "UNKNOWN"
    return "UNKNOWN"


class OutboxStore(Protocol):
    """Where a dispatcher reads due rows and records attempts (times: seconds since the epoch)."""

    def due(self, now: float, limit: int) -> list[OutboxRow]: ...

    def mark(self, row_id: int, state: str, error: str, next_attempt_at: float) -> None: ...

    def pending(self) -> int: ...


def replica_id() -> str:
    """This process's name in claims and leases: host (the pod's name), pid and a random suffix."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SqlOutboxStore:
    """The outbox table of a `common.db` database, safe for several dispatchers (replicas).

    `due` claims up to ``min(limit, batch)`` due rows for ``claim_s`` seconds (module
    docstring); `mark` records an attempt and releases the claim. A row marked ``done`` stays
    done whoever marks it; a retry or a ``dead`` mark only applies while this store still holds
    the row's claim (another replica may have taken an expired one).

    A service's own outbox table with other columns (labels' ``version_events``) needs the claim
    columns and ``create_time`` (seconds since the epoch) and names the rest: `key` (the row id
    column), `columns` (the SELECT list of a row) and `row_of` (that row -> `OutboxRow`)."""

    def __init__(
        self,
        db: Database,
        *,
        claimer: str | None = None,
        claim_s: float = 600.0,
        batch: int = 8,
        table: str = "outbox",
        key: str = "id",
        columns: str = "id, topic, dedupe_key, payload, traceparent, attempts",
        row_of: Callable[[Sequence[Any]], OutboxRow] | None = None,
    ) -> None:
        self.db = db
        self.claimer = claimer or replica_id()
        self.claim_s = claim_s
        self.batch = batch
        self.table = table
        self.key = key
        self.columns = columns
        self.row_of = row_of or _outbox_row

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        t, k = self.table, self.key
        with self.db.transaction() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    sa.text(
                        f"SELECT {k} FROM {t} WHERE state = 'pending' AND next_attempt_at <= :now"
                        f" AND claim_expires_at <= :now ORDER BY {k} LIMIT :n" + self.db.for_update(skip_locked=True)
                    ),
                    {"now": now, "n": min(limit, self.batch)},
                )
            ]
            if not ids:
                return []
            conn.execute(
                sa.text(
                    f"UPDATE {t} SET claimed_by = :me, claim_expires_at = :until"
                    f" WHERE {k} IN :ids AND state = 'pending' AND claim_expires_at <= :now"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"me": self.claimer, "until": now + self.claim_s, "ids": ids, "now": now},
            )
            rows = conn.execute(
                sa.text(
                    f"SELECT {self.columns} FROM {t} WHERE {k} IN :ids AND claimed_by = :me ORDER BY {k}"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"ids": ids, "me": self.claimer},
            ).all()
        return [self.row_of(r) for r in rows]

    def mark(self, row_id: int, state: str, error: str, next_attempt_at: float) -> None:
        mine = "" if state == "done" else " AND claimed_by = :me"
        with self.db.transaction() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {self.table} SET state = :state, attempts = attempts + 1, last_error = :error,"
                    " next_attempt_at = :next, claimed_by = '', claim_expires_at = 0"
                    f" WHERE {self.key} = :id AND state = 'pending'" + mine
                ),
                {"state": state, "error": error, "next": next_attempt_at, "id": row_id, "me": self.claimer},
            )

    def release(self) -> int:
        """Give back this store's unexpired claims (a replica stopping cleanly); return how many."""
        with self.db.transaction() as conn:
            return int(
                conn.execute(
                    sa.text(
                        f"UPDATE {self.table} SET claimed_by = '', claim_expires_at = 0"
                        " WHERE claimed_by = :me AND state = 'pending'"
                    ),
                    {"me": self.claimer},
                ).rowcount
            )

    def pending(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {self.table} WHERE state = 'pending'")).scalar_one())

    def oldest_pending_age(self, now: float) -> float:
        """Seconds since the oldest pending row was written (0 when none): the outbox lag."""
        with self.db.read() as conn:
            oldest = conn.execute(
                sa.text(f"SELECT MIN(create_time) FROM {self.table} WHERE state = 'pending'")
            ).scalar_one()
        return max(0.0, now - float(oldest)) if oldest is not None else 0.0


def _outbox_row(r: Sequence[Any]) -> OutboxRow:
    return OutboxRow(int(r[0]), r[1], r[2], bytes(r[3]), r[4], int(r[5]))


class SqliteOutboxStore:
    """The `outbox` table (OUTBOX_MIGRATION) on a connection shared under `lock`."""

    def __init__(self, conn: sqlite3.Connection, lock: DbLock) -> None:
        self.conn = conn
        self.lock = lock

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT id, topic, dedupe_key, payload, traceparent, attempts FROM outbox"
                " WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [OutboxRow(*r) for r in rows]

    def mark(self, row_id: int, state: str, error: str, next_attempt_at: float) -> None:
        with self.lock, self.conn:
            self.conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ? WHERE id = ?",
                (state, error, next_attempt_at, row_id),
            )

    def pending(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0])


class OutboxDispatcher:
    """Delivers pending rows in id order; retries with exponential backoff (max `max_backoff_s`).

    `store`: an `OutboxStore`, or an SQLite connection holding the `outbox` table (then `lock`
    guards it). Store calls run in worker threads (they may block on a database).
    """

    def __init__(
        self,
        store: OutboxStore | sqlite3.Connection,
        lock: DbLock | None,
        handlers: dict[str, Handler],
        metrics: Metrics,
        *,
        max_backoff_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        if isinstance(store, sqlite3.Connection):
            store = SqliteOutboxStore(store, lock or threading.Lock())
        self.store: OutboxStore = store
        self.handlers = handlers
        self.metrics = metrics
        # pending rows and lag read from the store at every scrape (right on every replica)
        metrics.add_outbox("outbox", store)
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Thread-unsafe; from other threads use loop.call_soon_threadsafe(dispatcher.wake)."""
        self._wake.set()

    def pending(self) -> int:
        return self.store.pending()

    def _mark(self, row: OutboxRow, state: str, error: str = "", delay: float = 0.0) -> None:
        self.store.mark(row.id, state, error, time.time() + delay)

    async def deliver_due(self) -> int:
        """Try every due row once; return how many were delivered."""
        delivered = 0
        for row in await asyncio.to_thread(self.store.due, time.time(), 32):
            handler = self.handlers.get(row.topic)
            if handler is None:
                await asyncio.to_thread(self._mark, row, "dead", "no handler for topic")
                continue
            token = otel_context.attach(context_from_traceparent(row.traceparent))
            try:
                with tracer.start_as_current_span(f"outbox.deliver {row.topic}"):
                    await handler(row)
            except Exception as exc:  # noqa: BLE001
                code = _grpc_code_name(exc)
                if code in PERMANENT_CODES:
                    log.error("hand-off rejected permanently", extra={"fields": {"topic": row.topic, "code": code}})
                    await asyncio.to_thread(self._mark, row, "dead", code)
                    self.metrics.count("outbox_dead")
                else:
                    delay = min(self.max_backoff_s, 0.5 * 2**row.attempts)
                    log.warning(
                        "hand-off failed, will retry",
                        extra={"fields": {"topic": row.topic, "code": code, "retry_in_s": delay}},
                    )
                    await asyncio.to_thread(self._mark, row, "pending", code, delay)
            else:
                await asyncio.to_thread(self._mark, row, "done")
                delivered += 1
                self.metrics.count("outbox_delivered")
            finally:
                otel_context.detach(token)
        self.metrics.set_queue_depth("outbox", await asyncio.to_thread(self.pending))
        lag = getattr(self.store, "oldest_pending_age", None)
        if lag is not None:
            self.metrics.set_outbox_lag("outbox", await asyncio.to_thread(lag, time.time()))
        return delivered

    async def run(self) -> None:
        """Deliver until cancelled; then give back this dispatcher's unexpired claims (stores with
        ``release()``), so another replica delivers them at once instead of after the expiry."""
        try:
            while True:
                await self.deliver_due()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except TimeoutError:
                    pass
        finally:
            release = getattr(self.store, "release", None)
            if release is not None:
                try:
                    release()
                except Exception as exc:  # noqa: BLE001 - stopping anyway; the claims expire
                    log.warning("outbox claims not released", extra={"fields": {"error": type(exc).__name__}})
