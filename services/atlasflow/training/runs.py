"""The training service's run store: one table ``training_runs`` in SQLite
(``<data_dir>/training.sqlite3``) or PostgreSQL (``ATLASFLOW_TRAINING_DATABASE_URL``), with the
same SQL on both (``?`` placeholders, rewritten to ``%s`` for psycopg). No grpc.

A run (`RunRecord`) is an operation: ``state`` (the `OperationState` names QUEUED, RUNNING,
SUCCEEDED, FAILED, CANCELLED), ``cancel_requested``, and a JSON document holding the request
(hyperparameters, seed, holdout, margin), the progress (stage, per-member step/steps/loss) and
the result (manifest digest, version, gate, loss summaries, per-stage seconds, roll-out).
Transitions are guarded in SQL (``WHERE state = ...``), so a cancel racing the worker's claim or
finish never resurrects a terminal run. Runs are idempotent by ``request_id``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from atlasflow.common.errors import NotFound, Unavailable
from atlasflow.common.sqlite import (
    clamp_page_size,
    connect,
    decode_page_token,
    encode_page_token,
    migrate,
    transaction,
    utc_now,
)

DOMAIN = "atlasflow.training"
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_COLUMNS = "run_id, request_id, state, cancel_requested, requested_by, doc, error_reason, create_time, update_time"

SQLITE_MIGRATIONS = [
    """
    CREATE TABLE training_runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL UNIQUE,
        request_id TEXT UNIQUE,
        state TEXT NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        requested_by TEXT NOT NULL,
        doc TEXT NOT NULL,
        error_reason TEXT NOT NULL DEFAULT '',
        create_time TEXT NOT NULL,
        update_time TEXT NOT NULL
    );
    CREATE INDEX training_runs_state ON training_runs (state, seq);
    """
]

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_runs (
    seq BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL,
    doc TEXT NOT NULL,
    error_reason TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS training_runs_state ON training_runs (state, seq);
"""
_PG_LOCK = 0x74726169_6E696E67 & 0x7FFFFFFFFFFFFFFF  # "training"


@dataclass(frozen=True)
class RunRecord:
    """One training run. doc: {"request": {...}, "progress": {...}, "result": {...}}."""

    run_id: str
    request_id: str | None
    state: str
    cancel_requested: bool
    requested_by: str
    doc: Mapping[str, Any]
    error_reason: str
    create_time: datetime
    update_time: datetime
    seq: int = 0

    @property
    def request(self) -> Mapping[str, Any]:
        return dict(self.doc.get("request", {}))

    @property
    def progress(self) -> Mapping[str, Any]:
        return dict(self.doc.get("progress", {}))

    @property
    def result(self) -> Mapping[str, Any]:
        return dict(self.doc.get("result", {}))


@dataclass
class _Conn:
    sqlite: sqlite3.Connection | None = None
    pg: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _row(r: Mapping[str, Any]) -> RunRecord:
    return RunRecord(
        run_id=str(r["run_id"]),
        request_id=r["request_id"],
        state=str(r["state"]),
        cancel_requested=bool(r["cancel_requested"]),
        requested_by=str(r["requested_by"]),
        doc=json.loads(r["doc"]),
        error_reason=str(r["error_reason"]),
        create_time=datetime.fromisoformat(str(r["create_time"])),
        update_time=datetime.fromisoformat(str(r["update_time"])),
        seq=int(r["seq"]),
    )


class RunStore:
    """Training runs on SQLite or PostgreSQL (module docstring). ``location``: a SQLite file
    path or a ``postgresql://`` URL. Thread-safe; blocking (callers run it off the event loop)."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.postgres = self.location.startswith(("postgresql://", "postgres://"))
        self._c = _Conn()
        if self.postgres:
            import psycopg
            from psycopg.rows import dict_row

            self._psycopg = psycopg
            try:
                self._c.pg = psycopg.connect(self.location, autocommit=True, row_factory=dict_row, connect_timeout=10)
            except psycopg.OperationalError:
                raise self._unavailable() from None
            with self._c.pg.transaction():
                self._c.pg.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                self._c.pg.execute(PG_SCHEMA)
        else:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
            self._c.sqlite = connect(self.location)
            migrate(self._c.sqlite, SQLITE_MIGRATIONS)

    @staticmethod
    def _unavailable() -> Unavailable:
        return Unavailable("STORE_UNAVAILABLE", "the training run store cannot be reached", domain=DOMAIN)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction; yields ``execute(sql, args) -> cursor`` (``?`` placeholders)."""
        with self._c.lock:
            if self._c.sqlite is not None:
                with transaction(self._c.sqlite) as conn:
                    yield conn.execute
                return
            conn = self._c.pg
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                    yield lambda sql, args=(): conn.execute(sql.replace("?", "%s"), tuple(args))
            except self._psycopg.OperationalError:
                raise self._unavailable() from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        with self._c.lock:
            if self._c.sqlite is not None:
                return [dict(r) for r in self._c.sqlite.execute(sql, tuple(args)).fetchall()]
            try:
                return list(self._c.pg.execute(sql.replace("?", "%s"), tuple(args)).fetchall())
            except self._psycopg.OperationalError:
                raise self._unavailable() from None

    # ------------------------------------------------------------------ runs
    def create(self, request: Mapping[str, Any], requested_by: str, request_id: str | None = None) -> RunRecord:
        """A new QUEUED run, or the existing run of ``request_id``."""
        now = utc_now().isoformat()
        run_id = "tr-" + uuid.uuid4().hex[:20]
        doc = {"request": dict(request), "progress": {"stage": "", "members": []}, "result": {}}
        with self._tx() as execute:
            if request_id:
                existing = execute(
                    f"SELECT seq, {_COLUMNS} FROM training_runs WHERE request_id = ?", (request_id,)
                ).fetchone()
                if existing is not None:
                    return _row(existing)
            execute(
                f"INSERT INTO training_runs ({_COLUMNS}) VALUES (?, ?, ?, 0, ?, ?, '', ?, ?)",
                (run_id, request_id or None, QUEUED, requested_by, json.dumps(doc), now, now),
            )
        return self.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        rows = self._read(f"SELECT seq, {_COLUMNS} FROM training_runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise NotFound("RUN_NOT_FOUND", "no training run with this id", domain=DOMAIN, metadata={"run_id": run_id})
        return _row(rows[0])

    def find_request(self, request_id: str) -> RunRecord | None:
        rows = self._read(f"SELECT seq, {_COLUMNS} FROM training_runs WHERE request_id = ?", (request_id,))
        return _row(rows[0]) if rows else None

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[RunRecord], str]:
        """Runs newest first, one page (AIP-158)."""
        size = clamp_page_size(page_size, domain=DOMAIN)
        cursor = decode_page_token(page_token, "training_runs", domain=DOMAIN)
        before = int(cursor.get("seq", 0)) if cursor else 0
        where, args = ("WHERE seq < ?", [before]) if before else ("", [])
        rows = self._read(
            f"SELECT seq, {_COLUMNS} FROM training_runs {where} ORDER BY seq DESC LIMIT ?", [*args, size + 1]
        )
        runs = [_row(r) for r in rows[:size]]
        token = encode_page_token("training_runs", {"seq": runs[-1].seq}) if len(rows) > size else ""
        return runs, token

    def active(self) -> RunRecord | None:
        """The oldest QUEUED or RUNNING run."""
        rows = self._read(
            f"SELECT seq, {_COLUMNS} FROM training_runs WHERE state IN (?, ?) ORDER BY seq LIMIT 1", (QUEUED, RUNNING)
        )
        return _row(rows[0]) if rows else None

    def claim(self) -> RunRecord | None:
        """QUEUED -> RUNNING for the oldest queued run; None when none is queued."""
        with self._tx() as execute:
            row = execute(
                f"SELECT seq, {_COLUMNS} FROM training_runs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            execute(
                "UPDATE training_runs SET state = ?, update_time = ? WHERE run_id = ? AND state = ?",
                (RUNNING, utc_now().isoformat(), row["run_id"], QUEUED),
            )
        return self.get(str(row["run_id"]))

    def requeue_running(self) -> int:
        """RUNNING -> QUEUED for runs a dead process left (called at start); how many."""
        with self._tx() as execute:
            cur = execute(
                "UPDATE training_runs SET state = ?, update_time = ? WHERE state = ?",
                (QUEUED, utc_now().isoformat(), RUNNING),
            )
            return int(cur.rowcount or 0)

    def update(self, run_id: str, **doc_fields: Mapping[str, Any]) -> None:
        """Merge ``progress=...`` / ``result=...`` into a run's document (any state but a
        terminal one)."""
        with self._tx() as execute:
            row = execute("SELECT doc, state FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row["state"] in TERMINAL:
                return
            doc = json.loads(row["doc"])
            for key, value in doc_fields.items():
                doc[key] = {**doc.get(key, {}), **value}
            execute(
                "UPDATE training_runs SET doc = ?, update_time = ? WHERE run_id = ?",
                (json.dumps(doc), utc_now().isoformat(), run_id),
            )

    def finish(self, run_id: str, state: str, error_reason: str = "", **doc_fields: Mapping[str, Any]) -> None:
        """RUNNING -> ``state`` (SUCCEEDED, FAILED or CANCELLED) with the final document fields."""
        self.update(run_id, **doc_fields)
        with self._tx() as execute:
            execute(
                "UPDATE training_runs SET state = ?, error_reason = ?, update_time = ? WHERE run_id = ? AND state = ?",
                (state, error_reason, utc_now().isoformat(), run_id, RUNNING),
            )

    def cancel(self, run_id: str) -> RunRecord:
        """QUEUED -> CANCELLED at once; RUNNING: ``cancel_requested`` (the worker stops at its
        next step); terminal: unchanged."""
        self.get(run_id)
        now = utc_now().isoformat()
        with self._tx() as execute:
            execute(
                "UPDATE training_runs SET state = ?, cancel_requested = 1, update_time = ? "
                "WHERE run_id = ? AND state = ?",
                (CANCELLED, now, run_id, QUEUED),
            )
            execute(
                "UPDATE training_runs SET cancel_requested = 1, update_time = ? WHERE run_id = ? AND state = ?",
                (now, run_id, RUNNING),
            )
        return self.get(run_id)

    def cancel_requested(self, run_id: str) -> bool:
        rows = self._read("SELECT cancel_requested FROM training_runs WHERE run_id = ?", (run_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def close(self) -> None:
        with self._c.lock:
            if self._c.sqlite is not None:
                self._c.sqlite.close()
                self._c.sqlite = None
            if self._c.pg is not None:
                with contextlib.suppress(Exception):
                    self._c.pg.close()
                self._c.pg = None
