"""Deleting a study everywhere: the DeleteStudy operation (no grpc).

An admin's ``DeleteStudy`` (`atlasflow.ingest.servicer`) calls `Deletions.start`, which in ONE
ingest transaction (`IngestStore.purge_study`) deletes ingest's own rows of the study
(instances, conflicts, series versions, their pending segmentation hand-offs, completed
uploads; the spool is drained first), records the operation (table ``deletions``, with the
reason and the requester: it is never deleted, it is the deletion's audit record) with one step
per service, and queues one ``PurgeStudy`` hand-off per other service in the outbox
(`PURGE_TOPIC`: segmentation, labels, ranking). The outbox dispatcher delivers them, retrying
with backoff across restarts until each service acknowledges (`purge_handler`): a service that
is down delays the deletion, never loses it. Each acknowledgement records the service's counts
and the blob digests its deleted rows referenced; the last one queues the blob sweep
(`SWEEP_TOPIC`, `sweep_handler`).

Blobs are content-addressed and shared (one blob store for every service; the same bytes are
one blob whoever wrote them, e.g. two studies with identical volumes or masks). A blob is
deleted only when NO row of ANY service references it: the sweep takes the digests the purges
released (instances, volumes, label maps, heatmaps), purges every service once more (catching
rows written by work still in flight during the first purge, e.g. a segmentation job finishing)
while asking each which of the candidates rows of its own still reference, asks ingest's own
rows too, and deletes the rest. A blob that was written or put again (`LocalBlobStore.put`
touches an existing blob) within ``grace_s`` before the sweep may belong to a writer that has
not committed its row yet: the sweep then waits (retried later) until the grace has passed.

Tombstone: new instances of a deleted study are refused (FailedPrecondition STUDY_DELETED,
C-STORE 0x0124) for ``refuse_days`` after the deletion (`IngestStore.check_not_deleted`);
afterwards the same StudyInstanceUID is received as a new study, and a new DeleteStudy starts a
new operation. Within that time DeleteStudy is idempotent: it returns the existing operation,
also when two replicas are asked at the same moment (the purge's transaction looks again under
the study's lock and the later one returns the first one's operation).

Not recalled: datasets already exported (the labels service's export directory, a PACS);
audit records (the labels service's trail, these operations) stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import sqlalchemy as sa

from atlasflow.common.errors import InvalidArgument, NotFound, Unavailable
from atlasflow.common.outbox import OutboxRow, enqueue
from atlasflow.ingest.store import IngestStore, one, rows, run, scalar

log = logging.getLogger(__name__)

DOMAIN = "atlasflow.ingest"
PURGE_TOPIC = "deletion.PurgeStudy"
SWEEP_TOPIC = "deletion.SweepBlobs"
#: the services ingest hands PurgeStudy to
PEERS = ("segmentation", "labels", "ranking")
STEPS = ("ingest", *PEERS, "blobs")
MAX_REASON_CHARS = 1000


class SweptBlobStore(Protocol):
    """What the sweep needs of the blob store (`atlasflow.common.blobstore.LocalBlobStore`)."""

    def modified(self, digest: str) -> float | None: ...

    def delete(self, digest: str) -> bool: ...


@dataclass(frozen=True)
class PurgeResult:
    """One service's answer to PurgeStudy."""

    deleted_rows: dict[str, int]
    released: list[str]
    referenced: list[str] = field(default_factory=list)


#: (service, case_id, digests to check) -> that service's PurgeStudy answer
Purge = Callable[[str, str, list[str]], Awaitable[PurgeResult]]


@dataclass(frozen=True)
class DeletionStep:
    service: str
    state: str  # QUEUED | SUCCEEDED
    counts: dict[str, int]
    last_error: str
    done_time: float


@dataclass(frozen=True)
class Deletion:
    deletion_id: str
    case_id: str
    state: str  # RUNNING | SUCCEEDED
    reason: str
    requested_by: str
    steps: list[DeletionStep]
    create_time: float
    update_time: float


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"reason is required (1-{MAX_REASON_CHARS} characters)",
            domain=DOMAIN,
            metadata={"field": "reason"},
        )
    return reason


class Deletions:
    """The deletion operations in ingest's database (the store's `atlasflow.common.db.Database`).

    Tombstones are loaded at start and set by this process's deletions (the fast check of
    `IngestStore.check_not_deleted`); another replica's deletion is a row of ``deletions`` that
    every replica checks under the study's lock: `IngestStore._record` refuses the study's new
    instances, and each spooled record a replica drains or recovers later is dropped
    (`IngestStore._drain_guard`), so a deletion is never undone by another replica's spool."""

    def __init__(
        self, store: IngestStore, blobs: SweptBlobStore, *, refuse_days: float = 30.0, grace_s: float = 300.0
    ) -> None:
        self.store = store
        self.db = store.db
        self.lock = store.lock
        self.blobs = blobs
        self.grace_s = grace_s
        store.refuse_deleted_s = refuse_days * 86400.0
        with self.db.read() as conn:
            found = rows(
                conn,
                "SELECT deletion_id, case_id, create_time FROM deletions WHERE create_time >= :t ORDER BY create_time",
                {"t": time.time() - store.refuse_deleted_s},
            )
        with self.lock:
            store.tombstones.update({r["case_id"]: (r["deletion_id"], float(r["create_time"])) for r in found})

    # ------------------------------------------------------------------ the operation

    def start(self, case_id: str, reason: str, requested_by: str) -> tuple[Deletion, bool]:
        """The study's deletion: the existing one while its tombstone lasts, else a new one
        (ingest's rows deleted, the other services' purges queued). (deletion, created)."""
        reason = check_reason(reason)
        with self.lock:
            with self.db.read() as conn:
                existing = self._existing(conn, case_id)
            if existing is not None:
                return self.get(existing), False
            deletion_id = "del-" + uuid.uuid4().hex[:20]
            now = time.time()
            # the tombstone first: from now on no instance of the study is recorded
            previous = self.store.tombstones.get(case_id)
            self.store.tombstones[case_id] = (deletion_id, now)

        def record(
            conn: sa.Connection, counts: dict[str, int], released: list[str]
        ) -> None:  # in the purge's transaction, under the study's lock
            raced = self._existing(conn, case_id)
            if raced is not None:  # another replica's DeleteStudy of the study committed meanwhile
                raise _AlreadyDeleted(raced)
            run(
                conn,
                "INSERT INTO deletions(deletion_id, case_id, reason, requested_by, state, create_time, update_time)"
                " VALUES (:d, :c, :r, :by, 'RUNNING', :t, :t)",
                {"d": deletion_id, "c": case_id, "r": reason, "by": requested_by, "t": now},
            )
            for position, service in enumerate(STEPS):
                done = service == "ingest"
                run(
                    conn,
                    "INSERT INTO deletion_steps(deletion_id, service, position, state, counts_json,"
                    " released_json, done_time) VALUES (:d, :s, :p, :state, :counts, :released, :t)",
                    {
                        "d": deletion_id,
                        "s": service,
                        "p": position,
                        "state": "SUCCEEDED" if done else "QUEUED",
                        "counts": json.dumps(counts if done else {}),
                        "released": json.dumps(released if done else []),
                        "t": now if done else 0.0,
                    },
                )
            for service in PEERS:
                payload = json.dumps({"deletion_id": deletion_id, "case_id": case_id, "service": service}).encode()
                enqueue(conn, PURGE_TOPIC, f"{deletion_id}:{service}", payload)

        try:
            self.store.purge_study(case_id, record)
        except _AlreadyDeleted as raced:  # rolled back: that deletion is the study's
            with self.lock:
                self.store.tombstones[case_id] = (raced.deletion_id, now)
            return self.get(raced.deletion_id), False
        except BaseException:
            with self.lock:
                if previous is None:
                    self.store.tombstones.pop(case_id, None)
                else:
                    self.store.tombstones[case_id] = previous
            raise
        log.info("study deletion started", extra={"fields": {"deletion_id": deletion_id, "case_id": case_id}})
        return self.get(deletion_id), True

    def _existing(self, conn: sa.Connection, case_id: str) -> str | None:
        """The id of the study's deletion whose tombstone still lasts, or None."""
        r = one(
            conn,
            "SELECT deletion_id FROM deletions WHERE case_id = :c AND create_time >= :t"
            " ORDER BY create_time DESC LIMIT 1",
            {"c": case_id, "t": time.time() - self.store.refuse_deleted_s},
        )
        return None if r is None else str(r["deletion_id"])

    def get(self, deletion_id: str) -> Deletion:
        with self.db.read() as conn:
            r = one(conn, "SELECT * FROM deletions WHERE deletion_id = :d", {"d": deletion_id})
            steps = rows(
                conn, "SELECT * FROM deletion_steps WHERE deletion_id = :d ORDER BY position", {"d": deletion_id}
            )
        if r is None:
            raise NotFound(
                "DELETION_NOT_FOUND",
                "deletion not found",
                domain=DOMAIN,
                metadata={"deletion_id": deletion_id[:80]},
            )
        return Deletion(
            r["deletion_id"],
            r["case_id"],
            r["state"],
            r["reason"],
            r["requested_by"],
            [
                DeletionStep(
                    s["service"], s["state"], json.loads(s["counts_json"]), s["last_error"], float(s["done_time"])
                )
                for s in steps
            ],
            float(r["create_time"]),
            float(r["update_time"]),
        )

    def record_error(self, deletion_id: str, service: str, error: str) -> None:
        with self.db.transaction() as conn:
            run(
                conn,
                "UPDATE deletion_steps SET last_error = :e WHERE deletion_id = :d AND service = :s AND state = 'QUEUED'",
                {"e": error[:200], "d": deletion_id, "s": service},
            )
            run(
                conn,
                "UPDATE deletions SET update_time = :t WHERE deletion_id = :d",
                {"t": time.time(), "d": deletion_id},
            )

    def record_purge(self, deletion_id: str, service: str, result: PurgeResult) -> None:
        """A service acknowledged its purge; after the last one the blob sweep is queued."""
        now = time.time()
        with self.db.transaction() as conn:
            # one deletion's steps are acknowledged by several replicas' dispatchers: the last one
            # queues the sweep (the row lock orders them on PostgreSQL)
            one(conn, "SELECT state FROM deletions WHERE deletion_id = :d" + self.db.for_update(), {"d": deletion_id})
            run(
                conn,
                "UPDATE deletion_steps SET state = 'SUCCEEDED', counts_json = :counts, released_json = :released,"
                " last_error = '', done_time = :t WHERE deletion_id = :d AND service = :s AND state = 'QUEUED'",
                {
                    "counts": json.dumps(result.deleted_rows),
                    "released": json.dumps(result.released),
                    "t": now,
                    "d": deletion_id,
                    "s": service,
                },
            )
            run(conn, "UPDATE deletions SET update_time = :t WHERE deletion_id = :d", {"t": now, "d": deletion_id})
            waiting = scalar(
                conn,
                "SELECT COUNT(*) FROM deletion_steps WHERE deletion_id = :d AND service != 'blobs'"
                " AND state != 'SUCCEEDED'",
                {"d": deletion_id},
            )
            if not waiting:
                case_id = scalar(conn, "SELECT case_id FROM deletions WHERE deletion_id = :d", {"d": deletion_id})
                payload = json.dumps({"deletion_id": deletion_id, "case_id": case_id, "service": "blobs"}).encode()
                enqueue(conn, SWEEP_TOPIC, f"{deletion_id}:blobs", payload)

    def candidates(self, deletion_id: str) -> list[str]:
        """Digests the purged rows of every service referenced."""
        with self.db.read() as conn:
            found = rows(conn, "SELECT released_json FROM deletion_steps WHERE deletion_id = :d", {"d": deletion_id})
        return sorted({d for r in found for d in json.loads(r["released_json"])})

    def finish(self, deletion_id: str, counts: dict[str, int]) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            run(
                conn,
                "UPDATE deletion_steps SET state = 'SUCCEEDED', counts_json = :counts, last_error = '', done_time = :t"
                " WHERE deletion_id = :d AND service = 'blobs'",
                {"counts": json.dumps(counts), "t": now, "d": deletion_id},
            )
            run(
                conn,
                "UPDATE deletions SET state = 'SUCCEEDED', update_time = :t WHERE deletion_id = :d",
                {"t": now, "d": deletion_id},
            )
        log.info("study deletion done", extra={"fields": {"deletion_id": deletion_id, **counts}})

    # ------------------------------------------------------------------ the blob sweep

    def unreferenced(self, candidates: list[str], referenced: set[str], started: float) -> tuple[list[str], int]:
        """(blobs to delete now, number still referenced). Unavailable BLOB_GRACE when one of
        the unreferenced blobs was written or put within the grace period (retried later)."""
        gone: list[str] = []
        for digest in candidates:
            if digest in referenced:
                continue
            mtime = self.blobs.modified(digest)
            if mtime is None:
                continue
            if mtime > started - self.grace_s:
                raise Unavailable(
                    "BLOB_GRACE",
                    "a released blob was written recently; the sweep waits for its grace period",
                    domain=DOMAIN,
                    metadata={"grace_s": str(self.grace_s)},
                )
            gone.append(digest)
        return gone, sum(1 for d in candidates if d in referenced)


class _AlreadyDeleted(Exception):
    """Raised in the purge's transaction (rolling it back) when another replica's deletion of
    the study committed first: `Deletions.start` returns that one."""

    def __init__(self, deletion_id: str) -> None:
        super().__init__(deletion_id)
        self.deletion_id = deletion_id


def purge_handler(deletions: Deletions, purge: Purge) -> Callable[[OutboxRow], Awaitable[None]]:
    """The outbox handler of `PURGE_TOPIC`: the service's PurgeStudy, then its step is done."""

    async def deliver(row: OutboxRow) -> None:
        p = json.loads(row.payload)
        try:
            result = await purge(p["service"], p["case_id"], [])
        except Exception as exc:
            await asyncio.to_thread(deletions.record_error, p["deletion_id"], p["service"], _error_name(exc))
            raise
        await asyncio.to_thread(deletions.record_purge, p["deletion_id"], p["service"], result)

    return deliver


def sweep_handler(deletions: Deletions, purge: Purge) -> Callable[[OutboxRow], Awaitable[None]]:
    """The outbox handler of `SWEEP_TOPIC` (see the module doc)."""

    async def deliver(row: OutboxRow) -> None:
        p = json.loads(row.payload)
        deletion_id, case_id = p["deletion_id"], p["case_id"]
        started = time.time()
        try:
            candidates = set(await asyncio.to_thread(deletions.candidates, deletion_id))
            # purge every service again, asking which candidates it still references; a late
            # row's blobs join the candidates (at most a few rounds)
            late: dict[str, int] = {}
            for _round in range(3):
                referenced: set[str] = set()
                released: set[str] = set()
                for service in PEERS:
                    result = await purge(service, case_id, sorted(candidates))
                    referenced.update(result.referenced)
                    released.update(result.released)
                    for table, n in result.deleted_rows.items():
                        late[table] = late.get(table, 0) + n
                if released <= candidates:
                    break
                candidates |= released
            _counts, ingest_released = await asyncio.to_thread(deletions.store.purge_study, case_id)
            candidates |= set(ingest_released)
            referenced.update(await asyncio.to_thread(deletions.store.referenced, sorted(candidates)))
            gone, kept = await asyncio.to_thread(deletions.unreferenced, sorted(candidates), referenced, started)
        except Exception as exc:
            await asyncio.to_thread(deletions.record_error, deletion_id, "blobs", _error_name(exc))
            raise
        deleted = 0
        for digest in gone:
            deleted += bool(await asyncio.to_thread(deletions.blobs.delete, digest))
        counts = {"deleted": deleted, "kept_shared": kept, "late_rows": sum(late.values())}
        await asyncio.to_thread(deletions.finish, deletion_id, counts)

    return deliver


def _error_name(exc: BaseException) -> str:
    reason = getattr(exc, "reason", "")
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            code = code().name
        except Exception:  # noqa: BLE001 - only for the progress report
            code = "UNKNOWN"
    return f"{code or type(exc).__name__}{': ' + reason if isinstance(reason, str) and reason else ''}"
