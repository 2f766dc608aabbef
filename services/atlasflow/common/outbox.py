"""Durable hand-offs between services: the transactional outbox.

A step commits its result and the request for the next step in ONE SQLite transaction
(`enqueue` inside the caller's transaction). A dispatcher then delivers each row by calling
the next service; a row is marked done only after the callee acknowledged it. A crash between
commit and delivery leaves the row pending and it is delivered after restart; the callee's
RPCs are idempotent by the row's `dedupe_key`, so a replay is harmless.

Each row keeps the W3C traceparent of the step that wrote it, so the delivery continues the
study's trace across the asynchronous gap.

The dispatcher reads rows through an `OutboxStore`: `SqliteOutboxStore` for the `outbox` table
below (segmentation), or a service's own table in its own database (labels keeps its version
events next to the versions, in SQLite or PostgreSQL; atlasflow.labels.events).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.common.telemetry import context_from_traceparent

# The lock guarding a shared SQLite connection: a threading.Lock or RLock (anything usable in `with`).
DbLock = AbstractContextManager[Any]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

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


def enqueue(conn: sqlite3.Connection, topic: str, dedupe_key: str, payload: bytes, traceparent: str = "") -> None:
    """Add a hand-off inside the caller's open transaction (no commit here)."""
    conn.execute(
        "INSERT OR IGNORE INTO outbox(topic, dedupe_key, payload, traceparent, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
        (topic, dedupe_key, payload, traceparent, time.time()),
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
        return delivered

    async def run(self) -> None:
        while True:
            await self.deliver_due()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
