"""Immutable label versions with lineage and provenance, plus the export-job table (no grpc).

Every label version of a case is an immutable row; a case's history is a single chain
(first version -> ... -> head). The chain is enforced by the database itself: one root per
case and at most one child per version (partial UNIQUE indexes), so even a buggy caller cannot
fork the history. Writers take the write lock up front (`BEGIN IMMEDIATE`), read the head,
check `expected_parent_version_id`, insert and move the head in one transaction.

Idempotency: `request_id` is UNIQUE. A repeat of a request (same request_id, same content)
returns the version created the first time, also after a restart and also after other versions
were appended since; the same request_id with different content is rejected
(InvalidArgument("REQUEST_ID_REUSED")).

Threading: one `SqliteLabelRepository` holds one connection and serialises its calls with a
lock; several instances (threads, processes) on the same file are safe (see
atlasflow.common.sqlite).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from atlasflow.common import sqlite as sq
from atlasflow.common.blobstore import BlobInfo
from atlasflow.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.organs import ORGANS

from atlasflow.labels.validate import validate_label_map  # noqa: F401  (re-exported)

DOMAIN = "atlasflow.labels"
SOURCES = ("ai", "radiologist", "original")
EXPORT_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
# OperationState transitions (atlasflow.common.v1.OperationState); same-state updates allowed
# for progress.
_EXPORT_TRANSITIONS: dict[str, frozenset[str]] = {
    "QUEUED": frozenset({"QUEUED", "RUNNING", "CANCELLED"}),
    "RUNNING": frozenset({"RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "QUEUED"}),
    "SUCCEEDED": frozenset(),
    "FAILED": frozenset(),
    "CANCELLED": frozenset(),
}


@dataclass(frozen=True)
class Provenance:
    """Where a label version came from.

    source: "ai" (model ensemble), "radiologist" (drawn or revised by a human) or "original"
    (shipped with the source dataset). model_version / job_id for AI, reviewer (principal) for
    radiologist; weights_trained False when the models ran untrained demo weights.
    """

    source: str
    model_version: str = ""
    job_id: str = ""
    reviewer: str = ""
    weights_trained: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidArgument("INVALID_PROVENANCE", "provenance source must be one of "
                                  "ai, radiologist, original", domain=DOMAIN,
                                  metadata={"source": str(self.source)[:40]})

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "model_version": self.model_version,
                "job_id": self.job_id, "reviewer": self.reviewer,
                "weights_trained": self.weights_trained}


@dataclass(frozen=True)
class LabelVersionRecord:
    """One immutable label version.

    label_map_*: combined label map blob (NIfTI uint8, AbdomenAtlas ids, on the CT grid);
    ct_*: the CT volume blob. organs: ids present (non-empty), ascending. shape: (X, Y, Z)
    voxels. affine: 16 floats, row-major voxel-to-world RAS+ mm. parent_version_id: "" for the
    first version of a case. create_time: UTC.
    """

    version_id: str
    case_id: str
    parent_version_id: str
    label_map_digest: str
    label_map_size: int
    ct_digest: str
    ct_size: int
    provenance: Provenance
    organs: tuple[int, ...]
    shape: tuple[int, int, int]
    affine: tuple[float, ...]
    create_time: datetime


@dataclass(frozen=True)
class ExportJobRecord:
    """An export operation. state: one of EXPORT_STATES (OperationState without the prefix).

    versions: the (case_id, version_id) pairs frozen when the job was created (each case's
    head at that moment), in export order; cases_total == len(versions).
    """

    job_id: str
    state: str
    destination_uri: str
    versions: tuple[tuple[str, str], ...]
    cases_done: int
    cases_total: int
    error_reason: str
    create_time: datetime
    update_time: datetime
    case_ids: tuple[str, ...] = field(default=())


@runtime_checkable
class LabelRepository(Protocol):
    """Storage interface of label versions; every implementation passes tests/labels' contract."""

    def create_version(self, case_id: str, label_map: BlobInfo, ct: BlobInfo,
                       provenance: Provenance, request_id: str,
                       expected_parent_version_id: str = "", *,
                       organs: Sequence[int] = (), shape: Sequence[int] = (0, 0, 0),
                       affine: Sequence[float] | np.ndarray = ()) -> LabelVersionRecord: ...

    def get_version(self, version_id: str) -> LabelVersionRecord: ...

    def list_versions(self, case_id: str | None = None, page_size: int = 0,
                      page_token: str = "") -> tuple[list[LabelVersionRecord], str]: ...

    def head(self, case_id: str) -> LabelVersionRecord | None: ...


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE label_versions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        version_id TEXT NOT NULL UNIQUE,
        case_id TEXT NOT NULL,
        parent_version_id TEXT REFERENCES label_versions(version_id),
        label_map_digest TEXT NOT NULL,
        label_map_size INTEGER NOT NULL,
        ct_digest TEXT NOT NULL,
        ct_size INTEGER NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('ai', 'radiologist', 'original')),
        model_version TEXT NOT NULL DEFAULT '',
        job_id TEXT NOT NULL DEFAULT '',
        reviewer TEXT NOT NULL DEFAULT '',
        weights_trained INTEGER NOT NULL DEFAULT 0,
        organs TEXT NOT NULL,
        shape TEXT NOT NULL,
        affine TEXT NOT NULL,
        request_id TEXT NOT NULL UNIQUE,
        request_fingerprint TEXT NOT NULL,
        create_time TEXT NOT NULL
    );
    CREATE UNIQUE INDEX label_versions_one_root ON label_versions(case_id)
        WHERE parent_version_id IS NULL;
    CREATE UNIQUE INDEX label_versions_one_child ON label_versions(parent_version_id)
        WHERE parent_version_id IS NOT NULL;
    CREATE INDEX label_versions_by_case ON label_versions(case_id, seq);
    CREATE TABLE case_heads (
        case_id TEXT PRIMARY KEY,
        head_version_id TEXT NOT NULL REFERENCES label_versions(version_id),
        version_count INTEGER NOT NULL
    );
    CREATE TABLE export_jobs (
        job_id TEXT PRIMARY KEY,
        state TEXT NOT NULL
            CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
        destination_uri TEXT NOT NULL,
        case_ids TEXT NOT NULL,
        versions TEXT NOT NULL,
        cases_done INTEGER NOT NULL DEFAULT 0,
        cases_total INTEGER NOT NULL,
        error_reason TEXT NOT NULL DEFAULT '',
        request_id TEXT UNIQUE,
        create_time TEXT NOT NULL,
        update_time TEXT NOT NULL
    );
    CREATE INDEX export_jobs_by_state ON export_jobs(state, create_time);
    """,
)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument("INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)",
                              domain=DOMAIN, metadata={"field": name})


class SqliteLabelRepository:
    """`LabelRepository` on an SQLite file (the embedded default)."""

    def __init__(self, path: str | Path) -> None:
        self._conn = sq.connect(path)
        self._lock = threading.RLock()
        with self._lock:
            sq.migrate(self._conn, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteLabelRepository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ versions

    def create_version(self, case_id: str, label_map: BlobInfo, ct: BlobInfo,
                       provenance: Provenance, request_id: str,
                       expected_parent_version_id: str = "", *,
                       organs: Sequence[int] = (), shape: Sequence[int] = (0, 0, 0),
                       affine: Sequence[float] | np.ndarray = ()) -> LabelVersionRecord:
        """Append a version to `case_id`'s history; idempotent by `request_id`.

        organs: ids present in the label map (as returned by `validate_label_map`); shape:
        (X, Y, Z); affine: 16 floats row-major (or a (4, 4) array flattened). The caller
        validates the label map against the CT before calling (blobs are not read here).
        Raises Aborted("PARENT_MISMATCH") when `expected_parent_version_id` is non-empty and is
        not the case's current head (another writer won; re-read the head and retry).
        """
        _check_id("case_id", case_id)
        _check_id("request_id", request_id)
        if not isinstance(provenance, Provenance):
            raise InvalidArgument("INVALID_PROVENANCE", "provenance is required", domain=DOMAIN)
        organ_t = tuple(sorted({int(o) for o in organs}))
        if any(o not in ORGANS for o in organ_t):
            raise InvalidArgument("INVALID_LABEL_MAP", "organ ids must lie in 1..9",
                                  domain=DOMAIN, metadata={"problem": "VALUES"})
        shape_t = tuple(int(s) for s in shape)
        affine_t = tuple(float(a) for a in np.asarray(affine, dtype=np.float64).ravel())
        if len(shape_t) != 3 or any(s < 0 for s in shape_t) or len(affine_t) not in (0, 16):
            raise InvalidArgument("INVALID_LABEL_MAP", "shape must be (X, Y, Z) and affine 16 "
                                  "values", domain=DOMAIN, metadata={"problem": "GEOMETRY"})
        fingerprint = _fingerprint(case_id, label_map.digest, label_map.size_bytes, ct.digest,
                                   ct.size_bytes, provenance.to_dict(),
                                   expected_parent_version_id, organ_t, shape_t, affine_t)
        with self._lock, sq.transaction(self._conn):
            prior = self._conn.execute(
                "SELECT * FROM label_versions WHERE request_id = ?", (request_id,)).fetchone()
            if prior is not None:
                if prior["request_fingerprint"] != fingerprint:
                    raise InvalidArgument(
                        "REQUEST_ID_REUSED",
                        "request_id was already used for a different request", domain=DOMAIN)
                return self._record(prior)
            head_row = self._conn.execute(
                "SELECT head_version_id, version_count FROM case_heads WHERE case_id = ?",
                (case_id,)).fetchone()
            head_id = head_row["head_version_id"] if head_row else ""
            if expected_parent_version_id and expected_parent_version_id != head_id:
                raise Aborted("PARENT_MISMATCH",
                              "expected_parent_version_id is not the case's current version",
                              domain=DOMAIN,
                              metadata={"expected_parent_version_id": expected_parent_version_id,
                                        "head_version_id": head_id})
            version_id = uuid.uuid4().hex
            now = sq.utc_now()
            self._conn.execute(
                "INSERT INTO label_versions(version_id, case_id, parent_version_id,"
                " label_map_digest, label_map_size, ct_digest, ct_size, source, model_version,"
                " job_id, reviewer, weights_trained, organs, shape, affine, request_id,"
                " request_fingerprint, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version_id, case_id, head_id or None, label_map.digest, label_map.size_bytes,
                 ct.digest, ct.size_bytes, provenance.source, provenance.model_version,
                 provenance.job_id, provenance.reviewer, int(provenance.weights_trained),
                 json.dumps(organ_t), json.dumps(shape_t), json.dumps(affine_t), request_id,
                 fingerprint, now.isoformat()))
            if head_row is None:
                self._conn.execute(
                    "INSERT INTO case_heads(case_id, head_version_id, version_count)"
                    " VALUES (?, ?, 1)", (case_id, version_id))
            else:
                self._conn.execute(
                    "UPDATE case_heads SET head_version_id = ?, version_count = version_count + 1"
                    " WHERE case_id = ?", (version_id, case_id))
            row = self._conn.execute("SELECT * FROM label_versions WHERE version_id = ?",
                                     (version_id,)).fetchone()
            return self._record(row)

    def get_version(self, version_id: str) -> LabelVersionRecord:
        """The version, or NotFound("VERSION_NOT_FOUND")."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM label_versions WHERE version_id = ?",
                                     (version_id,)).fetchone()
        if row is None:
            raise NotFound("VERSION_NOT_FOUND", "label version not found", domain=DOMAIN,
                           metadata={"version_id": version_id[:80]})
        return self._record(row)

    def head(self, case_id: str) -> LabelVersionRecord | None:
        """The case's current (latest) version, or None when the case has none."""
        with self._lock:
            row = self._conn.execute(
                "SELECT v.* FROM case_heads h JOIN label_versions v"
                " ON v.version_id = h.head_version_id WHERE h.case_id = ?", (case_id,)).fetchone()
        return None if row is None else self._record(row)

    def list_versions(self, case_id: str | None = None, page_size: int = 0,
                      page_token: str = "") -> tuple[list[LabelVersionRecord], str]:
        """Versions newest first (of one case, or of all cases when `case_id` is None/"").

        page_size: 0 -> 50, max 1000. Returns (page, next_page_token); "" means the end.
        The cursor is the insertion sequence, so versions written while paging never cause a
        duplicate or a gap among the versions that existed when paging started.
        """
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        scope = case_id or ""
        cursor = sq.decode_page_token(page_token, "label_versions", scope=scope, domain=DOMAIN)
        before = None
        if cursor is not None:
            before = cursor.get("before")
            if not isinstance(before, int) or isinstance(before, bool):
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid",
                                      domain=DOMAIN)
        where, args = [], []
        if scope:
            where.append("case_id = ?")
            args.append(scope)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        sql = "SELECT * FROM label_versions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(size + 1)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        more = len(rows) > size
        rows = rows[:size]
        token = (sq.encode_page_token("label_versions", {"before": rows[-1]["seq"]}, scope=scope)
                 if more else "")
        return [self._record(r) for r in rows], token

    def history(self, case_id: str) -> list[LabelVersionRecord]:
        """The case's chain from its first version to its head (follows parent links)."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM label_versions WHERE case_id = ?",
                                      (case_id,)).fetchall()
        by_parent = {r["parent_version_id"]: r for r in rows}
        chain, parent = [], None
        while parent in by_parent:
            row = by_parent[parent]
            chain.append(self._record(row))
            parent = row["version_id"]
        return chain

    def case_ids(self) -> list[str]:
        """Every case with at least one version, ascending."""
        with self._lock:
            return [r[0] for r in self._conn.execute(
                "SELECT case_id FROM case_heads ORDER BY case_id")]

    # ------------------------------------------------------------------ export jobs

    def create_export_job(self, case_ids: Sequence[str], destination_uri: str, *,
                          request_id: str = "") -> ExportJobRecord:
        """Queue an export of the head versions of `case_ids` (empty: every case).

        The heads are frozen now: versions written later are not exported by this job.
        Unknown case -> NotFound("CASE_NOT_FOUND"); no case at all -> FailedPrecondition
        ("NOTHING_TO_EXPORT"). A non-empty `request_id` makes the call idempotent.
        """
        if not destination_uri:
            raise InvalidArgument("INVALID_ARGUMENT", "destination_uri is required",
                                  domain=DOMAIN, metadata={"field": "destination_uri"})
        wanted = list(dict.fromkeys(case_ids))
        with self._lock, sq.transaction(self._conn):
            if request_id:
                row = self._conn.execute("SELECT * FROM export_jobs WHERE request_id = ?",
                                         (request_id,)).fetchone()
                if row is not None:
                    return self._job(row)
            if wanted:
                versions = []
                for cid in wanted:
                    head = self._conn.execute(
                        "SELECT head_version_id FROM case_heads WHERE case_id = ?",
                        (cid,)).fetchone()
                    if head is None:
                        raise NotFound("CASE_NOT_FOUND", "case has no label version",
                                       domain=DOMAIN, metadata={"case_id": cid[:80]})
                    versions.append((cid, head[0]))
            else:
                versions = [(r[0], r[1]) for r in self._conn.execute(
                    "SELECT case_id, head_version_id FROM case_heads ORDER BY case_id")]
            if not versions:
                raise FailedPrecondition("NOTHING_TO_EXPORT", "no case has a label version",
                                         domain=DOMAIN)
            job_id = uuid.uuid4().hex
            now = sq.utc_now().isoformat()
            self._conn.execute(
                "INSERT INTO export_jobs(job_id, state, destination_uri, case_ids, versions,"
                " cases_done, cases_total, error_reason, request_id, create_time, update_time)"
                " VALUES (?, 'QUEUED', ?, ?, ?, 0, ?, '', ?, ?, ?)",
                (job_id, destination_uri, json.dumps(wanted), json.dumps(versions),
                 len(versions), request_id or None, now, now))
            row = self._conn.execute("SELECT * FROM export_jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
            return self._job(row)

    def get_export_job(self, job_id: str) -> ExportJobRecord:
        """The job, or NotFound("EXPORT_JOB_NOT_FOUND")."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM export_jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
        if row is None:
            raise NotFound("EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN,
                           metadata={"job_id": job_id[:80]})
        return self._job(row)

    def update_export_job(self, job_id: str, *, state: str | None = None,
                          cases_done: int | None = None,
                          error_reason: str | None = None) -> ExportJobRecord:
        """Move a job along QUEUED -> RUNNING -> SUCCEEDED | FAILED (| CANCELLED, RUNNING ->
        QUEUED on restart) and/or record progress. An illegal transition (e.g. out of a
        terminal state) raises FailedPrecondition("INVALID_STATE_TRANSITION")."""
        with self._lock, sq.transaction(self._conn):
            row = self._conn.execute("SELECT * FROM export_jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
            if row is None:
                raise NotFound("EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN,
                               metadata={"job_id": job_id[:80]})
            new_state = row["state"] if state is None else state
            if new_state not in EXPORT_STATES:
                raise InvalidArgument("INVALID_ARGUMENT", "unknown export state", domain=DOMAIN,
                                      metadata={"state": str(new_state)[:40]})
            if new_state not in _EXPORT_TRANSITIONS[row["state"]]:
                raise FailedPrecondition("INVALID_STATE_TRANSITION",
                                         "export job cannot make this state transition",
                                         domain=DOMAIN,
                                         metadata={"from": row["state"], "to": new_state})
            done = row["cases_done"] if cases_done is None else int(cases_done)
            if not 0 <= done <= row["cases_total"]:
                raise InvalidArgument("INVALID_ARGUMENT", "cases_done out of range",
                                      domain=DOMAIN)
            reason = row["error_reason"] if error_reason is None else error_reason
            self._conn.execute(
                "UPDATE export_jobs SET state = ?, cases_done = ?, error_reason = ?,"
                " update_time = ? WHERE job_id = ?",
                (new_state, done, reason, sq.utc_now().isoformat(), job_id))
            row = self._conn.execute("SELECT * FROM export_jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
            return self._job(row)

    def list_export_jobs(self, states: Sequence[str] = ()) -> list[ExportJobRecord]:
        """Jobs in `states` (all when empty), oldest first: a restarted worker resumes the
        QUEUED and RUNNING ones."""
        with self._lock:
            if states:
                marks = ",".join("?" * len(states))
                rows = self._conn.execute(
                    f"SELECT * FROM export_jobs WHERE state IN ({marks})"
                    " ORDER BY create_time, job_id", tuple(states)).fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT * FROM export_jobs ORDER BY create_time, job_id").fetchall()
        return [self._job(r) for r in rows]

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _record(row: sqlite3.Row) -> LabelVersionRecord:
        shape = tuple(json.loads(row["shape"]))
        return LabelVersionRecord(
            version_id=row["version_id"], case_id=row["case_id"],
            parent_version_id=row["parent_version_id"] or "",
            label_map_digest=row["label_map_digest"], label_map_size=row["label_map_size"],
            ct_digest=row["ct_digest"], ct_size=row["ct_size"],
            provenance=Provenance(source=row["source"], model_version=row["model_version"],
                                  job_id=row["job_id"], reviewer=row["reviewer"],
                                  weights_trained=bool(row["weights_trained"])),
            organs=tuple(json.loads(row["organs"])),
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            affine=tuple(float(a) for a in json.loads(row["affine"])),
            create_time=datetime.fromisoformat(row["create_time"]),
        )

    @staticmethod
    def _job(row: sqlite3.Row) -> ExportJobRecord:
        return ExportJobRecord(
            job_id=row["job_id"], state=row["state"], destination_uri=row["destination_uri"],
            versions=tuple((str(c), str(v)) for c, v in json.loads(row["versions"])),
            cases_done=row["cases_done"], cases_total=row["cases_total"],
            error_reason=row["error_reason"],
            create_time=datetime.fromisoformat(row["create_time"]),
            update_time=datetime.fromisoformat(row["update_time"]),
            case_ids=tuple(json.loads(row["case_ids"])),
        )
