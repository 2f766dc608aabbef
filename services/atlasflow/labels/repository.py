"""Immutable label versions with lineage and provenance, export jobs and the audit trail (no grpc).

Two backends implement one `LabelRepository` interface and pass one contract test suite
(tests/labels/test_labels_repository.py): `SqliteLabelRepository` (embedded default) and
`PostgresLabelRepository` (production, atlasflow.labels.postgres). Both share the SQL in
`SqlLabelRepository`; a small `_Backend` adapter hides the driver (placeholders, transactions,
per-case write locks, timestamps).

Every label version of a case is an immutable row; a case's history is a single chain
(first version -> ... -> head). The chain is enforced by the database itself: one root per
case and at most one child per version (partial UNIQUE indexes), so even a buggy caller cannot
fork the history. Writers serialise per case (SQLite: `BEGIN IMMEDIATE`, the database write
lock; PostgreSQL: a transaction-scoped advisory lock on the case id), read the head, check
`expected_parent_version_id`, insert and move the head in one transaction.

Per-organ provenance: every version records, for each of the nine organs, which source decided
that organ's label and in which version (`OrganProvenance`); label assembly
(atlasflow.labels.assembly) computes it, the repository stores it.

Idempotency: `request_id` is UNIQUE. A repeat of a request (same request_id, same content)
returns the version created the first time, also after a restart and also after other versions
were appended since; the same request_id with different content is rejected
(InvalidArgument("REQUEST_ID_REUSED")).

Export jobs: a job freezes the head versions of its cases when it is created and stores the
caller's `options` (a JSON object, e.g. atlasflow.labels.export.ExportOptions.to_dict(); {} =
the plain AbdomenAtlas layout) in the same row. Per-case outcomes of a job (e.g. its DICOM SEG
outcome) are rows of `export_case_outcomes`, one per (job, case), committed as each case is
done; recording a case again replaces its outcome (the latest attempt wins).

Audit: `audit_records` is append-only (triggers refuse UPDATE and DELETE). Writes record their
audit row in the same transaction as the write; reads record theirs via `record_audit`.

Version events (a transactional outbox): every new version also writes a `version_events` row
in its own transaction, with its 1-based position in the case's chain and the writer's W3C
traceparent. The labels service delivers them to ranking (atlasflow.labels.events) and marks
them done only after ranking acknowledged, so a crash between commit and delivery loses nothing.
Migration 3 queued one event per version that existed before it.

Schema migrations are versioned (one list per backend, append-only) and run on open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from atlasflow.common import sqlite as sq
from atlasflow.common.blobstore import BlobInfo
from atlasflow.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.organs import ORGANS
from atlasflow.common.telemetry import current_traceparent
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
    """Where a label came from.

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
            raise InvalidArgument(
                "INVALID_PROVENANCE",
                "provenance source must be one of ai, radiologist, original",
                domain=DOMAIN,
                metadata={"source": str(self.source)[:40]},
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "model_version": self.model_version,
            "job_id": self.job_id,
            "reviewer": self.reviewer,
            "weights_trained": self.weights_trained,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        return cls(
            str(d["source"]),
            str(d.get("model_version", "")),
            str(d.get("job_id", "")),
            str(d.get("reviewer", "")),
            bool(d.get("weights_trained", False)),
        )


@dataclass(frozen=True)
class OrganProvenance:
    """Who decided one organ's label, and in which version.

    version_id: the version whose write decided this organ ("" in a create call = the version
    being created; records always carry the resolved id).
    """

    provenance: Provenance
    version_id: str = ""

    def to_dict(self) -> dict[str, object]:
        return {**self.provenance.to_dict(), "version_id": self.version_id}


@dataclass(frozen=True)
class LabelVersionRecord:
    """One immutable label version.

    label_map_*: combined label map blob (NIfTI uint8, AbdomenAtlas ids, on the CT grid);
    ct_*: the CT volume blob. organs: ids present (non-empty), ascending. shape: (X, Y, Z)
    voxels. affine: 16 floats, row-major voxel-to-world RAS+ mm. parent_version_id: "" for the
    first version of a case. create_time: UTC. organ_provenance: organ id -> OrganProvenance
    for all nine organs.
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
    organ_provenance: Mapping[int, OrganProvenance] = field(default_factory=dict, compare=True)


@dataclass(frozen=True)
class ExportJobRecord:
    """An export operation. state: one of EXPORT_STATES (OperationState without the prefix).

    versions: the (case_id, version_id) pairs frozen when the job was created (each case's
    head at that moment), in export order; cases_total == len(versions). destination_uri: as
    the caller gave it. options: the caller's JSON object stored with the job ({} = none;
    atlasflow.labels.export.ExportOptions.from_dict reads it).
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
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportCaseOutcome:
    """The latest recorded outcome of one case of an export job.

    outcome: the caller's JSON object (e.g. atlasflow.labels.export.SegOutcome.to_dict());
    time: when it was recorded (UTC).
    """

    job_id: str
    case_id: str
    outcome: Mapping[str, Any]
    time: datetime


@dataclass(frozen=True)
class AuditEvent:
    """What to record: who (principal), what (method = RPC name, case/version/job ids,
    outcome "OK" or the error reason)."""

    principal: str
    method: str
    case_id: str = ""
    version_ids: tuple[str, ...] = ()
    job_id: str = ""
    outcome: str = "OK"


@dataclass(frozen=True)
class AuditRecord:
    """A stored audit row: the event plus its id and time (UTC)."""

    record_id: str
    time: datetime
    principal: str
    method: str
    case_id: str
    version_ids: tuple[str, ...]
    job_id: str
    outcome: str


@dataclass(frozen=True)
class VersionEvent:
    """A pending hand-off of one new label version to ranking (see the module docstring).

    version_number: 1-based position of the version in its case's chain; attempts: delivery
    attempts so far; traceparent: W3C context of the write ("" when none).
    """

    seq: int
    version_id: str
    case_id: str
    version_number: int
    traceparent: str
    attempts: int


@runtime_checkable
class LabelRepository(Protocol):
    """Storage interface of label versions; every implementation passes tests/labels' contract."""

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
        affine: Sequence[float] | np.ndarray = (),
        organ_provenance: Mapping[int, OrganProvenance] | None = None,
        request_fingerprint: str = "",
        audit: AuditEvent | None = None,
        expect_empty: bool = False,
    ) -> LabelVersionRecord: ...

    def get_version(self, version_id: str) -> LabelVersionRecord: ...

    def list_versions(
        self, case_id: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[LabelVersionRecord], str]: ...

    def head(self, case_id: str) -> LabelVersionRecord | None: ...

    def version_for_request(self, request_id: str) -> tuple[LabelVersionRecord, str] | None: ...

    def history(self, case_id: str) -> list[LabelVersionRecord]: ...

    def case_ids(self) -> list[str]: ...

    def create_export_job(
        self,
        case_ids: Sequence[str],
        destination_uri: str,
        *,
        request_id: str = "",
        audit: AuditEvent | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ExportJobRecord: ...

    def get_export_job(self, job_id: str) -> ExportJobRecord: ...

    def update_export_job(
        self, job_id: str, *, state: str | None = None, cases_done: int | None = None, error_reason: str | None = None
    ) -> ExportJobRecord: ...

    def list_export_jobs(self, states: Sequence[str] = ()) -> list[ExportJobRecord]: ...

    def record_export_outcome(self, job_id: str, case_id: str, outcome: Mapping[str, Any]) -> ExportCaseOutcome: ...

    def list_export_outcomes(self, job_id: str) -> list[ExportCaseOutcome]: ...

    def record_audit(self, event: AuditEvent) -> AuditRecord: ...

    def list_audit_records(
        self, case_id: str = "", principal: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AuditRecord], str]: ...

    def due_version_events(self, now: float, limit: int = 32) -> list[VersionEvent]: ...

    def mark_version_event(self, seq: int, state: str, *, error: str = "", next_attempt_at: float = 0.0) -> None: ...

    def version_event_backlog(self) -> int: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ SQLite schema


def _legacy_export_options_sql(dialect: str) -> str:
    """Migration-4 statements that move the DICOM SEG options of jobs queued by the stop-gap
    (`<uri>?dicom_seg=1[&pacs_host=H&pacs_port=P&pacs_called_ae=A&pacs_calling_ae=C]`, keys
    in that order, values form-encoded) into `options` and strip the query. Values are
    percent-decoded for the characters a host name or AE title plausibly holds (space : & =
    + / ? # @ %). dialect: "sqlite" or "postgres". Part of migration 4: never change it.
    """
    find = "instr" if dialect == "sqlite" else "strpos"
    u = "destination_uri"

    def between(key: str, next_key: str | None) -> str:
        start = f"{find}({u}, '{key}') + {len(key)}"
        if next_key is None:
            return f"substr({u}, {start})"
        return f"substr({u}, {start}, {find}({u}, '{next_key}') - ({start}))"

    def decoded(expr: str) -> str:
        expr = f"replace({expr}, '+', ' ')"
        for code, char in (
            ("%3A", ":"),
            ("%26", "&"),
            ("%3D", "="),
            ("%2B", "+"),
            ("%2F", "/"),
            ("%3F", "?"),
            ("%23", "#"),
            ("%40", "@"),
            ("%20", " "),
            ("%25", "%"),
        ):
            expr = f"replace({expr}, '{code}', '{char}')"
        return expr

    host = decoded(between("&pacs_host=", "&pacs_port="))
    port = f"CAST({between('&pacs_port=', '&pacs_called_ae=')} AS INTEGER)"
    called = decoded(between("&pacs_called_ae=", "&pacs_calling_ae="))
    calling = decoded(between("&pacs_calling_ae=", None))
    if dialect == "sqlite":
        seg = "json_object('include_dicom_seg', json('true'))"
        pacs = (
            f"json_object('include_dicom_seg', json('true'), 'pacs', json_object("
            f"'called_ae', {called}, 'calling_ae', {calling}, 'host', {host}, 'port', {port}))"
        )
    else:
        seg = "json_build_object('include_dicom_seg', true)::text"
        pacs = (
            f"json_build_object('include_dicom_seg', true, 'pacs', json_build_object("
            f"'called_ae', {called}, 'calling_ae', {calling}, 'host', {host},"
            f" 'port', {port}))::text"
        )
    return f"""
    UPDATE export_jobs SET options = {seg} WHERE {find}({u}, '?dicom_seg=1') > 0;
    UPDATE export_jobs SET options = {pacs}
        WHERE {find}({u}, '?dicom_seg=1&pacs_host=') > 0;
    UPDATE export_jobs SET {u} = substr({u}, 1, {find}({u}, '?') - 1) WHERE {find}({u}, '?') > 0;
    """


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
    # 2: per-organ provenance ('{}' on rows written before: the version's own provenance
    # applies to every organ) and the append-only audit trail.
    """
    ALTER TABLE label_versions ADD COLUMN organ_provenance TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE audit_records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        record_id TEXT NOT NULL UNIQUE,
        time TEXT NOT NULL,
        principal TEXT NOT NULL,
        method TEXT NOT NULL,
        case_id TEXT NOT NULL DEFAULT '',
        version_ids TEXT NOT NULL DEFAULT '[]',
        job_id TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL
    );
    CREATE INDEX audit_records_by_case ON audit_records(case_id, seq);
    CREATE INDEX audit_records_by_principal ON audit_records(principal, seq);
    CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    """,
    # 3: version events (outbox to ranking); one per existing version, oldest first.
    """
    CREATE TABLE version_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        version_id TEXT NOT NULL UNIQUE REFERENCES label_versions(version_id),
        case_id TEXT NOT NULL,
        version_number INTEGER NOT NULL,
        traceparent TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX version_events_due ON version_events(state, next_attempt_at, seq);
    INSERT INTO version_events(version_id, case_id, version_number)
        SELECT v.version_id, v.case_id,
               (SELECT COUNT(*) FROM label_versions p
                WHERE p.case_id = v.case_id AND p.seq <= v.seq)
        FROM label_versions v ORDER BY v.seq;
    """,
    # 4: export job options (a JSON object) and per-case export outcomes. Jobs queued by the
    # stop-gap that carried the DICOM SEG options as the destination URI's query get them
    # moved into `options` (see `_legacy_export_options_sql`).
    """
    ALTER TABLE export_jobs ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE export_case_outcomes (
        job_id TEXT NOT NULL REFERENCES export_jobs(job_id),
        case_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        time TEXT NOT NULL,
        PRIMARY KEY (job_id, case_id)
    );
    """
    + _legacy_export_options_sql("sqlite"),
)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument(
            "INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)", domain=DOMAIN, metadata={"field": name}
        )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _dt(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


_MAX_JSON_BYTES = 16 * 1024


def _json_object(name: str, value: Any) -> str:
    """Canonical JSON text (sorted keys, compact) of a caller's JSON object; InvalidArgument
    ("INVALID_ARGUMENT", metadata field `name`) when it is not one or is over 16 KiB."""
    try:
        if not isinstance(value, Mapping):
            raise TypeError
        text = json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = ""
    if not text or len(text.encode()) > _MAX_JSON_BYTES:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"{name} must be a JSON object of at most 16 KiB",
            domain=DOMAIN,
            metadata={"field": name},
        )
    return text


# ------------------------------------------------------------------------------ backends


class _Tx(Protocol):
    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None: ...
    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]: ...
    def run(self, sql: str, args: Sequence[Any] = ()) -> None: ...


class _Backend(Protocol):
    """What SqlLabelRepository needs from a driver. SQL uses `?` placeholders."""

    for_update: str  # " FOR UPDATE" where row locks exist, else ""
    integrity_errors: tuple[type[BaseException], ...]

    def write(self) -> contextlib.AbstractContextManager[_Tx]: ...
    def read(self) -> contextlib.AbstractContextManager[_Tx]: ...
    def lock_case(self, tx: _Tx, case_id: str) -> None: ...
    def timestamp(self, dt: datetime) -> Any: ...
    def close(self) -> None: ...


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def one(self, sql: str, args: Sequence[Any] = ()) -> Mapping[str, Any] | None:
        return self.conn.execute(sql, tuple(args)).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return self.conn.execute(sql, tuple(args)).fetchall()

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
    def write(self) -> Iterator[_Tx]:
        with self.lock, sq.transaction(self.conn):
            yield _SqliteTx(self.conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[_Tx]:
        with self.lock:
            yield _SqliteTx(self.conn)

    def lock_case(self, tx: _Tx, case_id: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already holds the database's write lock."""

    def timestamp(self, dt: datetime) -> Any:
        return dt.isoformat()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class SqlLabelRepository:
    """`LabelRepository` over a `_Backend` (shared SQL of the SQLite and PostgreSQL stores)."""

    def __init__(self, backend: _Backend) -> None:
        self._db = backend

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqlLabelRepository:
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
        affine: Sequence[float] | np.ndarray = (),
        organ_provenance: Mapping[int, OrganProvenance] | None = None,
        request_fingerprint: str = "",
        audit: AuditEvent | None = None,
        expect_empty: bool = False,
    ) -> LabelVersionRecord:
        """Append a version to `case_id`'s history; idempotent by `request_id`.

        organs: ids present in the label map (as returned by `validate_label_map`); shape:
        (X, Y, Z); affine: 16 floats row-major (or a (4, 4) array flattened). The caller
        validates the label map against the CT before calling (blobs are not read here).
        organ_provenance: per organ id (missing organs: `provenance` of this version); an
        empty version_id in it means "this version". request_fingerprint: the caller's hash of
        the request (when the stored label map is derived, e.g. assembled); default: a hash
        of the arguments. audit: recorded in the same transaction (version_ids filled in).
        Raises Aborted("PARENT_MISMATCH") when `expected_parent_version_id` is non-empty and is
        not the case's current head, or when `expect_empty` and the case already has a version
        (another writer won; re-read the head and retry).
        """
        _check_id("case_id", case_id)
        _check_id("request_id", request_id)
        if not isinstance(provenance, Provenance):
            raise InvalidArgument("INVALID_PROVENANCE", "provenance is required", domain=DOMAIN)
        organ_t = tuple(sorted({int(o) for o in organs}))
        if any(o not in ORGANS for o in organ_t):
            raise InvalidArgument(
                "INVALID_LABEL_MAP", "organ ids must lie in 1..9", domain=DOMAIN, metadata={"problem": "VALUES"}
            )
        shape_t = tuple(int(s) for s in shape)
        affine_t = tuple(float(a) for a in np.asarray(affine, dtype=np.float64).ravel())
        if len(shape_t) != 3 or any(s < 0 for s in shape_t) or len(affine_t) not in (0, 16):
            raise InvalidArgument(
                "INVALID_LABEL_MAP",
                "shape must be (X, Y, Z) and affine 16 values",
                domain=DOMAIN,
                metadata={"problem": "GEOMETRY"},
            )
        organ_prov = dict(organ_provenance or {})
        if any(o not in ORGANS for o in organ_prov):
            raise InvalidArgument("INVALID_PROVENANCE", "organ provenance keys must lie in 1..9", domain=DOMAIN)
        fingerprint = request_fingerprint or _fingerprint(
            case_id,
            label_map.digest,
            label_map.size_bytes,
            ct.digest,
            ct.size_bytes,
            provenance.to_dict(),
            expected_parent_version_id,
            organ_t,
            shape_t,
            affine_t,
            {str(k): v.to_dict() for k, v in sorted(organ_prov.items())},
        )
        for attempt in range(3):
            try:
                return self._insert_version(
                    case_id,
                    label_map,
                    ct,
                    provenance,
                    request_id,
                    expected_parent_version_id,
                    organ_t,
                    shape_t,
                    affine_t,
                    organ_prov,
                    fingerprint,
                    audit,
                    expect_empty,
                )
            except self._db.integrity_errors:
                # A concurrent writer of the same request_id (other case) or of the same case's
                # first version committed between our read and our insert: re-read decides.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _insert_version(
        self,
        case_id: str,
        label_map: BlobInfo,
        ct: BlobInfo,
        provenance: Provenance,
        request_id: str,
        expected_parent: str,
        organ_t: tuple[int, ...],
        shape_t: tuple[int, ...],
        affine_t: tuple[float, ...],
        organ_prov: dict[int, OrganProvenance],
        fingerprint: str,
        audit: AuditEvent | None,
        expect_empty: bool = False,
    ) -> LabelVersionRecord:
        with self._db.write() as tx:
            self._db.lock_case(tx, case_id)
            prior = tx.one("SELECT * FROM label_versions WHERE request_id = ?", (request_id,))
            if prior is not None:
                if prior["request_fingerprint"] != fingerprint:
                    raise InvalidArgument(
                        "REQUEST_ID_REUSED", "request_id was already used for a different request", domain=DOMAIN
                    )
                record = self._record(prior)
                if audit is not None:
                    self._insert_audit(tx, _with_versions(audit, record.version_id))
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
            resolved = {
                oid: OrganProvenance(op.provenance, op.version_id or version_id) for oid, op in organ_prov.items()
            }
            for oid in ORGANS:
                resolved.setdefault(oid, OrganProvenance(provenance, version_id))
            tx.run(
                "INSERT INTO label_versions(version_id, case_id, parent_version_id,"
                " label_map_digest, label_map_size, ct_digest, ct_size, source, model_version,"
                " job_id, reviewer, weights_trained, organs, shape, affine, request_id,"
                " request_fingerprint, create_time, organ_provenance)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version_id,
                    case_id,
                    head_id or None,
                    label_map.digest,
                    label_map.size_bytes,
                    ct.digest,
                    ct.size_bytes,
                    provenance.source,
                    provenance.model_version,
                    provenance.job_id,
                    provenance.reviewer,
                    bool(provenance.weights_trained),
                    json.dumps(organ_t),
                    json.dumps(shape_t),
                    json.dumps(affine_t),
                    request_id,
                    fingerprint,
                    self._db.timestamp(sq.utc_now()),
                    json.dumps({str(k): v.to_dict() for k, v in sorted(resolved.items())}),
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
                "INSERT INTO version_events(version_id, case_id, version_number, traceparent) VALUES (?, ?, ?, ?)",
                (version_id, case_id, number, current_traceparent()),
            )
            if audit is not None:
                self._insert_audit(tx, _with_versions(audit, version_id))
            row = tx.one("SELECT * FROM label_versions WHERE version_id = ?", (version_id,))
            assert row is not None
            return self._record(row)

    def version_for_request(self, request_id: str) -> tuple[LabelVersionRecord, str] | None:
        """(version, request fingerprint) created by `request_id`, or None."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM label_versions WHERE request_id = ?", (request_id,))
        return None if row is None else (self._record(row), str(row["request_fingerprint"]))

    def get_version(self, version_id: str) -> LabelVersionRecord:
        """The version, or NotFound("VERSION_NOT_FOUND")."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM label_versions WHERE version_id = ?", (version_id,))
        if row is None:
            raise NotFound(
                "VERSION_NOT_FOUND", "label version not found", domain=DOMAIN, metadata={"version_id": version_id[:80]}
            )
        return self._record(row)

    def head(self, case_id: str) -> LabelVersionRecord | None:
        """The case's current (latest) version, or None when the case has none."""
        with self._db.read() as tx:
            row = tx.one(
                "SELECT v.* FROM case_heads h JOIN label_versions v"
                " ON v.version_id = h.head_version_id WHERE h.case_id = ?",
                (case_id,),
            )
        return None if row is None else self._record(row)

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
        return [self._record(r) for r in rows], token

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
            chain.append(self._record(row))
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
        options_json = _json_object("options", options or {})
        wanted = list(dict.fromkeys(case_ids))
        with self._db.write() as tx:
            if request_id:
                row = tx.one("SELECT * FROM export_jobs WHERE request_id = ?", (request_id,))
                if row is not None:
                    prior = self._job(row)
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
            return self._job(row)

    def get_export_job(self, job_id: str) -> ExportJobRecord:
        """The job, or NotFound("EXPORT_JOB_NOT_FOUND")."""
        with self._db.read() as tx:
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (job_id,))
        if row is None:
            raise NotFound(
                "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
            )
        return self._job(row)

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
            if new_state not in EXPORT_STATES:
                raise InvalidArgument(
                    "INVALID_ARGUMENT", "unknown export state", domain=DOMAIN, metadata={"state": str(new_state)[:40]}
                )
            if new_state not in _EXPORT_TRANSITIONS[row["state"]]:
                raise FailedPrecondition(
                    "INVALID_STATE_TRANSITION",
                    "export job cannot make this state transition",
                    domain=DOMAIN,
                    metadata={"from": row["state"], "to": new_state},
                )
            done = row["cases_done"] if cases_done is None else int(cases_done)
            if not 0 <= done <= row["cases_total"]:
                raise InvalidArgument("INVALID_ARGUMENT", "cases_done out of range", domain=DOMAIN)
            reason = row["error_reason"] if error_reason is None else error_reason
            tx.run(
                "UPDATE export_jobs SET state = ?, cases_done = ?, error_reason = ?, update_time = ? WHERE job_id = ?",
                (new_state, done, reason, self._db.timestamp(sq.utc_now()), job_id),
            )
            row = tx.one("SELECT * FROM export_jobs WHERE job_id = ?", (job_id,))
            assert row is not None
            return self._job(row)

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
        return [self._job(r) for r in rows]

    def record_export_outcome(self, job_id: str, case_id: str, outcome: Mapping[str, Any]) -> ExportCaseOutcome:
        """Record (commit) the outcome of one case of a job; a case recorded again gets the
        new outcome (the latest attempt wins, e.g. when a resumed job exports it again).

        outcome: a JSON object (at most 16 KiB encoded). NotFound("EXPORT_JOB_NOT_FOUND") for
        an unknown job; InvalidArgument("INVALID_ARGUMENT", metadata field "case_id") when the
        case is not one of the job's, field "outcome" when the outcome is not a JSON object.
        """
        outcome_json = _json_object("outcome", outcome)
        with self._db.write() as tx:
            row = tx.one("SELECT versions FROM export_jobs WHERE job_id = ?", (job_id,))
            if row is None:
                raise NotFound(
                    "EXPORT_JOB_NOT_FOUND", "export job not found", domain=DOMAIN, metadata={"job_id": job_id[:80]}
                )
            if case_id not in {str(c) for c, _ in _json(row["versions"])}:
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
        order = {str(c): i for i, (c, _) in enumerate(_json(job["versions"]))}
        rows = sorted(rows, key=lambda r: (order.get(r["case_id"], len(order)), r["case_id"]))
        return [ExportCaseOutcome(job_id, r["case_id"], _json(r["outcome"]), _dt(r["time"])) for r in rows]

    # ------------------------------------------------------------------ audit

    def record_audit(self, event: AuditEvent) -> AuditRecord:
        """Append one audit record (its own transaction) and return it."""
        with self._db.write() as tx:
            return self._insert_audit(tx, event)

    def _insert_audit(self, tx: _Tx, event: AuditEvent) -> AuditRecord:
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
                _dt(r["time"]),
                r["principal"],
                r["method"],
                r["case_id"],
                tuple(_json(r["version_ids"])),
                r["job_id"],
                r["outcome"],
            )
            for r in rows
        ], token

    # ------------------------------------------------------------------ rows

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
                " last_error = ?, next_attempt_at = ? WHERE seq = ?",
                (state, error[:500], float(next_attempt_at), int(seq)),
            )

    def version_event_backlog(self) -> int:
        """Number of events not delivered yet."""
        with self._db.read() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM version_events WHERE state = 'pending'")
        return int(row["n"]) if row else 0

    @staticmethod
    def _record(row: Mapping[str, Any]) -> LabelVersionRecord:
        shape = tuple(_json(row["shape"]))
        provenance = Provenance(
            source=row["source"],
            model_version=row["model_version"],
            job_id=row["job_id"],
            reviewer=row["reviewer"],
            weights_trained=bool(row["weights_trained"]),
        )
        stored = _json(row["organ_provenance"]) or {}
        organ_prov = {
            oid: (
                OrganProvenance(Provenance.from_dict(stored[str(oid)]), str(stored[str(oid)].get("version_id", "")))
                if str(oid) in stored
                else OrganProvenance(provenance, row["version_id"])
            )
            for oid in ORGANS
        }
        return LabelVersionRecord(
            version_id=row["version_id"],
            case_id=row["case_id"],
            parent_version_id=row["parent_version_id"] or "",
            label_map_digest=row["label_map_digest"],
            label_map_size=int(row["label_map_size"]),
            ct_digest=row["ct_digest"],
            ct_size=int(row["ct_size"]),
            provenance=provenance,
            organs=tuple(int(o) for o in _json(row["organs"])),
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            affine=tuple(float(a) for a in _json(row["affine"])),
            create_time=_dt(row["create_time"]),
            organ_provenance=organ_prov,
        )

    @staticmethod
    def _job(row: Mapping[str, Any]) -> ExportJobRecord:
        return ExportJobRecord(
            job_id=row["job_id"],
            state=row["state"],
            destination_uri=row["destination_uri"],
            versions=tuple((str(c), str(v)) for c, v in _json(row["versions"])),
            cases_done=int(row["cases_done"]),
            cases_total=int(row["cases_total"]),
            error_reason=row["error_reason"],
            create_time=_dt(row["create_time"]),
            update_time=_dt(row["update_time"]),
            case_ids=tuple(_json(row["case_ids"])),
            options=_json(row["options"]) or {},
        )


def _with_versions(event: AuditEvent, version_id: str) -> AuditEvent:
    return AuditEvent(event.principal, event.method, event.case_id, (version_id,), event.job_id, event.outcome)


class SqliteLabelRepository(SqlLabelRepository):
    """`LabelRepository` on an SQLite file (the embedded default).

    Threading: one instance holds one connection and serialises its calls with a lock;
    several instances (threads, processes) on the same file are safe (atlasflow.common.sqlite).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(_SqliteBackend(path))

    def __enter__(self) -> SqliteLabelRepository:
        return self


def open_repository(database_url: str, data_dir: str | Path) -> SqlLabelRepository:
    """The repository a deployment is configured for.

    database_url: "" -> SQLite at `<data_dir>/labels.sqlite3`; "postgresql://..." (or
    "postgres://...") -> PostgreSQL. Anything else: InvalidArgument("INVALID_SETTING").
    """
    if not database_url:
        return SqliteLabelRepository(Path(data_dir) / "labels.sqlite3")
    if database_url.startswith(("postgresql://", "postgres://")):
        from atlasflow.labels.postgres import PostgresLabelRepository

        return PostgresLabelRepository(database_url)
    raise InvalidArgument(
        "INVALID_SETTING",
        "labels database URL must be empty (SQLite) or postgresql://...",
        domain=DOMAIN,
        metadata={"scheme": database_url.split(":", 1)[0][:20]},
    )
