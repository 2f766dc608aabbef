"""Durable work table of segmentation jobs (no grpc).

A job is keyed by (series_id, series_version, ensemble_version): SegmentSeries is idempotent.
States follow `atlasflow.common.v1.OperationState`: QUEUED -> RUNNING -> SUCCEEDED | FAILED,
QUEUED | RUNNING -> CANCELLED, RUNNING -> QUEUED (restart or backend unavailable: retried
with backoff at ``next_attempt_at``; ``attempts`` counts claims, ``error_reason`` keeps the
last failed attempt's reason). On start, jobs left RUNNING by a crash go back to QUEUED.

Cancellation: a QUEUED job is CANCELLED at once; a RUNNING one gets ``cancel_requested`` and
becomes CANCELLED at its next step boundary (before inference, or after it instead of
committing the result: nothing is handed off), or instead of being requeued or failed.

A job's result and its two hand-offs (label version, attention summary) are committed in one
transaction with the outbox rows, so a crash after inference never loses the result and a
replay never duplicates it (the callees are idempotent by job id).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as db
from atlasflow.common.errors import NotFound
from atlasflow.common.outbox import OUTBOX_MIGRATION, enqueue

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        case_id TEXT NOT NULL,
        series_id TEXT NOT NULL,
        series_version INTEGER NOT NULL,
        ensemble_version TEXT NOT NULL,
        volume_digest TEXT NOT NULL,
        volume_size INTEGER NOT NULL,
        labelled_organs TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,                 -- QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
        stage TEXT NOT NULL DEFAULT '',
        fraction REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        result_json TEXT NOT NULL DEFAULT '',
        error_reason TEXT NOT NULL DEFAULT '',
        traceparent TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL,
        UNIQUE (series_id, series_version, ensemble_version)
    );
    CREATE INDEX jobs_due ON jobs(state, next_attempt_at);
    """,
    OUTBOX_MIGRATION,
]


@dataclass
class Job:
    job_id: str
    case_id: str
    series_id: str
    series_version: int
    ensemble_version: str
    volume_digest: str
    volume_size: int
    labelled_organs: list[int]
    state: str
    stage: str
    fraction: float
    attempts: int
    cancel_requested: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_reason: str = ""
    traceparent: str = ""
    create_time: float = 0.0
    update_time: float = 0.0
    next_attempt_at: float = 0.0


def _job(r: sqlite3.Row) -> Job:
    return Job(
        r["job_id"],
        r["case_id"],
        r["series_id"],
        r["series_version"],
        r["ensemble_version"],
        r["volume_digest"],
        r["volume_size"],
        json.loads(r["labelled_organs"]),
        r["state"],
        r["stage"],
        r["fraction"],
        r["attempts"],
        bool(r["cancel_requested"]),
        json.loads(r["result_json"]) if r["result_json"] else {},
        r["error_reason"],
        r["traceparent"],
        r["create_time"],
        r["update_time"],
        r["next_attempt_at"],
    )


class JobStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.conn = db.connect(Path(data_dir) / "segmentation.sqlite3")
        db.migrate(self.conn, MIGRATIONS)
        self.lock = threading.Lock()
        # Called with a job id after every committed change of that job (any thread); e.g. the
        # servicer's WaitSegmentationJob wakes its waiters. Listeners must not block.
        self.listeners: list[Callable[[str], None]] = []
        with self.lock, db.transaction(self.conn):
            self.conn.execute("UPDATE jobs SET state = 'QUEUED', stage = '' WHERE state = 'RUNNING'")

    def _changed(self, job_id: str) -> None:
        for listener in self.listeners:
            listener(job_id)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def submit(
        self,
        *,
        case_id: str,
        series_id: str,
        series_version: int,
        ensemble_version: str,
        volume_digest: str,
        volume_size: int,
        labelled_organs: list[int],
        traceparent: str,
    ) -> tuple[Job, bool]:
        """Create the job or return the existing one for the same key; (job, created)."""
        now = time.time()
        with self.lock, db.transaction(self.conn):
            r = self.conn.execute(
                "SELECT * FROM jobs WHERE series_id = ? AND series_version = ? AND ensemble_version = ?",
                (series_id, series_version, ensemble_version),
            ).fetchone()
            if r is not None:
                return _job(r), False
            job_id = "seg-" + uuid.uuid4().hex[:20]
            self.conn.execute(
                "INSERT INTO jobs(job_id, case_id, series_id, series_version, ensemble_version,"
                " volume_digest, volume_size, labelled_organs, state, next_attempt_at, traceparent,"
                " create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'QUEUED', ?, ?, ?, ?)",
                (
                    job_id,
                    case_id,
                    series_id,
                    series_version,
                    ensemble_version,
                    volume_digest,
                    volume_size,
                    json.dumps(sorted(set(labelled_organs))),
                    now,
                    traceparent,
                    now,
                    now,
                ),
            )
            r = self.conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(r), True

    def get(self, job_id: str) -> Job:
        with self.lock:
            r = self.conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if r is None:
            raise NotFound(
                "JOB_NOT_FOUND",
                "segmentation job not found",
                domain="atlasflow.segmentation",
                metadata={"job_id": job_id},
            )
        return _job(r)

    def list(self, page_size: int, page_token: str, case_id: str = "") -> tuple[list[Job], str]:
        size = db.clamp_page_size(page_size, domain="atlasflow.segmentation")
        cursor = db.decode_page_token(page_token, "jobs", scope=case_id, domain="atlasflow.segmentation")
        offset = int(cursor["offset"]) if cursor else 0
        where, args = ("WHERE case_id = ?", [case_id]) if case_id else ("", [])
        with self.lock:
            rows = self.conn.execute(
                f"SELECT * FROM jobs {where} ORDER BY create_time DESC, job_id LIMIT ? OFFSET ?",
                (*args, size + 1, offset),
            ).fetchall()
        token = db.encode_page_token("jobs", {"offset": offset + size}, scope=case_id) if len(rows) > size else ""
        return [_job(r) for r in rows[:size]], token

    def claim(self) -> Job | None:
        """Move the oldest due QUEUED job to RUNNING and return it."""
        with self.lock, db.transaction(self.conn):
            r = self.conn.execute(
                "SELECT * FROM jobs WHERE state = 'QUEUED' AND next_attempt_at <= ? ORDER BY create_time LIMIT 1",
                (time.time(),),
            ).fetchone()
            if r is None:
                return None
            self.conn.execute(
                "UPDATE jobs SET state = 'RUNNING', stage = 'LOADING', fraction = 0,"
                " attempts = attempts + 1, update_time = ? WHERE job_id = ?",
                (time.time(), r["job_id"]),
            )
            r = self.conn.execute("SELECT * FROM jobs WHERE job_id = ?", (r["job_id"],)).fetchone()
        self._changed(r["job_id"])
        return _job(r)

    def progress(self, job_id: str, stage: str, fraction: float) -> None:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE jobs SET stage = ?, fraction = ?, update_time = ? WHERE job_id = ? AND state = 'RUNNING'",
                (stage, fraction, time.time(), job_id),
            )
        self._changed(job_id)

    def retry_later(self, job_id: str, reason: str, delay_s: float) -> None:
        """RUNNING -> QUEUED, due in ``delay_s`` seconds (CANCELLED if a cancel was requested)."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'CANCELLED' ELSE 'QUEUED' END,"
                " stage = '', fraction = 0, error_reason = ?, next_attempt_at = ?, update_time = ?"
                " WHERE job_id = ? AND state = 'RUNNING'",
                (reason, time.time() + delay_s, time.time(), job_id),
            )
        self._changed(job_id)

    def fail(self, job_id: str, reason: str) -> None:
        """-> FAILED with ``reason`` (CANCELLED instead if a cancel was requested)."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'CANCELLED' ELSE 'FAILED' END,"
                " error_reason = ?, update_time = ? WHERE job_id = ? AND state IN ('RUNNING', 'QUEUED')",
                (reason, time.time(), job_id),
            )
        self._changed(job_id)

    def cancel_if_requested(self, job_id: str) -> bool:
        """RUNNING job with a pending cancel -> CANCELLED; True if it was cancelled."""
        with self.lock, db.transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE jobs SET state = 'CANCELLED', update_time = ? WHERE job_id = ?"
                " AND state = 'RUNNING' AND cancel_requested = 1",
                (time.time(), job_id),
            )
            cancelled = cur.rowcount > 0
        if cancelled:
            self._changed(job_id)
        return cancelled

    def cancel(self, job_id: str) -> Job:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE jobs SET state = 'CANCELLED', update_time = ? WHERE job_id = ? AND state = 'QUEUED'",
                (time.time(), job_id),
            )
            self.conn.execute(
                "UPDATE jobs SET cancel_requested = 1, update_time = ? WHERE job_id = ? AND state = 'RUNNING'",
                (time.time(), job_id),
            )
        self._changed(job_id)
        return self.get(job_id)

    def succeed(
        self, job_id: str, result: dict[str, Any], handoffs: Sequence[tuple[str, str, bytes]], traceparent: str
    ) -> bool:
        """Commit the result and the hand-offs atomically. A cancellation requested during the
        run wins: the job becomes CANCELLED and nothing is handed off. Returns True if handed off."""
        now = time.time()
        with self.lock, db.transaction(self.conn):
            r = self.conn.execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if r is None:  # purged (its study was deleted) while it ran: nothing is handed off
                return False
            if r["cancel_requested"]:
                self.conn.execute(
                    "UPDATE jobs SET state = 'CANCELLED', update_time = ? WHERE job_id = ?", (now, job_id)
                )
                cancelled = True
            else:
                cancelled = False
                self.conn.execute(
                    "UPDATE jobs SET state = 'SUCCEEDED', stage = 'HANDOFF', fraction = 1,"
                    " result_json = ?, error_reason = '', update_time = ? WHERE job_id = ?"
                    " AND state = 'RUNNING'",
                    (json.dumps(result), now, job_id),
                )
                for topic, key, payload in handoffs:
                    enqueue(self.conn, topic, key, payload, traceparent)
        self._changed(job_id)
        return not cancelled

    def purge_study(self, case_id: str) -> tuple[dict[str, int], Sequence[str]]:
        """Delete every job of `case_id` and their hand-offs still in the outbox (the study was
        deleted, `atlasflow.ingest.deletion`); a job running meanwhile hands nothing off
        (`succeed`). Returns (rows deleted per table, digests of the blobs the deleted jobs
        referenced: volume, label map, heatmap). Idempotent."""
        with self.lock, db.transaction(self.conn):
            rows = self.conn.execute(
                "SELECT job_id, volume_digest, result_json FROM jobs WHERE case_id = ?", (case_id,)
            ).fetchall()
            digests: set[str] = set()
            outbox = 0
            for r in rows:
                digests.add(r["volume_digest"])
                result = json.loads(r["result_json"]) if r["result_json"] else {}
                digests.update(d for d in (result.get("label_map"), result.get("heatmap")) if d)
                outbox += self.conn.execute(
                    "DELETE FROM outbox WHERE dedupe_key IN (?, ?)", (f"{r['job_id']}:labels", f"{r['job_id']}:ranking")
                ).rowcount
            jobs = self.conn.execute("DELETE FROM jobs WHERE case_id = ?", (case_id,)).rowcount
        for r in rows:
            self._changed(r["job_id"])
        return {"jobs": jobs, "outbox": outbox}, sorted(d for d in digests if d)

    def referenced(self, digests: Sequence[str]) -> Sequence[str]:
        """Those of `digests` that a job (its volume or its result's label map or heatmap) references."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        with self.lock:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for r in self.conn.execute(
                    f"SELECT volume_digest AS d FROM jobs WHERE volume_digest IN ({marks})"
                    f" UNION SELECT json_extract(result_json, '$.label_map') FROM jobs WHERE result_json != ''"
                    f" AND json_extract(result_json, '$.label_map') IN ({marks})"
                    f" UNION SELECT json_extract(result_json, '$.heatmap') FROM jobs WHERE result_json != ''"
                    f" AND json_extract(result_json, '$.heatmap') IN ({marks})",
                    (*chunk, *chunk, *chunk),
                ):
                    found.add(r[0])
        return sorted(found)

    def queued_count(self) -> int:
        with self.lock:
            return int(
                self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('QUEUED', 'RUNNING')").fetchone()[0]
            )
