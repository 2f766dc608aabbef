"""The training service's run store: one table ``training_runs`` in SQLite
(``<data_dir>/training.sqlite3``) or PostgreSQL (``ATLASFLOW_TRAINING_DATABASE_URL``), on the one
database layer (`atlasflow.common.db`: SQLAlchemy Core, the same SQL on both; Alembic schema
``training`` in `atlasflow.training.migrations`, a database the hand-written code made is
adopted with its runs). No grpc.

A run (`RunRecord`) is an operation: ``state`` (the `OperationState` names QUEUED, RUNNING,
SUCCEEDED, FAILED, CANCELLED), ``cancel_requested``, and a JSON document holding the request
(hyperparameters, seed, holdout, margin), the progress (stage, per-member step/steps/loss) and
the result (manifest digest, version, gate, loss summaries, per-stage seconds, roll-out).
Transitions are guarded in SQL (``WHERE state = ...``), so a cancel racing the worker's claim or
finish never resurrects a terminal run. Runs are idempotent by ``request_id``. Writes are
serialised (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one transaction-scoped advisory lock, the
key the hand-written code took, so replicas of either version never claim one run twice).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa

from atlasflow.common.db import Database, PoolSettings, open_database
from atlasflow.common.errors import NotFound, Unavailable
from atlasflow.common.sqlite import clamp_page_size, decode_page_token, encode_page_token, utc_now
from atlasflow.training.migrations import LEGACY_PG_LOCK, MIGRATIONS

DOMAIN = "atlasflow.training"
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_COLUMNS = "run_id, request_id, state, cancel_requested, requested_by, doc, error_reason, create_time, update_time"


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


def _row(r: Mapping[str, Any] | sa.RowMapping) -> RunRecord:
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
    path or a ``sqlite:///`` / ``postgresql://`` URL (`atlasflow.common.db.database_url`);
    migrated on open. Thread-safe (one pooled connection per call); blocking (callers run it off
    the event loop). Raises Unavailable("STORE_UNAVAILABLE") when the database cannot be reached."""

    def __init__(self, location: str | Path, *, pool: PoolSettings | None = None) -> None:
        self.location = str(location)
        try:
            self._db: Database = open_database(location, MIGRATIONS, pool=pool)
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None
        self.postgres = self._db.is_postgresql

    @staticmethod
    def _unavailable() -> Unavailable:
        return Unavailable("STORE_UNAVAILABLE", "the training run store cannot be reached", domain=DOMAIN)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Callable[..., sa.CursorResult[Any]]]:
        """A write transaction; yields ``execute(sql, params) -> result`` (named ``:params``)."""
        try:
            with self._db.transaction() as conn:
                if self.postgres:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LEGACY_PG_LOCK})
                yield lambda sql, params=None: conn.execute(sa.text(sql), dict(params or {}))
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None

    def _read(self, sql: str, params: Mapping[str, Any] | None = None) -> list[sa.RowMapping]:
        try:
            with self._db.read() as conn:
                return list(conn.execute(sa.text(sql), dict(params or {})).mappings().all())
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None

    # ------------------------------------------------------------------ runs
    def create(self, request: Mapping[str, Any], requested_by: str, request_id: str | None = None) -> RunRecord:
        """A new QUEUED run, or the existing run of ``request_id``."""
        now = utc_now().isoformat()
        run_id = "tr-" + uuid.uuid4().hex[:20]
        doc = {"request": dict(request), "progress": {"stage": "", "members": []}, "result": {}}
        with self._tx() as execute:
            if request_id:
                existing = (
                    execute(f"SELECT seq, {_COLUMNS} FROM training_runs WHERE request_id = :r", {"r": request_id})
                    .mappings()
                    .first()
                )
                if existing is not None:
                    return _row(existing)
            execute(
                f"INSERT INTO training_runs ({_COLUMNS})"
                " VALUES (:run_id, :request_id, :state, 0, :by, :doc, '', :now, :now)",
                {
                    "run_id": run_id,
                    "request_id": request_id or None,
                    "state": QUEUED,
                    "by": requested_by,
                    "doc": json.dumps(doc),
                    "now": now,
                },
            )
        return self.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        rows = self._read(f"SELECT seq, {_COLUMNS} FROM training_runs WHERE run_id = :r", {"r": run_id})
        if not rows:
            raise NotFound("RUN_NOT_FOUND", "no training run with this id", domain=DOMAIN, metadata={"run_id": run_id})
        return _row(rows[0])

    def find_request(self, request_id: str) -> RunRecord | None:
        rows = self._read(f"SELECT seq, {_COLUMNS} FROM training_runs WHERE request_id = :r", {"r": request_id})
        return _row(rows[0]) if rows else None

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[RunRecord], str]:
        """Runs newest first, one page (AIP-158)."""
        size = clamp_page_size(page_size, domain=DOMAIN)
        cursor = decode_page_token(page_token, "training_runs", domain=DOMAIN)
        before = int(cursor.get("seq", 0)) if cursor else 0
        where = "WHERE seq < :before" if before else ""
        rows = self._read(
            f"SELECT seq, {_COLUMNS} FROM training_runs {where} ORDER BY seq DESC LIMIT :limit",
            {"before": before, "limit": size + 1} if before else {"limit": size + 1},
        )
        runs = [_row(r) for r in rows[:size]]
        token = encode_page_token("training_runs", {"seq": runs[-1].seq}) if len(rows) > size else ""
        return runs, token

    def active(self) -> RunRecord | None:
        """The oldest QUEUED or RUNNING run."""
        rows = self._read(
            f"SELECT seq, {_COLUMNS} FROM training_runs WHERE state IN (:q, :r) ORDER BY seq LIMIT 1",
            {"q": QUEUED, "r": RUNNING},
        )
        return _row(rows[0]) if rows else None

    def claim(self) -> RunRecord | None:
        """QUEUED -> RUNNING for the oldest queued run; None when none is queued."""
        with self._tx() as execute:
            row = (
                execute(
                    f"SELECT seq, {_COLUMNS} FROM training_runs WHERE state = :q ORDER BY seq LIMIT 1", {"q": QUEUED}
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            execute(
                "UPDATE training_runs SET state = :r, update_time = :now WHERE run_id = :id AND state = :q",
                {"r": RUNNING, "now": utc_now().isoformat(), "id": row["run_id"], "q": QUEUED},
            )
        return self.get(str(row["run_id"]))

    def requeue_running(self) -> int:
        """RUNNING -> QUEUED for runs a dead process left (called at start); how many."""
        with self._tx() as execute:
            cur = execute(
                "UPDATE training_runs SET state = :q, update_time = :now WHERE state = :r",
                {"q": QUEUED, "now": utc_now().isoformat(), "r": RUNNING},
            )
            return int(cur.rowcount or 0)

    def update(self, run_id: str, **doc_fields: Mapping[str, Any]) -> None:
        """Merge ``progress=...`` / ``result=...`` into a run's document (any state but a
        terminal one)."""
        with self._tx() as execute:
            row = execute("SELECT doc, state FROM training_runs WHERE run_id = :id", {"id": run_id}).mappings().first()
            if row is None or row["state"] in TERMINAL:
                return
            doc = json.loads(row["doc"])
            for key, value in doc_fields.items():
                doc[key] = {**doc.get(key, {}), **value}
            execute(
                "UPDATE training_runs SET doc = :doc, update_time = :now WHERE run_id = :id",
                {"doc": json.dumps(doc), "now": utc_now().isoformat(), "id": run_id},
            )

    def finish(self, run_id: str, state: str, error_reason: str = "", **doc_fields: Mapping[str, Any]) -> None:
        """RUNNING -> ``state`` (SUCCEEDED, FAILED or CANCELLED) with the final document fields."""
        self.update(run_id, **doc_fields)
        with self._tx() as execute:
            execute(
                "UPDATE training_runs SET state = :s, error_reason = :e, update_time = :now"
                " WHERE run_id = :id AND state = :r",
                {"s": state, "e": error_reason, "now": utc_now().isoformat(), "id": run_id, "r": RUNNING},
            )

    def cancel(self, run_id: str) -> RunRecord:
        """QUEUED -> CANCELLED at once; RUNNING: ``cancel_requested`` (the worker stops at its
        next step); terminal: unchanged."""
        self.get(run_id)
        now = utc_now().isoformat()
        with self._tx() as execute:
            execute(
                "UPDATE training_runs SET state = :c, cancel_requested = 1, update_time = :now"
                " WHERE run_id = :id AND state = :q",
                {"c": CANCELLED, "now": now, "id": run_id, "q": QUEUED},
            )
            execute(
                "UPDATE training_runs SET cancel_requested = 1, update_time = :now WHERE run_id = :id AND state = :r",
                {"now": now, "id": run_id, "r": RUNNING},
            )
        return self.get(run_id)

    def cancel_requested(self, run_id: str) -> bool:
        rows = self._read("SELECT cancel_requested FROM training_runs WHERE run_id = :id", {"id": run_id})
        return bool(rows and rows[0]["cancel_requested"])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
