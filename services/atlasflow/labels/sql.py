"""The SQL of the label repository on the one database layer (atlasflow.common.db; no grpc).

`SqlLabelRepository` implements `atlasflow.labels.repository.LabelRepository` (see that module
for the contract: the version chain, idempotency, export jobs, the audit trail, version
events) on an `atlasflow.common.db.Database`: a SQLite file (the embedded default) or
PostgreSQL (production), its schema the Alembic revisions of atlasflow.labels.migrations
(upgraded on open; a database the hand-written code made is adopted). The checks and
conversions that need no database live in atlasflow.labels.rows.

Concurrency (several threads, processes or replicas on one database): every change is one
write transaction (`Database.transaction`: SQLite ``BEGIN IMMEDIATE``, writers serialised;
PostgreSQL READ COMMITTED). A version write takes the case's advisory lock (`Database.lock`,
``pg_advisory_xact_lock``) before it reads the case head, and ``SELECT ... FOR UPDATE`` on
the head row, so writers of one case serialise while other cases proceed in parallel; the
partial UNIQUE indexes (one root per case, one child per version) and UNIQUE request_id are the
backstop: a violation is retried and then decided by the committed state. Reads run in one
snapshot (`Database.read`: REPEATABLE READ, read only). The version-event outbox is claimed
with leases (atlasflow.common.outbox.SqlOutboxStore over ``version_events``,
`version_event_store`) and export jobs are run by one replica at a time (`claim_export_job`,
`renew_export_claim`).

The statements are written once with ``?`` placeholders (SQLite's; PostgreSQL gets psycopg's
``%s``) and run with the driver's own SQL (`Connection.exec_driver_sql`).

Longer than ~500 lines on purpose: every statement of the repository against one schema, one
method per contract operation.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, Self, cast

import numpy.typing as npt
import sqlalchemy as sa

from atlasflow.common import sqlite as sq
from atlasflow.common.blobstore import BlobInfo
from atlasflow.common.db import Database, PoolSettings, open_database
from atlasflow.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from atlasflow.common.outbox import OutboxRow, SqlOutboxStore, replica_id
from atlasflow.common.telemetry import current_traceparent
from atlasflow.labels.migrations import MIGRATIONS
from atlasflow.labels.repository import (
    DOMAIN,
    VERSION_EVENT_TOPIC,
    AuditEvent,
    AuditRecord,
    ExportCaseOutcome,
    ExportJobRecord,
    LabelVersionRecord,
    OrganProvenance,
    Provenance,
    VersionEvent,
)
from atlasflow.labels.rows import (
    NewVersion,
    as_datetime,
    check_export_update,
    checked_version,
    job_of,
    json_object,
    json_value,
    record_of,
    resolve_organ_provenance,
    with_versions,
)


class Tx(Protocol):
    """One statement runner inside a transaction."""

    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None: ...
    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]: ...
    def run(self, sql: str, args: Sequence[Any] = ()) -> None: ...


class _Tx:
    """`Tx` on a SQLAlchemy connection: ``?`` SQL run with the driver's own paramstyle."""

    def __init__(self, conn: sa.Connection, pg: bool) -> None:
        self.conn = conn
        self.pg = pg

    def _exec(self, sql: str, args: Sequence[Any]) -> sa.CursorResult[Any]:
        if self.pg:  # psycopg: %s placeholders (our SQL holds no literal `?` or `%`)
            sql = sql.replace("%", "%%").replace("?", "%s")
        return self.conn.exec_driver_sql(sql, tuple(args))

    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return cast("Mapping[str, Any] | None", self._exec(sql, args).mappings().first())

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return cast("list[Mapping[str, Any]]", list(self._exec(sql, args).mappings().all()))

    def run(self, sql: str, args: Sequence[Any] = ()) -> None:
        self._exec(sql, args)


class _Backend:
    """The repository's view of its `Database`: transactions as `Tx`, the per-case lock, the
    row-lock suffix, timestamps in the schema's type (ISO text on SQLite, TIMESTAMPTZ)."""

    integrity_errors: tuple[type[BaseException], ...] = (sa.exc.IntegrityError,)

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pg = db.is_postgresql
        self.for_update = db.for_update()

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.OperationalError as exc:
            if not self.pg:
                raise
            raise Unavailable("DATABASE_UNAVAILABLE", "the labels database failed", domain=DOMAIN) from exc

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        with self._unavailable(), self.db.transaction() as conn:
            yield _Tx(conn, self.pg)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._unavailable(), self.db.read() as conn:
            yield _Tx(conn, self.pg)

    def lock_case(self, tx: Tx, case_id: str) -> None:
        assert isinstance(tx, _Tx)
        self.db.lock(tx.conn, f"labels-case:{case_id}")

    def timestamp(self, dt: datetime) -> Any:
        return dt if self.pg else dt.isoformat()

    def close(self) -> None:
        self.db.close()


_RUNNABLE = ("QUEUED", "RUNNING")


def _event_row(r: Sequence[Any]) -> OutboxRow:
    """A claimed ``version_events`` row as an outbox row: id = seq, dedupe key = version id,
    payload = the version's number (the handler reads the version itself)."""
    return OutboxRow(int(r[0]), VERSION_EVENT_TOPIC, str(r[1]), str(r[2]).encode(), str(r[3]), int(r[4]))


class SqlLabelRepository:
    """`LabelRepository` on a SQLite file or PostgreSQL (atlasflow.common.db), migrated on open.

    database: a file path (SQLite) or a ``sqlite:///`` / ``postgresql://`` URL
    (atlasflow.common.db.database_url); pool: PostgreSQL pool settings; claimer: this
    replica's name in outbox claims and export-job leases (default: host, pid, random);
    event_claim_s: how long a claimed version event is left to its claimer; export_lease_s: how
    long an export job's lease lasts without a heartbeat (`renew_export_claim`);
    max_export_claims: a job whose holder's lease expired (the holder died, not a clean release)
    after this many takes is FAILED with LEASE_EXPIRED instead of taken again (0: no limit).
    Thread-safe (one pooled connection per call); any number of repositories (threads,
    processes, replicas) may share one database."""

    def __init__(
        self,
        database: str | Path | sa.URL,
        *,
        pool: PoolSettings | None = None,
        claimer: str | None = None,
        event_claim_s: float = 120.0,
        export_lease_s: float = 60.0,
        max_export_claims: int = 0,
    ) -> None:
        try:
            self.database = open_database(database, MIGRATIONS, pool=pool)
        except sa.exc.OperationalError as exc:
            raise Unavailable("DATABASE_UNAVAILABLE", "the labels database is not reachable", domain=DOMAIN) from exc
        self._db = _Backend(self.database)
        self.claimer = claimer or replica_id()
        self.export_lease_s = export_lease_s
        self.max_export_claims = max_export_claims
        self.events = SqlOutboxStore(
            self.database,
            claimer=self.claimer,
            claim_s=event_claim_s,
            table="version_events",
            key="seq",
            columns="seq, version_id, version_number, traceparent, attempts",
            row_of=_event_row,
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ versions

    def create_version(
        self,
        case_id: str,
        label_map: BlobInfo,
        ct: BlobInfo,
        provenance: Provenance,
        request_id: str,
        expected_parent_version_id: str = "",
        *,
        organs: Sequence[int] = (),
        shape: Sequence[int] = (0, 0, 0),
        affine: Sequence[float] | npt.NDArray[Any] = (),
        organ_provenance: Mapping[int, OrganProvenance] | None = None,
        request_fingerprint: str = "",
        audit: AuditEvent | None = None,
        expect_empty: bool = False,
        review_seconds: float = 0.0,
        organ_review_seconds: Mapping[int, float] | None = None,
        organ_changed_ml: Mapping[int, float] | None = None,
    ) -> LabelVersionRecord:
        """Append a version to `case_id`'s history; idempotent by `request_id`.

        organs: ids present in the label map (as returned by `validate_label_map`); shape:
        (X, Y, Z); affine: 16 floats row-major (or a (4, 4) array flattened). The caller
        validates the label map against the CT before calling (blobs are not read here).
        organ_provenance: per organ id (missing organs: `provenance` of this version); an
        empty version_id in it means "this version". request_fingerprint: the caller's hash of
        the request (when the stored label map is derived, e.g. assembled); default: a hash
        of the arguments. audit: recorded in the same transaction (version_ids filled in).
        review_seconds / organ_review_seconds: the reviewer's time for this version (stored
        with it; InvalidArgument INVALID_REVIEW_SECONDS unless finite and >= 0).
        organ_changed_ml: organ id -> ml of voxels a revision changed in that organ (stored).
        Raises Aborted("PARENT_MISMATCH") when `expected_parent_version_id` is non-empty and is
        not the case's current head, or when `expect_empty` and the case already has a version
        (another writer won; re-read the head and retry).
        """
        new = checked_version(
            case_id,
            label_map,
            ct,
            provenance,
            request_id,
            expected_parent_version_id,
            organs,
            shape,
            affine,
            organ_provenance,
            request_fingerprint,
            review_seconds,
            organ_review_seconds,
            organ_changed_ml,
        )
        for attempt in range(3):
            try:
                return self._insert_version(new, audit, expect_empty)
            except self._db.integrity_errors:
                # A concurrent writer of the same request_id (other case) or of the same case's
                # first version committed between our read and our insert: re-read decides.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _insert_version(self, new: NewVersion, audit: AuditEvent | None, expect_empty: bool) -> LabelVersionRecord:
        case_id, request_id, expected_parent = new.case_id, new.request_id, new.expected_parent
        with self._db.write() as tx:
            self._db.lock_case(tx, case_id)
            prior = tx.one("SELECT * FROM label_versions WHERE request_id = ?", (request_id,))
            if prior is not None:
                if prior["request_fingerprint"] != new.fingerprint:
                    raise InvalidArgument(
                        "REQUEST_ID_REUSED", "request_id was already used for a different request", domain=DOMAIN
                    )
                record = record_of(prior)
                if audit is not None:
                    self._insert_audit(tx, with_versions(audit, record.version_id))
                return record
            head_row = tx.one(
                "SELECT head_version_id, version_count FROM case_heads WHERE case_id = ?" + self._db.for_update,
                (case_id,),
            )
            head_id = head_row["head_version_id"] if head_row else ""
            if (expected_parent and expected_parent != head_id) or (expect_empty and head_id):
                raise Aborted(
                    "PARENT_MISMATCH",
                    "expected_parent_version_id is not the case's current version",
                    domain=DOMAIN,
                    metadata={"expected_parent_version_id": expected_parent, "head_version_id": head_id},
                )
            version_id = uuid.uuid4().hex
            resolved = resolve_organ_provenance(new, version_id)
            tx.run(
                "INSERT INTO label_versions(version_id, case_id, parent_version_id,"
                " label_map_digest, label_map_size, ct_digest, ct_size, source, model_version,"
                " job_id, reviewer, weights_trained, organs, shape, affine, request_id,"
                " request_fingerprint, create_time, organ_provenance, review_seconds,"
                " organ_review_seconds, organ_changed_ml)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version_id,
                    case_id,
                    head_id or None,
                    new.label_map.digest,
                    new.label_map.size_bytes,
                    new.ct.digest,
                    new.ct.size_bytes,
                    new.provenance.source,
                    new.provenance.model_version,
                    new.provenance.job_id,
                    new.provenance.reviewer,
                    bool(new.provenance.weights_trained),
                    json.dumps(new.organs),
                    json.dumps(new.shape),
                    json.dumps(new.affine),
                    request_id,
                    new.fingerprint,
                    self._db.timestamp(sq.utc_now()),
                    json.dumps({str(k): v.to_dict() for k, v in sorted(resolved.items())}),
                    new.review_seconds,
                    json.dumps({str(k): v for k, v in sorted(new.organ_review_seconds.items())}),
                    json.dumps({str(k): v for k, v in sorted(new.organ_changed_ml.items())}),
                ),
            )
            if head_row is None:
                tx.run(
                    "INSERT INTO case_heads(case_id, head_version_id, version_count) VALUES (?, ?, 1)",
                    (case_id, version_id),
                )
            else:
                tx.run(
                    "UPDATE case_heads SET head_version_id = ?, version_count = version_count + 1 WHERE case_id = ?",
                    (version_id, case_id),
                )
            number = int(head_row["version_count"]) + 1 if head_row is not None else 1
            tx.run(
                "INSERT INTO version_events(version_id, case_id, version_number, traceparent, create_time)"
                " VALUES (?, ?, ?, ?, ?)",
                (version_id, case_id, number, current_traceparent(), time.time()),
            )
            if audit is not None:
                self._insert_audit(tx, with_versions(audit, version_id))
            row = tx.one("SELECT * FROM label_versions WHERE version_id = ?", (version_id,))
            assert row is not None
            return record_of(row)

    def version_for_request(self, request_id: str) -> tuple[LabelVersionRecord, str] | None:
        """(version, request fingerprint) created by `request_id`, or None."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM label_versions WHERE request_id = ?", (request_id,))
        return None if row is None else (record_of(row), str(row["request_fingerprint"]))

    def get_version(self, version_id: str) -> LabelVersionRecord:
        """The version, or NotFound("VERSION_NOT_FOUND")."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM label_versions WHERE version_id = ?", (version_id,))
        if row is None:
            raise NotFound(
                "VERSION_NOT_FOUND", "label version not found", domain=DOMAIN, metadata={"version_id": version_id[:80]}
            )
        return record_of(row)

    def head(self, case_id: str) -> LabelVersionRecord | None:
        """The case's current (latest) version, or None when the case has none."""
        with self._db.read() as tx:
            row = tx.one(
                "SELECT v.* FROM case_heads h JOIN label_versions v"
                " ON v.version_id = h.head_version_id WHERE h.case_id = ?",
                (case_id,),
            )
        return None if row is None else record_of(row)

    def list_versions(
        self, case_id: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[LabelVersionRecord], str]:
        """Versions newest first (of one case, or of all cases when `case_id` is None/"").

        page_size: 0 -> 50, max 1000. Returns (page, next_page_token); "" means the end.
        The cursor is the insertion sequence, so versions written while paging never cause a
        duplicate or a gap among the versions that existed when paging started.
        """
        scope = case_id or ""
        rows, token = self._page("label_versions", "label_versions", [("case_id", scope)], page_size, page_token, scope)
        return [record_of(r) for r in rows], token

    def _page(
        self, table: str, kind: str, filters: Sequence[tuple[str, str]], page_size: int, page_token: str, scope: str
    ) -> tuple[list[Mapping[str, Any]], str]:
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        cursor = sq.decode_page_token(page_token, kind, scope=scope, domain=DOMAIN)
        before = None
        if cursor is not None:
            before = cursor.get("before")
            if not isinstance(before, int) or isinstance(before, bool):
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
        where: list[str] = []
        args: list[Any] = []
        for column, value in filters:
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(size + 1)
        with self._db.read() as tx:
            rows = tx.all(sql, args)
        more = len(rows) > size
        rows = rows[:size]
        token = sq.encode_page_token(kind, {"before": int(rows[-1]["seq"])}, scope=scope) if more else ""
        return rows, token

    def history(self, case_id: str) -> list[LabelVersionRecord]:
        """The case's chain from its first version to its head (follows parent links)."""
        with self._db.read() as tx:
            rows = tx.all("SELECT * FROM label_versions WHERE case_id = ?", (case_id,))
        by_parent = {r["parent_version_id"]: r for r in rows}
        chain, parent = [], None
        while parent in by_parent:
            row = by_parent[parent]
            chain.append(record_of(row))
            parent = row["version_id"]
        return chain

    def case_ids(self) -> list[str]:
        """Every case with at least one version, ascending."""
        with self._db.read() as tx:
            return [r["case_id"] for r in tx.all("SELECT case_id FROM case_heads ORDER BY case_id")]

    # ------------------------------------------------------------------ export jobs

    def create_export_job(
        self,
        case_ids: Sequence[str],
        destination_uri: str,
        *,
        request_id: str = "",
        audit: AuditEvent | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ExportJobRecord:
        """Queue an export of the head versions of `case_ids` (empty: every case).

        The heads are frozen now: versions written later are not exported by this job.
        options: a JSON object stored with the job in the same insert (None or {}: none).
        Unknown case -> NotFound("CASE_NOT_FOUND"); no case at all -> FailedPrecondition
        ("NOTHING_TO_EXPORT"); options that are not a JSON object (or over 16 KiB) ->
        InvalidArgument("INVALID_ARGUMENT", metadata field "options"). A non-empty
        `request_id` makes the call idempotent: a repeat with the same case ids, destination
        and options returns the job created first; with any of them different it raises
        InvalidArgument("REQUEST_ID_REUSED"). `audit` is recorded in the same transaction (job
        id and exported version ids filled in).
        """
        if not destination_uri:
            raise InvalidArgument(
                "INVALID_ARGUMENT", "destination_uri is required", domain=DOMAIN, metadata={"field": "destination_uri"}
            )
        options_json = json_object("options", options or {})
        wanted = list(dict.fromkeys(case_ids))
        with self._db.write() as tx:
            if request_id:
                row = tx.one("SELECT * FROM export_jobs WHERE request_id = ?", (request_id,))
                if row is not None:
                    prior = job_of(row)
                    if (
                        prior.destination_uri != destination_uri
                        or list(prior.case_ids) != wanted
                        or dict(prior.options) != json.loads(options_json)
                    ):
                        raise InvalidArgument(
                            "REQUEST_ID_REUSED", "request_id was already used for a different request", domain=DOMAIN
                        )
                    return prior
            if wanted:
                versions = []
                for cid in wanted:
                    head = tx.one("SELECT head_version_id FROM case_heads WHERE case_id = ?", (cid,))
                    if head is None:
                        raise NotFound(
                            "CASE_NOT_FOUND", "case has no label version", domain=DOMAIN, metadata={"case_id": cid[:80]}
                        )
                    versions.append((cid, head["head_version_id"]))
            else:
                versions = [
                    (r["case_id"], r["head_version_id"])
                    for r in tx.all("SELECT case_id, head_version_id FROM case_heads ORDER BY case_id")
                ]
            if not versions:
                raise FailedPrecondition("NOTHING_TO_EXPORT", "no case has a label version", domain=DOMAIN)
            job_id = uuid.uuid4().hex
            now = self._db.timestamp(sq.utc_now())
            tx.run(
                "INSERT INTO export_jobs(job_id, state, destination_uri, case_ids, versions,"
                " cases_done, cases_total, error_reason, request_id, create_time, update_time,"
                " options) VALUES (?, 'QUEUED', ?, ?, ?, 0, ?, '', ?, ?, ?, ?)",
                (
                    job_id,
                    destination_uri,
                    json.dumps(wanted),
                    json.dumps(versions),
                    len(versions),
                    request_id or None,
                    now,
                    now,
                    options_json,
                ),
            )
            if audit is not None:
                self._insert_audit(
                    tx,
                    AuditEvent(
                        audit.principal,
                        audit.method,
                        audit.case_id,
                        tuple(v for _, v in versions),
                        job_id,
                        audit.outcome,
                    ),
                )
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (job_id,))
            assert row is not None
            return job_of(row)

    def get_export_job(self, job_id: str) -> ExportJobRecord:
        """The job, or NotFound("EXPORT_JOB_NOT_FOUND")."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (job_id,))
        if row is None:
            raise NotFound(
                "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
            )
        return job_of(row)

    def update_export_job(
        self, job_id: str, *, state: str | None = None, cases_done: int | None = None, error_reason: str | None = None
    ) -> ExportJobRecord:
        """Move a job along QUEUED -> RUNNING -> SUCCEEDED | FAILED (| CANCELLED, RUNNING ->
        QUEUED on restart) and/or record progress. An illegal transition (e.g. out of a
        terminal state) raises FailedPrecondition("INVALID_STATE_TRANSITION")."""
        with self._db.write() as tx:
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?" + self._db.for_update, (job_id,))
            if row is None:
                raise NotFound(
                    "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
                )
            new_state = row["state"] if state is None else state
            done = row["cases_done"] if cases_done is None else int(cases_done)
            check_export_update(row["state"], new_state, row["cases_total"], done)
            reason = row["error_reason"] if error_reason is None else error_reason
            tx.run(
                "UPDATE export_jobs SET state = ?, cases_done = ?, error_reason = ?, update_time = ? WHERE job_id = ?",
                (new_state, done, reason, self._db.timestamp(sq.utc_now()), job_id),
            )
            if new_state not in _RUNNABLE:  # a finished job is nobody's any more
                tx.run("UPDATE export_jobs SET claimed_by = '', claim_expires_at = 0 WHERE job_id = ?", (job_id,))
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (job_id,))
            assert row is not None
            return job_of(row)

    def list_export_jobs(self, states: Sequence[str] = ()) -> list[ExportJobRecord]:
        """Jobs in `states` (all when empty), oldest first: a restarted worker resumes the
        QUEUED and RUNNING ones."""
        with self._db.read() as tx:
            if states:
                marks = ",".join("?" * len(states))
                rows = tx.all(
                    f"SELECT * FROM export_jobs WHERE state IN ({marks}) ORDER BY create_time, job_id", tuple(states)
                )
            else:
                rows = tx.all("SELECT * FROM export_jobs ORDER BY create_time, job_id")
        return [job_of(r) for r in rows]

    def claim_export_job(self, now: float | None = None) -> ExportJobRecord | None:
        """Take the oldest QUEUED or RUNNING job no replica holds (never claimed, released, or its
        holder's lease expired: a replica that died) for `export_lease_s` seconds; None when
        there is none (jobs past `max_export_claims` are failed first, LEASE_EXPIRED). Replicas claim different jobs (PostgreSQL: ``FOR UPDATE SKIP LOCKED``;
        SQLite: one writer at a time). The holder keeps the job with `renew_export_claim`
        (its heartbeat) and gives it back with `release_export_claim`; a job that reaches a
        terminal state is released. now: seconds since the epoch (default: the clock)."""
        t = time.time() if now is None else float(now)
        with self._db.write() as tx:
            if self.max_export_claims > 0:  # a job that killed every replica running it
                for gone in tx.all(
                    "SELECT job_id FROM export_jobs WHERE state IN ('QUEUED', 'RUNNING') AND claimed_by <> ''"
                    " AND claim_expires_at <= ? AND claims >= ?" + self.database.for_update(skip_locked=True),
                    (t, self.max_export_claims),
                ):
                    tx.run(
                        "UPDATE export_jobs SET state = 'FAILED', error_reason = 'LEASE_EXPIRED', update_time = ?,"
                        " claimed_by = '', claim_expires_at = 0 WHERE job_id = ?",
                        (self._db.timestamp(sq.utc_now()), gone["job_id"]),
                    )
            row = tx.one(
                "SELECT job_id FROM export_jobs WHERE state IN ('QUEUED', 'RUNNING') AND claim_expires_at <= ?"
                " ORDER BY create_time, job_id LIMIT 1" + self.database.for_update(skip_locked=True),
                (t,),
            )
            if row is None:
                return None
            tx.run(
                "UPDATE export_jobs SET claimed_by = ?, claim_expires_at = ?, claims = claims + 1 WHERE job_id = ?",
                (self.claimer, t + self.export_lease_s, row["job_id"]),
            )
            job = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (row["job_id"],))
        assert job is not None
        return job_of(job)

    def renew_export_claim(self, job_id: str, now: float | None = None) -> bool:
        """Extend this replica's lease of `job_id` by `export_lease_s` from `now`; False when
        it no longer holds it (expired and taken over, released, or the job finished or was
        cancelled): the holder must stop working on it."""
        t = time.time() if now is None else float(now)
        with self._db.write() as tx:
            row = tx.one(
                "SELECT claimed_by FROM export_jobs WHERE job_id = ? AND state IN ('QUEUED', 'RUNNING')"
                + self._db.for_update,
                (job_id,),
            )
            if row is None or row["claimed_by"] != self.claimer:
                return False
            tx.run("UPDATE export_jobs SET claim_expires_at = ? WHERE job_id = ?", (t + self.export_lease_s, job_id))
        return True

    def release_export_claim(self, job_id: str) -> None:
        """Give back this replica's lease of `job_id` (a replica stopping cleanly): another
        replica may take the job at once."""
        with self._db.write() as tx:
            tx.run(
                "UPDATE export_jobs SET claimed_by = '', claim_expires_at = 0 WHERE job_id = ? AND claimed_by = ?",
                (job_id, self.claimer),
            )

    def export_job_holder(self, job_id: str) -> tuple[str, float]:
        """(replica holding `job_id`, until when in seconds since the epoch); ("", 0) when none."""
        with self._db.read() as tx:
            row = tx.one("SELECT claimed_by, claim_expires_at FROM export_jobs WHERE job_id = ?", (job_id,))
        return ("", 0.0) if row is None else (str(row["claimed_by"]), float(row["claim_expires_at"]))

    def record_export_outcome(self, job_id: str, case_id: str, outcome: Mapping[str, Any]) -> ExportCaseOutcome:
        """Record (commit) the outcome of one case of a job; a case recorded again gets the
        new outcome (the latest attempt wins, e.g. when a resumed job exports it again).

        outcome: a JSON object (at most 16 KiB encoded). NotFound("EXPORT_JOB_NOT_FOUND") for
        an unknown job; InvalidArgument("INVALID_ARGUMENT", metadata field "case_id") when the
        case is not one of the job's, field "outcome" when the outcome is not a JSON object.
        """
        outcome_json = json_object("outcome", outcome)
        with self._db.write() as tx:
            row = tx.one("SELECT versions FROM export_jobs WHERE job_id = ?", (job_id,))
            if row is None:
                raise NotFound(
                    "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
                )
            if case_id not in {str(c) for c, _ in json_value(row["versions"])}:
                raise InvalidArgument(
                    "INVALID_ARGUMENT",
                    "case is not part of the export job",
                    domain=DOMAIN,
                    metadata={"field": "case_id"},
                )
            now = sq.utc_now()
            tx.run(
                "INSERT INTO export_case_outcomes(job_id, case_id, outcome, time)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (job_id, case_id) DO UPDATE"
                " SET outcome = excluded.outcome, time = excluded.time",
                (job_id, case_id, outcome_json, self._db.timestamp(now)),
            )
        return ExportCaseOutcome(job_id, case_id, json.loads(outcome_json), now)

    def list_export_outcomes(self, job_id: str) -> list[ExportCaseOutcome]:
        """The job's recorded case outcomes (the latest per case) in the job's export order;
        NotFound("EXPORT_JOB_NOT_FOUND") for an unknown job."""
        with self._db.read() as tx:
            job = tx.one("SELECT versions FROM export_jobs WHERE job_id = ?", (job_id,))
            if job is None:
                raise NotFound(
                    "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
                )
            rows = tx.all("SELECT case_id, outcome, time FROM export_case_outcomes WHERE job_id = ?", (job_id,))
        order = {str(c): i for i, (c, _) in enumerate(json_value(job["versions"]))}
        rows = sorted(rows, key=lambda r: (order.get(r["case_id"], len(order)), r["case_id"]))
        return [ExportCaseOutcome(job_id, r["case_id"], json_value(r["outcome"]), as_datetime(r["time"])) for r in rows]

    # ------------------------------------------------------------------ audit

    def record_audit(self, event: AuditEvent) -> AuditRecord:
        """Append one audit record (its own transaction) and return it."""
        with self._db.write() as tx:
            return self._insert_audit(tx, event)

    def _insert_audit(self, tx: Tx, event: AuditEvent) -> AuditRecord:
        record = AuditRecord(
            uuid.uuid4().hex,
            sq.utc_now(),
            event.principal[:256],
            event.method[:128],
            event.case_id[:256],
            tuple(event.version_ids),
            event.job_id[:256],
            event.outcome[:128],
        )
        tx.run(
            "INSERT INTO audit_records(record_id, time, principal, method, case_id,"
            " version_ids, job_id, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.record_id,
                self._db.timestamp(record.time),
                record.principal,
                record.method,
                record.case_id,
                json.dumps(list(record.version_ids)),
                record.job_id,
                record.outcome,
            ),
        )
        return record

    def list_audit_records(
        self, case_id: str = "", principal: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AuditRecord], str]:
        """Audit records newest first, optionally only of one case and/or one principal.

        page_size: 0 -> 50, max 1000; page tokens are bound to the filter."""
        scope = json.dumps([case_id, principal])
        rows, token = self._page(
            "audit_records",
            "audit_records",
            [("case_id", case_id), ("principal", principal)],
            page_size,
            page_token,
            scope,
        )
        return [
            AuditRecord(
                r["record_id"],
                as_datetime(r["time"]),
                r["principal"],
                r["method"],
                r["case_id"],
                tuple(json_value(r["version_ids"])),
                r["job_id"],
                r["outcome"],
            )
            for r in rows
        ], token

    # ------------------------------------------------------------------ version events

    def due_version_events(self, now: float, limit: int = 32) -> list[VersionEvent]:
        """Pending events whose next attempt is due at `now` (seconds since the epoch), oldest
        first."""
        with self._db.read() as tx:
            rows = tx.all(
                "SELECT seq, version_id, case_id, version_number, traceparent, attempts"
                " FROM version_events WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY seq LIMIT ?",
                (float(now), int(limit)),
            )
        return [
            VersionEvent(
                int(r["seq"]),
                r["version_id"],
                r["case_id"],
                int(r["version_number"]),
                r["traceparent"],
                int(r["attempts"]),
            )
            for r in rows
        ]

    def mark_version_event(self, seq: int, state: str, *, error: str = "", next_attempt_at: float = 0.0) -> None:
        """Record a delivery attempt: state "done", "dead" (will not get better by retrying)
        or "pending" (retry at `next_attempt_at`)."""
        if state not in ("pending", "done", "dead"):
            raise ValueError(f"unknown event state {state!r}")
        with self._db.write() as tx:
            tx.run(
                "UPDATE version_events SET state = ?, attempts = attempts + 1,"
                " last_error = ?, next_attempt_at = ?, claimed_by = '', claim_expires_at = 0 WHERE seq = ?",
                (state, error[:500], float(next_attempt_at), int(seq)),
            )

    def version_event_backlog(self) -> int:
        """Number of events not delivered yet."""
        with self._db.read() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM version_events WHERE state = 'pending'")
        return int(row["n"]) if row else 0

    def oldest_pending_version_event(self) -> datetime | None:
        """Creation time of the oldest label version whose event is not delivered yet (None
        when every event was): the outbox lag (``atlasflow_outbox_lag_seconds``)."""
        with self._db.read() as tx:
            row = tx.one(
                "SELECT MIN(v.create_time) AS t FROM version_events e"
                " JOIN label_versions v ON v.version_id = e.version_id WHERE e.state = 'pending'"
            )
        return as_datetime(row["t"]) if row and row["t"] is not None else None

    # ------------------------------------------------------------------ deletion

    def purge_study(self, case_id: str) -> tuple[dict[str, int], list[str]]:
        """Delete every row of `case_id` (the study was deleted, ingest's DeleteStudy): its label
        versions, head, version events and per-case export outcomes, in one transaction.
        Audit records stay (append-only), and so do export jobs (their case list names the
        case id; what they exported is not recalled). Returns (rows deleted per table, digests
        of the blobs the deleted versions referenced: label maps and CT volumes). Idempotent."""
        counts: dict[str, int] = {}
        with self._db.write() as tx:
            self._db.lock_case(tx, case_id)
            versions = tx.all("SELECT label_map_digest, ct_digest FROM label_versions WHERE case_id = ?", (case_id,))
            digests = {d for r in versions for d in (r["label_map_digest"], r["ct_digest"]) if d}
            for table in ("case_heads", "version_events", "export_case_outcomes", "label_versions"):
                row = tx.one(f"SELECT COUNT(*) AS n FROM {table} WHERE case_id = ?", (case_id,))
                counts[table] = int(row["n"]) if row else 0
                if counts[table]:
                    tx.run(f"DELETE FROM {table} WHERE case_id = ?", (case_id,))
        return counts, sorted(digests)

    def referenced(self, digests: Sequence[str]) -> list[str]:
        """Those of `digests` that a label version references (label map or CT)."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        with self._db.read() as tx:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for r in tx.all(
                    f"SELECT label_map_digest AS d FROM label_versions WHERE label_map_digest IN ({marks})"
                    f" UNION SELECT ct_digest AS d FROM label_versions WHERE ct_digest IN ({marks})",
                    (*chunk, *chunk),
                ):
                    found.add(r["d"])
        return sorted(found)
