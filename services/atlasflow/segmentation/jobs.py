"""Durable work table of segmentation jobs (no grpc), on the one database layer
(`atlasflow.common.db`: SQLite embedded, PostgreSQL shared by replicas; Alembic migrations in
``segmentation/migrations/``).

A job is keyed by (series_id, series_version, ensemble_version): SegmentSeries is idempotent
(``INSERT ... ON CONFLICT DO NOTHING``, so replicas submitting the same series at once create
one job). States follow `atlasflow.common.v1.OperationState`: QUEUED -> RUNNING -> SUCCEEDED |
FAILED, QUEUED | RUNNING -> CANCELLED, RUNNING -> QUEUED (backend unavailable: retried with
backoff at ``next_attempt_at``; ``attempts`` counts claims, ``error_reason`` keeps the last
failed attempt's reason).

Claims with leases (several replicas on one database): `claim_next` takes the oldest due QUEUED
job, or a RUNNING job whose lease expired (its replica died), in one write transaction: on
PostgreSQL the candidate row is read ``FOR UPDATE SKIP LOCKED`` (replicas claiming at once skip
each other's candidate), on SQLite the transaction is ``BEGIN IMMEDIATE``; the conditional
UPDATE is re-checked on the locked row, so a job is never claimed twice. The claim records
``lease_holder`` (this store's `holder`), ``lease_expires_at`` = now + `lease_s` and
``heartbeat_at``. The worker renews the lease while the job runs (`keep_alive`, every
``lease_s / 4``; `progress` renews it too). Every later change of a RUNNING job (progress,
retry, fail, cancel at a step boundary, success) applies only while this store still holds the
lease: a replica that lost its job (paused past the expiry, then taken over) commits nothing and
hands nothing off. A job left RUNNING by a crash is taken over once its lease expires (there is
no start-up sweep: the other replicas' jobs are RUNNING too).

Cancellation: a QUEUED job is CANCELLED at once; a RUNNING one gets ``cancel_requested`` and
becomes CANCELLED at its next step boundary (before inference, or after it instead of
committing the result: nothing is handed off), or instead of being requeued or failed.

A job's result and its two hand-offs (label version, attention summary) are committed in one
transaction with the outbox rows (`atlasflow.common.outbox.SqlOutboxStore`, table ``outbox``),
so a crash after inference never loses the result and a replay never duplicates it (the callees
are idempotent by job id).

The served ensemble version (table ``served_version``, one row): `record_served_version` is
what ActivateEnsembleVersion writes on the replica that got the call, `served_version` what
every replica reads (`atlasflow.segmentation.activation.ServedVersionFollower`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from atlasflow.common import sqlite as pages
from atlasflow.common.db import Database, open_database
from atlasflow.common.errors import NotFound
from atlasflow.common.outbox import SqlOutboxStore, enqueue, replica_id
from atlasflow.segmentation.migrations import MIGRATIONS

DOMAIN = "atlasflow.segmentation"
DEFAULT_LEASE_S = 60.0
#: file name of the embedded default database in the service's data directory
DEFAULT_FILE = "segmentation.sqlite3"

Row = sa.RowMapping


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
    lease_holder: str = ""
    lease_expires_at: float = 0.0


@dataclass(frozen=True)
class ServedVersion:
    """The activated ensemble version as recorded in the database (migration 0003)."""

    version: str
    card_digest: str
    activated_at: float
    activated_by: str = ""
    replica: str = ""


def _job(r: Row) -> Job:
    return Job(
        r["job_id"],
        r["case_id"],
        r["series_id"],
        int(r["series_version"]),
        r["ensemble_version"],
        r["volume_digest"],
        int(r["volume_size"]),
        json.loads(r["labelled_organs"]),
        r["state"],
        r["stage"],
        float(r["fraction"]),
        int(r["attempts"]),
        bool(r["cancel_requested"]),
        json.loads(r["result_json"]) if r["result_json"] else {},
        r["error_reason"],
        r["traceparent"],
        float(r["create_time"]),
        float(r["update_time"]),
        float(r["next_attempt_at"]),
        r["lease_holder"],
        float(r["lease_expires_at"]),
    )


def _one(conn: sa.Connection, sql: str, params: Mapping[str, Any]) -> Row | None:
    return conn.execute(sa.text(sql), dict(params)).mappings().first()


def _run(conn: sa.Connection, sql: str, params: Mapping[str, Any]) -> int:
    return int(conn.execute(sa.text(sql), dict(params)).rowcount)


def database_target(database: str | Path) -> str | Path:
    """What `JobStore` opens for `database`: a URL as is; an existing directory (the service's
    data directory) -> its ``segmentation.sqlite3``; any other path is the SQLite file."""
    if "://" in str(database):
        return str(database)
    path = Path(database)
    return path / DEFAULT_FILE if path.is_dir() else path


# A job a claim may take: due and QUEUED, or RUNNING with an expired lease (its replica died).
_CLAIMABLE = "((state = 'QUEUED' AND next_attempt_at <= :now) OR (state = 'RUNNING' AND lease_expires_at <= :now))"
# A RUNNING job whose lease this store holds.
_HELD = "state = 'RUNNING' AND lease_holder = :me"


class JobStore:
    """The job table (and the outbox) of one database; thread-safe, and safe for several
    replicas (processes) on one database (module docstring).

    database: a ``postgresql://`` URL, a SQLite file, or the data directory (its
    ``segmentation.sqlite3``); lease_s: how long a claim holds without a heartbeat; holder: this
    replica's name in leases (default host:pid:random); clock: seconds since the epoch;
    max_claims: a RUNNING job whose lease expired after this many claims is FAILED
    (``LEASE_EXPIRED``) instead of claimed again (a job that kills every replica running it
    must not go round for ever); 0 = no limit."""

    def __init__(
        self,
        database: str | Path,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
        max_claims: int = 0,
    ) -> None:
        self.db: Database = open_database(database_target(database), MIGRATIONS)
        self.max_claims = max_claims
        self.lease_s = lease_s
        self.holder = holder or replica_id()
        self.clock = clock
        # The outbox of the job hand-offs (claims carry this replica's name too).
        self.outbox = SqlOutboxStore(self.db, claimer=self.holder)
        # Called with a job id after every change of that job this replica committed (any
        # thread); e.g. the servicer's WaitSegmentationJob wakes its waiters (which also
        # re-read the job every few seconds, so another replica's changes are seen too).
        # Listeners must not block.
        self.listeners: list[Callable[[str], None]] = []

    def _changed(self, job_id: str) -> None:
        for listener in self.listeners:
            listener(job_id)

    def close(self) -> None:
        self.db.close()

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
        now = self.clock()
        with self.db.transaction() as conn:
            created = _run(
                conn,
                "INSERT INTO jobs(job_id, case_id, series_id, series_version, ensemble_version,"
                " volume_digest, volume_size, labelled_organs, state, next_attempt_at, traceparent,"
                " create_time, update_time) VALUES (:id, :case, :series, :version, :ensemble, :digest,"
                " :size, :organs, 'QUEUED', :now, :tp, :now, :now)"
                " ON CONFLICT (series_id, series_version, ensemble_version) DO NOTHING",
                {
                    "id": "seg-" + uuid.uuid4().hex[:20],
                    "case": case_id,
                    "series": series_id,
                    "version": series_version,
                    "ensemble": ensemble_version,
                    "digest": volume_digest,
                    "size": volume_size,
                    "organs": json.dumps(sorted(set(labelled_organs))),
                    "now": now,
                    "tp": traceparent,
                },
            )
            r = _one(
                conn,
                "SELECT * FROM jobs WHERE series_id = :s AND series_version = :v AND ensemble_version = :e",
                {"s": series_id, "v": series_version, "e": ensemble_version},
            )
        assert r is not None  # inserted, or there before
        return _job(r), created == 1

    def get(self, job_id: str) -> Job:
        with self.db.read() as conn:
            r = _one(conn, "SELECT * FROM jobs WHERE job_id = :id", {"id": job_id})
        if r is None:
            raise NotFound("JOB_NOT_FOUND", "segmentation job not found", domain=DOMAIN, metadata={"job_id": job_id})
        return _job(r)

    def list(self, page_size: int, page_token: str, case_id: str = "") -> tuple[list[Job], str]:
        size = pages.clamp_page_size(page_size, domain=DOMAIN)
        cursor = pages.decode_page_token(page_token, "jobs", scope=case_id, domain=DOMAIN)
        offset = int(cursor["offset"]) if cursor else 0
        where = "WHERE case_id = :case" if case_id else ""
        with self.db.read() as conn:
            rows = (
                conn.execute(
                    sa.text(f"SELECT * FROM jobs {where} ORDER BY create_time DESC, job_id LIMIT :n OFFSET :o"),
                    {"case": case_id, "n": size + 1, "o": offset},
                )
                .mappings()
                .all()
            )
        token = pages.encode_page_token("jobs", {"offset": offset + size}, scope=case_id) if len(rows) > size else ""
        return [_job(r) for r in rows[:size]], token

    def latest_for_case(self, case_id: str) -> Job | None:
        """The case's newest job (SUCCEEDED preferred): what a re-inference copies (series,
        series version, volume, labelled organs)."""
        with self.db.read() as conn:
            r = _one(
                conn,
                "SELECT * FROM jobs WHERE case_id = :case"
                " ORDER BY CASE WHEN state = 'SUCCEEDED' THEN 0 ELSE 1 END, create_time DESC, job_id LIMIT 1",
                {"case": case_id},
            )
        return None if r is None else _job(r)

    def claim_next(self) -> Job | None:
        """Claim the oldest due QUEUED job, or a RUNNING one whose lease expired, for this
        store's holder: -> RUNNING (stage LOADING, attempts + 1, a fresh lease); None if none."""
        now = self.clock()
        params = {"now": now, "me": self.holder, "until": now + self.lease_s}
        r: Row | None = None
        with self.db.transaction() as conn:
            exhausted = self._fail_exhausted(conn, now) if self.max_claims > 0 else []
            cand = _one(
                conn,
                f"SELECT job_id FROM jobs WHERE {_CLAIMABLE} ORDER BY create_time, job_id LIMIT 1"
                + self.db.for_update(skip_locked=True),
                params,
            )
            # the conditional update: 0 rows when another replica took it between read and update
            if cand is not None and _run(
                conn,
                "UPDATE jobs SET state = 'RUNNING', stage = 'LOADING', fraction = 0, attempts = attempts + 1,"
                " lease_holder = :me, lease_expires_at = :until, heartbeat_at = :now, update_time = :now"
                f" WHERE job_id = :id AND {_CLAIMABLE}",
                {**params, "id": cand["job_id"]},
            ):
                r = _one(conn, "SELECT * FROM jobs WHERE job_id = :id", {"id": cand["job_id"]})
        for job_id in exhausted:
            self._changed(job_id)
        if r is None:
            return None
        self._changed(r["job_id"])
        return _job(r)

    def _fail_exhausted(self, conn: sa.Connection, now: float) -> Sequence[str]:
        """RUNNING jobs whose lease expired after `max_claims` claims -> FAILED LEASE_EXPIRED
        (CANCELLED if a cancel was requested)."""
        gone = conn.execute(
            sa.text(
                "SELECT job_id FROM jobs WHERE state = 'RUNNING' AND lease_expires_at <= :now AND attempts >= :max"
                + self.db.for_update(skip_locked=True)
            ),
            {"now": now, "max": self.max_claims},
        ).all()
        for (job_id,) in gone:
            _run(
                conn,
                "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'CANCELLED' ELSE 'FAILED' END,"
                " error_reason = 'LEASE_EXPIRED', update_time = :now, lease_holder = '', lease_expires_at = 0"
                " WHERE job_id = :id AND state = 'RUNNING' AND lease_expires_at <= :now",
                {"now": now, "id": job_id},
            )
        return [job_id for (job_id,) in gone]

    def claim(self) -> Job | None:
        """`claim_next` (the name the worker used before leases)."""
        return self.claim_next()

    def heartbeat(self, job_id: str) -> bool:
        """Renew this store's lease of a RUNNING job; False if it no longer holds it."""
        now = self.clock()
        with self.db.transaction() as conn:
            return (
                _run(
                    conn,
                    f"UPDATE jobs SET lease_expires_at = :until, heartbeat_at = :now WHERE job_id = :id AND {_HELD}",
                    {"until": now + self.lease_s, "now": now, "id": job_id, "me": self.holder},
                )
                == 1
            )

    @contextlib.contextmanager
    def keep_alive(self, job_id: str, interval_s: float | None = None) -> Iterator[None]:
        """Renew the lease of `job_id` every `interval_s` (default ``lease_s / 4``) in a thread
        while the block runs (a heartbeat that fails is retried at the next interval)."""
        stop = threading.Event()
        every = interval_s if interval_s is not None else self.lease_s / 4

        def beat() -> None:
            while not stop.wait(every):
                with contextlib.suppress(Exception):  # a database hiccup: the next beat retries
                    if not self.heartbeat(job_id):
                        return

        thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    def progress(self, job_id: str, stage: str, fraction: float) -> None:
        """Record a RUNNING job's stage (this store's lease only; renews it)."""
        now = self.clock()
        with self.db.transaction() as conn:
            _run(
                conn,
                "UPDATE jobs SET stage = :stage, fraction = :f, update_time = :now, heartbeat_at = :now,"
                f" lease_expires_at = :until WHERE job_id = :id AND {_HELD}",
                {
                    "stage": stage,
                    "f": fraction,
                    "now": now,
                    "until": now + self.lease_s,
                    "id": job_id,
                    "me": self.holder,
                },
            )
        self._changed(job_id)

    def retry_later(self, job_id: str, reason: str, delay_s: float) -> None:
        """RUNNING -> QUEUED, due in ``delay_s`` seconds (CANCELLED if a cancel was requested)."""
        now = self.clock()
        with self.db.transaction() as conn:
            _run(
                conn,
                "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'CANCELLED' ELSE 'QUEUED' END,"
                " stage = '', fraction = 0, error_reason = :reason, next_attempt_at = :due, update_time = :now,"
                f" lease_holder = '', lease_expires_at = 0 WHERE job_id = :id AND {_HELD}",
                {"reason": reason, "due": now + delay_s, "now": now, "id": job_id, "me": self.holder},
            )
        self._changed(job_id)

    def fail(self, job_id: str, reason: str) -> None:
        """-> FAILED with ``reason`` (CANCELLED instead if a cancel was requested): a QUEUED job,
        or a RUNNING one this store holds."""
        now = self.clock()
        with self.db.transaction() as conn:
            _run(
                conn,
                "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 THEN 'CANCELLED' ELSE 'FAILED' END,"
                " error_reason = :reason, update_time = :now, lease_holder = '', lease_expires_at = 0"
                f" WHERE job_id = :id AND (state = 'QUEUED' OR ({_HELD}))",
                {"reason": reason, "now": now, "id": job_id, "me": self.holder},
            )
        self._changed(job_id)

    def cancel_if_requested(self, job_id: str) -> bool:
        """RUNNING job (held here) with a pending cancel -> CANCELLED; True if it was cancelled."""
        with self.db.transaction() as conn:
            cancelled = (
                _run(
                    conn,
                    "UPDATE jobs SET state = 'CANCELLED', update_time = :now, lease_holder = '', lease_expires_at = 0"
                    f" WHERE job_id = :id AND {_HELD} AND cancel_requested = 1",
                    {"now": self.clock(), "id": job_id, "me": self.holder},
                )
                > 0
            )
        if cancelled:
            self._changed(job_id)
        return cancelled

    def cancel(self, job_id: str) -> Job:
        now = self.clock()
        with self.db.transaction() as conn:
            _run(
                conn,
                "UPDATE jobs SET state = 'CANCELLED', update_time = :now WHERE job_id = :id AND state = 'QUEUED'",
                {"now": now, "id": job_id},
            )
            _run(
                conn,
                "UPDATE jobs SET cancel_requested = 1, update_time = :now WHERE job_id = :id AND state = 'RUNNING'",
                {"now": now, "id": job_id},
            )
        self._changed(job_id)
        return self.get(job_id)

    def succeed(
        self, job_id: str, result: dict[str, Any], handoffs: Sequence[tuple[str, str, bytes]], traceparent: str
    ) -> bool:
        """Commit the result and the hand-offs atomically. A cancellation requested during the
        run wins: the job becomes CANCELLED and nothing is handed off. Nothing is committed
        either when the job was purged meanwhile or this store lost its lease (another replica
        took the job over and commits its own result). Returns True if handed off."""
        now = self.clock()
        with self.db.transaction() as conn:
            r = _one(
                conn,
                "SELECT state, lease_holder, cancel_requested FROM jobs WHERE job_id = :id" + self.db.for_update(),
                {"id": job_id},
            )
            if r is None or r["state"] != "RUNNING" or r["lease_holder"] != self.holder:
                return False  # purged (its study was deleted), or no longer this replica's job
            if r["cancel_requested"]:
                _run(
                    conn,
                    "UPDATE jobs SET state = 'CANCELLED', update_time = :now, lease_holder = '', lease_expires_at = 0"
                    " WHERE job_id = :id",
                    {"now": now, "id": job_id},
                )
                cancelled = True
            else:
                cancelled = False
                _run(
                    conn,
                    "UPDATE jobs SET state = 'SUCCEEDED', stage = 'HANDOFF', fraction = 1, result_json = :result,"
                    " error_reason = '', update_time = :now, lease_holder = '', lease_expires_at = 0"
                    " WHERE job_id = :id",
                    {"result": json.dumps(result), "now": now, "id": job_id},
                )
                for topic, key, payload in handoffs:
                    enqueue(conn, topic, key, payload, traceparent)
        self._changed(job_id)
        return not cancelled

    def purge_study(self, case_id: str) -> tuple[dict[str, int], Sequence[str]]:
        """Delete every job of `case_id` and their hand-offs still in the outbox (the study was
        deleted, `atlasflow.ingest.deletion`); a job running meanwhile (on any replica) hands
        nothing off (`succeed`). Returns (rows deleted per table, digests of the blobs the
        deleted jobs referenced: volume, label map, heatmap). Idempotent."""
        with self.db.transaction() as conn:
            rows = (
                conn.execute(
                    sa.text(
                        "SELECT job_id, volume_digest, result_json FROM jobs WHERE case_id = :case ORDER BY job_id"
                        + self.db.for_update()
                    ),
                    {"case": case_id},
                )
                .mappings()
                .all()
            )
            digests: set[str] = set()
            keys: list[str] = []
            for r in rows:
                digests.add(r["volume_digest"])
                result = json.loads(r["result_json"]) if r["result_json"] else {}
                digests.update(d for d in (result.get("label_map"), result.get("heatmap")) if d)
                keys += [f"{r['job_id']}:labels", f"{r['job_id']}:ranking"]
            outbox = 0
            if keys:
                outbox = int(
                    conn.execute(
                        sa.text("DELETE FROM outbox WHERE dedupe_key IN :keys").bindparams(
                            sa.bindparam("keys", expanding=True)
                        ),
                        {"keys": keys},
                    ).rowcount
                )
            jobs = _run(conn, "DELETE FROM jobs WHERE case_id = :case", {"case": case_id})
        for r in rows:
            self._changed(r["job_id"])
        return {"jobs": jobs, "outbox": outbox}, sorted(d for d in digests if d)

    def _result_field(self, name: str) -> str:
        """SQL of a result's blob digest (`name`: label_map | heatmap), NULL without a result."""
        if self.db.is_postgresql:
            return f"(CASE WHEN result_json = '' THEN NULL ELSE (result_json::jsonb ->> '{name}') END)"
        return f"(CASE WHEN result_json = '' THEN NULL ELSE json_extract(result_json, '$.{name}') END)"

    def referenced(self, digests: Sequence[str]) -> Sequence[str]:
        """Those of `digests` that a job (its volume or its result's label map or heatmap) references."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        label_map, heatmap = self._result_field("label_map"), self._result_field("heatmap")
        query = sa.text(
            "SELECT volume_digest AS d FROM jobs WHERE volume_digest IN :chunk"
            f" UNION SELECT {label_map} FROM jobs WHERE {label_map} IN :chunk"
            f" UNION SELECT {heatmap} FROM jobs WHERE {heatmap} IN :chunk"
        ).bindparams(sa.bindparam("chunk", expanding=True))
        with self.db.read() as conn:
            for i in range(0, len(wanted), 500):
                found.update(r[0] for r in conn.execute(query, {"chunk": wanted[i : i + 500]}))
        return sorted(found)

    def served_version(self) -> ServedVersion | None:
        """The ensemble version the last activation recorded (None: none yet); one row read."""
        with self.db.read() as conn:
            r = _one(conn, "SELECT * FROM served_version WHERE slot = 1", {})
        if r is None:
            return None
        return ServedVersion(r["version"], r["card_digest"], float(r["activated_at"]), r["activated_by"], r["replica"])

    def record_served_version(self, version: str, card_digest: str, activated_by: str = "") -> ServedVersion:
        """Make `version` (its model card's digest `card_digest`) the recorded served version;
        the last call wins. Recording the version already recorded with the same digest keeps
        its row (time and caller of the first activation)."""
        now = self.clock()
        with self.db.transaction() as conn:
            _run(
                conn,
                "INSERT INTO served_version(slot, version, card_digest, activated_at, activated_by, replica)"
                " VALUES (1, :v, :d, :now, :by, :me) ON CONFLICT (slot) DO UPDATE SET version = excluded.version,"
                " card_digest = excluded.card_digest, activated_at = excluded.activated_at,"
                " activated_by = excluded.activated_by, replica = excluded.replica"
                " WHERE served_version.version <> excluded.version OR served_version.card_digest <> excluded.card_digest",
                {"v": version, "d": card_digest, "now": now, "by": activated_by, "me": self.holder},
            )
        served = self.served_version()
        assert served is not None
        return served

    def queued_count(self) -> int:
        """Jobs waiting or running (the ``segmentation_jobs`` queue depth)."""
        with self.db.read() as conn:
            return int(
                conn.execute(sa.text("SELECT COUNT(*) FROM jobs WHERE state IN ('QUEUED', 'RUNNING')")).scalar_one()
            )

    def oldest_running_age(self, now: float) -> float:
        """Seconds since the oldest RUNNING job's claim, heartbeat or progress (0 when none): the
        ``atlasflow_lease_oldest_age_seconds{queue="segmentation_jobs"}`` gauge."""
        with self.db.read() as conn:
            oldest = conn.execute(sa.text("SELECT MIN(heartbeat_at) FROM jobs WHERE state = 'RUNNING'")).scalar_one()
        return max(0.0, now - float(oldest)) if oldest is not None else 0.0

    def expired_leases(self, now: float) -> int:
        """RUNNING jobs whose lease expired and that no replica took back yet
        (``atlasflow_leases_expired{queue="segmentation_jobs"}``)."""
        with self.db.read() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING' AND lease_expires_at <= :now"),
                    {"now": now},
                ).scalar_one()
            )
