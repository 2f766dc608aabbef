"""Durable instance spool and series bookkeeping for the ingest service (no grpc).

An instance is durable when `store_instance` returns: its bytes are in an fdatasync'd spool
record (a redo log, see `atlasflow.ingest.spool`) and its row is committed. Only then does the
caller acknowledge it (C-STORE Success, or a gRPC receipt).

Database: `atlasflow.common.db` (SQLite file, the embedded default, or PostgreSQL), migrated by
Alembic (`atlasflow.ingest.migrations`); a database made by the hand-written schema is adopted.

Identity: atlasflow never exposes DICOM UIDs (`atlasflow.ingest.identity.atlas_id`).

Versions: a series version collects instances while RECEIVING; after the quiet period (or an
explicit commit) it is ASSEMBLED into a volume and the segmentation hand-off is queued in the
outbox in the same transaction (`atlasflow.common.outbox.SqlOutboxStore`: any replica's
dispatcher delivers it, claimed with a lease). An instance that arrives after assembly opens version + 1,
which re-assembles with every instance of the series: never a silent change to a version.

Replicas: several ingest processes may share one database (each with its own data directory:
spool, upload files). The quiet period is measured on the database's clock
(``last_instance_at`` is written and compared with it, `_db_now`), so instances of one series
received by several replicas make one quiet period. Assembly is claimed (`begin_assembly`:
``claim_holder``/``claim_expire_at``, the row read ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, in
a ``BEGIN IMMEDIATE`` transaction on SQLite) and the claim renewed while it runs
(`renew_claim`, the assembler's heartbeat): one replica assembles a version; a killed replica's
claim expires after ``claim_s`` and another takes the version over (the killed attempt stays
counted). A version that got another instance while it was assembled is not marked assembled
(`mark_assembled` checks the instance count) and is assembled again after a new quiet period.
The rows of one series are written under a per-series lock (`Database.lock`), so two replicas
receiving the same instance or opening the same version do not collide. Spooled bytes live in
the receiving replica's spool until it drains them into the shared blob store: an instance's
row is committed after its spool record is durable and before its blob exists, so an assembler
that finds an instance's blob missing (`missing_blobs`: still in another replica's spool) gives
the claim and the attempt back and waits; the version is assembled, by any replica, once that
replica drained (when idle, and when it stops). A DeleteStudy on one replica is a row of
``deletions`` every replica checks: in `_record` (new instances refused) and for each spooled
record it drains or recovers (`_drain_guard`: the record is dropped).

Duplicates: the same SOP Instance UID with the same content is stored once (reported
duplicate, counted in the version's `duplicate_count`); with different content the first is kept
and the second is recorded in `instance_conflicts` (counted in `conflict_count`); its bytes are
kept too. "Same content" compares `content_key`s (`atlasflow.ingest.identity.content_key`), not file bytes: the
C-STORE path stores pynetdicom's re-encoding (its own preamble and File Meta, possibly another
transfer syntax) of an instance the gRPC path receives as the sender's file, and both must be
recognised as the same instance.

The fast durable path (spool record, then a row committed with synchronous=NORMAL on SQLite,
one flush per instance) and the recovery from it are described in `atlasflow.ingest.spool`;
this module commits the rows (and re-creates a lost one on replay); `atlasflow.ingest.spool_drain`
drains the spool into the blob store and replays it at start-up. On PostgreSQL every commit is
durable (synchronous_commit on); the spool still holds the bytes until they are drained.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from atlasflow.common import sqlite as pages
from atlasflow.common.blobstore import BlobStore, LocalBlobStore, digest_of
from atlasflow.common.db import Database, PoolSettings, open_database
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.outbox import SqlOutboxStore, enqueue
from atlasflow.ingest.identity import atlas_id, content_key_of_bytes
from atlasflow.ingest.migrations import MIGRATIONS
from atlasflow.ingest.spool import InstanceSpool
from atlasflow.ingest.spool_drain import SpoolDrain
from atlasflow.ingest.uploads import UploadStore, volume_replica_id

log = logging.getLogger(__name__)

Row = sa.RowMapping

#: seconds an assembly claim holds without a heartbeat (`IngestStore.claim_s`)
CLAIM_S = 60.0


def one(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
    """The first row of `sql` (named ``:params``) as a mapping, or None."""
    return conn.execute(sa.text(sql), dict(params or {})).mappings().first()


def rows(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    return list(conn.execute(sa.text(sql), dict(params or {})).mappings().all())


def scalar(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    return conn.execute(sa.text(sql), dict(params or {})).scalar()


def run(conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None) -> int:
    """Execute a change; return the number of rows it touched."""
    return int(conn.execute(sa.text(sql), dict(params or {})).rowcount)


def db_now_sql(db: Database) -> str:
    """SQL for the database's clock, seconds since the epoch (double precision)."""
    if db.is_postgresql:
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    return "((julianday('now') - 2440587.5) * 86400.0)"


@dataclass(frozen=True)
class StoredInstance:
    series_id: str
    case_id: str
    version: int
    duplicate: bool
    conflict: bool
    traceparent: str  # the series' trace
    # the instance's (0020,000D) StudyInstanceUID and (0020,000E) SeriesInstanceUID, as received
    # (set by `atlasflow.ingest.reception.Reception.receive`: the SCP's audit record names them)
    study_uid: str = ""
    series_uid: str = ""


@dataclass(frozen=True)
class SeriesVersion:
    series_id: str
    version: int
    case_id: str
    state: str
    instance_count: int
    last_instance_at: float
    volume_digest: str
    volume_size: int
    geometry: dict[str, Any]
    failure_reason: str
    traceparent: str
    create_time: float
    update_time: float
    duplicate_count: int = 0
    conflict_count: int = 0
    assembly_attempts: int = 0  # assemblies started (`IngestStore.begin_assembly`)


def _row_to_series(r: Row) -> SeriesVersion:
    return SeriesVersion(
        r["series_id"],
        int(r["version"]),
        r["case_id"],
        r["state"],
        int(r["instance_count"]),
        float(r["last_instance_at"]),
        r["volume_digest"],
        int(r["volume_size"]),
        json.loads(r["geometry_json"]) if r["geometry_json"] else {},
        r["failure_reason"],
        r["traceparent"],
        float(r["create_time"]),
        float(r["update_time"]),
        int(r["duplicate_count"]),
        int(r["conflict_count"]),
        int(r["assembly_attempts"]),
    )


class IngestStore:
    """Instances (spooled, then drained into the blob store) and the series versions they make.
    Thread-safe: the database pool gives each call its own connection; ``lock`` serialises this
    process's spool writers (and the rows they commit)."""

    def __init__(
        self,
        data_dir: str | Path,
        blobs: BlobStore,
        *,
        database: str | Path | None = None,
        pool: PoolSettings | None = None,
        spool_segment_bytes: int = 128 * 1024 * 1024,
        spool_spares: int = 2,
        holder: str = "",
        claim_s: float = CLAIM_S,
    ) -> None:
        """`database`: a file path (SQLite) or a ``postgresql://`` URL; default the SQLite file
        ``<data_dir>/ingest.sqlite3``. `spool_segment_bytes` x `spool_spares` of zero-filled
        spool space is prepared at start-up (128 MiB x 2 by default: ~500 CT slices before a
        refill). `holder`: this replica's name in assembly claims (default host and data
        directory: a restarted process takes its own claims back at once); `claim_s`: how long
        a claim holds without a heartbeat."""
        self.data_dir = Path(data_dir)
        target = database or self.data_dir / "ingest.sqlite3"
        self.db: Database = open_database(target, MIGRATIONS, pool=pool)
        #: the SQLite file (flushed by `_sync_db`); None on PostgreSQL
        self.db_path: Path | None = None
        if not self.db.is_postgresql:
            self.db_path = Path(str(self.db.engine.url.database))
        self._now = db_now_sql(self.db)
        self.holder = holder or f"{socket.gethostname()[:64]}:{self.data_dir.resolve()}"
        self.claim_s = claim_s
        self.lock = threading.RLock()
        self.blobs = blobs
        self.spool = InstanceSpool(self.data_dir / "spool", spool_segment_bytes, spool_spares)
        #: spool -> blob store (`drain`, `drain_if_idle`); replays what a previous process left
        self.spool_drain = SpoolDrain(
            self.spool,
            blobs,
            self.lock,
            lambda header, data: self._record(header, data, recovering=True),
            self._sync_db,
            self._drain_guard,
        )
        #: resumable gRPC uploads (same database)
        self.uploads = UploadStore(
            self.db, self.data_dir / "uploads", replica=volume_replica_id(self.data_dir, self.holder)
        )
        #: the outbox table, as the dispatchers of every replica claim and deliver it
        self.outbox = SqlOutboxStore(self.db)
        #: deleted studies whose new instances are refused: case id -> (deletion id, time of
        #: the deletion), kept by `atlasflow.ingest.deletion` (loaded at its start), refused
        #: for `refuse_deleted_s` seconds after the deletion
        self.tombstones: dict[str, tuple[str, float]] = {}
        self.refuse_deleted_s = 30 * 86400.0
        self.spool_drain.recover()

    def close(self) -> None:
        with self.lock:
            self.spool.seal()
            self.db.close()

    @contextlib.contextmanager
    def _write(self, *, relaxed: bool = False) -> Iterator[sa.Connection]:
        """A write transaction; `relaxed` on SQLite: committed with synchronous=NORMAL (in the
        WAL, flushed later by `_sync_db`) - only for rows a spool record can re-create."""
        if not relaxed or self.db.is_postgresql:
            with self.db.transaction() as conn:
                yield conn
            return
        with self.db.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA synchronous = NORMAL")  # outside a transaction (SQLite refuses inside)
            try:
                with conn.begin():
                    yield conn
            finally:
                raw.execute("PRAGMA synchronous = FULL")

    # ----------------------------------------------------------------------------- reception

    def store_instance(
        self,
        data: bytes,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        new_traceparent: str = "",
        key: str | Callable[[], str] = "",
    ) -> StoredInstance:
        """Persist one validated instance; returns once it is durable (spool record
        fdatasync'd and row committed). A re-send with the same content writes nothing but a
        counter.

        `new_traceparent` is used as the series' trace if this instance opens a new version.
        `key`: the instance's `content_key` (what "same content" compares), or a function that
        returns it (called only when the SOP Instance UID is already stored with other bytes:
        a content key costs ~1.3 ms per CT slice, a first reception never needs one); default:
        computed from `data` when needed (`content_key_of_bytes`).
        """
        digest = digest_of(data)
        header = {
            "study_uid": study_uid,
            "series_uid": series_uid,
            "sop_uid": sop_uid,
            "digest": digest,
            "content_key": key if isinstance(key, str) else "",
            "traceparent": new_traceparent,
            "received_at": time.time(),
        }
        with self.lock:
            return self._record(header, data, recovering=False, key_fn=key if callable(key) else None)

    def store_instance_file(
        self,
        path: Path,
        sha256: str,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        new_traceparent: str = "",
        key: str | Callable[[], str] = "",
    ) -> StoredInstance:
        """`store_instance` for a large validated instance in a file whose SHA-256 (hex) is
        `sha256`, without reading it into memory: the file is fsync'd and becomes the blob
        (`adopt_blob`: renamed into a `LocalBlobStore` on the same file system, else copied
        from the file), then the row is committed with synchronous=FULL (no spool record: the
        blob is the durable copy). Durable when it returns; the file is gone. A crash between
        the two leaves an unreferenced blob (content-addressed, harmless) and no row: the
        instance was not acknowledged."""
        digest = "sha256:" + sha256
        size = path.stat().st_size
        self.adopt_blob(path, digest)
        header = {
            "study_uid": study_uid,
            "series_uid": series_uid,
            "sop_uid": sop_uid,
            "digest": digest,
            "content_key": key if isinstance(key, str) else "",
            "traceparent": new_traceparent,
            "received_at": time.time(),
        }
        with self.lock:
            return self._record(header, None, recovering=False, key_fn=key if callable(key) else None, size=size)

    def adopt_blob(self, path: Path, digest: str) -> None:
        """Make the file `path` (whose digest is `digest`) the durable blob `digest`; the file
        is gone when it returns. Rename when the blob store is a `LocalBlobStore` on the same
        file system (no copy), else a streamed copy (local) or `BlobStore.put_file` (an object
        store: multipart upload from the file, never all of it in memory)."""
        if not isinstance(self.blobs, LocalBlobStore):
            self.blobs.put_file(path, digest)
            path.unlink()
            return
        dest = self.blobs.path(digest)
        if dest.exists():
            path.unlink()
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(path, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = dest.parent / f".tmp-{os.urandom(8).hex()}"
            try:
                with open(path, "rb") as src, open(tmp, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            path.unlink()
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _sync_db(self) -> None:
        """Under self.lock: make every committed transaction durable (rows committed with
        synchronous=NORMAL by `_record` are in the WAL or the database file, not yet flushed).
        Nothing to do on PostgreSQL: its commits are durable."""
        if self.db_path is None:
            return
        for path in (self.db_path, Path(f"{self.db_path}-wal")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _stored_content_key(self, digest: str) -> str:
        """`content_key` of stored bytes (blob store, or spool when not drained yet); the
        digest itself when they cannot be read or parsed (then only equal bytes match)."""
        data = self.spool.read_pending(digest)
        if data is None:
            try:
                data = self.blobs.get(digest)
            except Exception:  # noqa: BLE001 - missing or corrupt: compared by bytes
                return digest
        return content_key_of_bytes(data) or digest

    def _record(
        self,
        header: dict[str, Any],
        data: bytes | None,
        *,
        recovering: bool,
        key_fn: Callable[[], str] | None = None,
        size: int = 0,
    ) -> StoredInstance:
        """Under self.lock, in one transaction holding the series' lock: check for a duplicate,
        spool the bytes (unless `recovering`: replay of a spooled record, already durable; or
        `data` is None: the bytes, `size` of them, are already a durable blob,
        `store_instance_file`), commit the row.

        Content keys are computed only here, and only when the SOP Instance UID is already
        stored with other bytes (same bytes: a duplicate without one). A row's content_key
        '' means "not computed".
        """
        series_id = atlas_id("ser", header["series_uid"])
        case_id = atlas_id("case", header["study_uid"])
        if not recovering:
            self.check_not_deleted(case_id)
        sop_key = hashlib.sha256(header["sop_uid"].encode()).hexdigest()
        digest, now = header["digest"], float(header["received_at"])
        key = header.get("content_key") or ""
        spooled = not recovering and data is not None
        # The fdatasync'd spool record is the instance's redo log: recovery re-creates a row
        # that a crash lost. So on SQLite the row's commit need not flush the WAL itself (one
        # flush per instance instead of two, ~0.5-3 ms each here); it is visible (committed)
        # before the acknowledgement, and made durable (`_sync_db`) before its spool record may go.
        with self._write(relaxed=spooled) as conn:
            # the study, then the series (purge_study takes them in the same order): a deletion
            # on another replica is either seen here or deletes this row after it committed
            self.db.lock(conn, f"ingest-case:{case_id}")
            deleted = self._deletion_of(conn, case_id)
            if deleted is not None:
                if not recovering:
                    raise _study_deleted(case_id, deleted[0])
                if deleted[1] >= now:  # deleted after this spooled instance came: not re-created
                    return StoredInstance(series_id, case_id, 0, True, False, "")
            self.db.lock(conn, f"ingest-series:{series_id}")
            cur = one(
                conn,
                "SELECT * FROM series_versions WHERE series_id = :s ORDER BY version DESC LIMIT 1",
                {"s": series_id},
            )
            existing = one(
                conn,
                "SELECT digest, content_key FROM instances WHERE series_id = :s AND sop_key = :k",
                {"s": series_id, "k": sop_key},
            )
            same = False
            if existing is not None:
                same = existing["digest"] == digest
                if not same:
                    if not key:
                        key = (
                            (key_fn() if key_fn is not None else "")
                            or (content_key_of_bytes(data) if data is not None else "")
                            or digest
                        )
                    stored_key = existing["content_key"]
                    if not stored_key:
                        stored_key = self._stored_content_key(existing["digest"])
                        if stored_key != existing["digest"]:  # cache it (not an acknowledgement)
                            run(
                                conn,
                                "UPDATE instances SET content_key = :ck WHERE series_id = :s AND sop_key = :k",
                                {"ck": stored_key, "s": series_id, "k": sop_key},
                            )
                    same = stored_key == key
                    header["content_key"] = key
            if same:
                assert cur is not None
                if not recovering:
                    run(
                        conn,
                        "UPDATE series_versions SET duplicate_count = duplicate_count + 1"
                        " WHERE series_id = :s AND version = :v",
                        {"s": series_id, "v": cur["version"]},
                    )
                return StoredInstance(series_id, case_id, int(cur["version"]), True, False, cur["traceparent"])
            if existing is not None and recovering:
                assert cur is not None
                if one(
                    conn,
                    "SELECT 1 FROM instance_conflicts WHERE series_id = :s AND sop_key = :k AND digest = :d",
                    {"s": series_id, "k": sop_key, "d": digest},
                ):
                    return StoredInstance(series_id, case_id, int(cur["version"]), False, True, cur["traceparent"])
            if spooled:
                assert data is not None
                self.spool.append(header, data)
            length = size if data is None else len(data)
            return self._commit_row(conn, series_id, case_id, sop_key, digest, key, length, now, header, cur, existing)

    def _commit_row(
        self,
        conn: sa.Connection,
        series_id: str,
        case_id: str,
        sop_key: str,
        digest: str,
        key: str,
        size: int,
        now: float,
        header: dict[str, Any],
        cur: Row | None,
        existing: Row | None,
    ) -> StoredInstance:
        """The row (or conflict row) of an instance, in the caller's transaction."""
        if existing is not None:
            assert cur is not None
            run(
                conn,
                "INSERT INTO instance_conflicts(series_id, sop_key, digest, size_bytes, received_at, content_key)"
                " VALUES (:s, :k, :d, :n, :t, :ck)",
                {"s": series_id, "k": sop_key, "d": digest, "n": size, "t": now, "ck": key},
            )
            run(
                conn,
                "UPDATE series_versions SET conflict_count = conflict_count + 1 WHERE series_id = :s AND version = :v",
                {"s": series_id, "v": cur["version"]},
            )
            return StoredInstance(series_id, case_id, int(cur["version"]), False, True, cur["traceparent"])
        new_tp = header.get("traceparent", "")
        if cur is None or cur["state"] != "RECEIVING":
            version = 1 if cur is None else int(cur["version"]) + 1
            prior = 0 if cur is None else int(cur["instance_count"])
            traceparent = new_tp if cur is None else (cur["traceparent"] or new_tp)
            run(
                conn,
                "INSERT INTO series_versions(series_id, version, case_id, state, instance_count,"
                " last_instance_at, traceparent, create_time, update_time)"
                " VALUES (:s, :v, :c, 'RECEIVING', :n, :t, :tp, :t, :t)",
                {"s": series_id, "v": version, "c": case_id, "n": prior, "t": now, "tp": traceparent},
            )
        else:
            version, traceparent = int(cur["version"]), cur["traceparent"]
        run(
            conn,
            "INSERT INTO instances(series_id, sop_key, version_added, digest, size_bytes, received_at, content_key)"
            " VALUES (:s, :k, :v, :d, :n, :t, :ck)",
            {"s": series_id, "k": sop_key, "v": version, "d": digest, "n": size, "t": now, "ck": key},
        )
        # the quiet period runs on the database's clock (one clock for every replica)
        run(
            conn,
            f"UPDATE series_versions SET instance_count = instance_count + 1, last_instance_at = {self._now},"
            " update_time = :t WHERE series_id = :s AND version = :v",
            {"t": time.time(), "s": series_id, "v": version},
        )
        return StoredInstance(series_id, case_id, version, False, False, traceparent)

    def series_traceparent(self, series_uid: str) -> str:
        with self.db.read() as conn:
            r = one(
                conn,
                "SELECT traceparent FROM series_versions WHERE series_id = :s ORDER BY version DESC LIMIT 1",
                {"s": atlas_id("ser", series_uid)},
            )
        return r["traceparent"] if r else ""

    # ----------------------------------------------------------------------------- assembly

    def due_for_assembly(self, quiet_period_s: float) -> list[SeriesVersion]:
        """RECEIVING versions whose last instance came `quiet_period_s` ago or more (on the
        database's clock) and that no live claim of another replica holds."""
        with self.db.read() as conn:
            found = rows(
                conn,
                "SELECT * FROM series_versions WHERE state = 'RECEIVING'"
                f" AND last_instance_at <= {self._now} - :q"
                f" AND (claim_holder = '' OR claim_holder = :me OR claim_expire_at < {self._now})"
                " ORDER BY last_instance_at",
                {"q": quiet_period_s, "me": self.holder},
            )
        return [_row_to_series(r) for r in found]

    def instance_digests(self, series_id: str, version: int) -> list[str]:
        """Digests of the version's instances (drains this process's spool first: its own
        instances are then readable from the blob store; see `missing_blobs` for the others)."""
        self.spool_drain.drain()
        with self.db.read() as conn:
            found = rows(
                conn,
                "SELECT digest FROM instances WHERE series_id = :s AND version_added <= :v ORDER BY sop_key",
                {"s": series_id, "v": version},
            )
        return [r["digest"] for r in found]

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """Those of `digests` the blob store does not hold yet (still in another replica's spool)."""
        return [d for d in digests if not self.blobs.exists(d)]

    def begin_assembly(self, series_id: str, version: int, max_attempts: int) -> int | None:
        """Claim a RECEIVING version for this replica and count one more assembly, durably
        before it starts; return the attempt's number. None when another replica holds a live
        claim on it (or is claiming it right now: ``SKIP LOCKED``), or when the version is no
        longer RECEIVING. A process killed while assembling leaves the count raised: once
        `max_attempts` were started and none finished, the version ends FAILED
        ``ASSEMBLY_ABANDONED_AFTER_<n>_ATTEMPTS`` and None is returned (not assembled again: a
        poison series does not crash-loop the service)."""
        now = time.time()
        with self.db.transaction() as conn:
            r = one(
                conn,
                "SELECT assembly_attempts, claim_holder,"
                f" CASE WHEN claim_expire_at < {self._now} THEN 1 ELSE 0 END AS expired"
                " FROM series_versions WHERE series_id = :s AND version = :v AND state = 'RECEIVING'"
                + self.db.for_update(skip_locked=True),
                {"s": series_id, "v": version},
            )
            if r is None:
                return None
            if r["claim_holder"] not in ("", self.holder) and not r["expired"]:
                return None  # another replica assembles it
            attempts = int(r["assembly_attempts"])
            key = {"s": series_id, "v": version}
            if attempts >= max_attempts:
                run(
                    conn,
                    "UPDATE series_versions SET state = 'FAILED', failure_reason = :r, update_time = :t,"
                    " claim_holder = '' WHERE series_id = :s AND version = :v",
                    {**key, "r": abandoned_reason(attempts), "t": now},
                )
                return None
            run(
                conn,
                f"UPDATE series_versions SET assembly_attempts = :a, claim_holder = :me,"
                f" claim_expire_at = {self._now} + :lease WHERE series_id = :s AND version = :v",
                {**key, "a": attempts + 1, "me": self.holder, "lease": self.claim_s},
            )
        return attempts + 1

    def renew_claim(self, series_id: str, version: int) -> bool:
        """The assembler's heartbeat: extend this replica's claim by `claim_s`. False when the
        claim is no longer ours (expired and taken over, or the version left RECEIVING)."""
        with self.db.transaction() as conn:
            return (
                run(
                    conn,
                    f"UPDATE series_versions SET claim_expire_at = {self._now} + :lease"
                    " WHERE series_id = :s AND version = :v AND state = 'RECEIVING' AND claim_holder = :me",
                    {"s": series_id, "v": version, "me": self.holder, "lease": self.claim_s},
                )
                == 1
            )

    def end_assembly_attempt(self, series_id: str, version: int) -> None:
        """Take back the attempt counted by `begin_assembly` of an assembly that did not kill
        the process but stopped on the service's own storage or found the version changed
        (the series is not at fault), and give the claim back."""
        with self.db.transaction() as conn:
            run(
                conn,
                "UPDATE series_versions SET assembly_attempts ="
                " CASE WHEN assembly_attempts > 0 THEN assembly_attempts - 1 ELSE 0 END,"
                " claim_holder = '', claim_expire_at = 0"
                " WHERE series_id = :s AND version = :v AND state = 'RECEIVING' AND claim_holder = :me",
                {"s": series_id, "v": version, "me": self.holder},
            )

    def mark_assembled(
        self,
        series_id: str,
        version: int,
        volume_digest: str,
        volume_size: int,
        geometry: dict[str, Any],
        handoff_topic: str,
        handoff_payload: bytes,
        traceparent: str,
        *,
        instance_count: int | None = None,
    ) -> bool:
        """Record the volume AND queue the segmentation hand-off, atomically. With
        `instance_count` (the instances the volume was built from): only if the version still
        has that many (else an instance came during the assembly: False, nothing written, the
        version stays RECEIVING and is assembled again after a new quiet period)."""
        now = time.time()
        with self.db.transaction() as conn:
            changed = run(
                conn,
                "UPDATE series_versions SET state = 'ASSEMBLED', volume_digest = :d, volume_size = :n,"
                " geometry_json = :g, update_time = :t, claim_holder = ''"
                " WHERE series_id = :s AND version = :v AND state = 'RECEIVING'"
                + ("" if instance_count is None else " AND instance_count = :count"),
                {
                    "d": volume_digest,
                    "n": volume_size,
                    "g": json.dumps(geometry),
                    "t": now,
                    "s": series_id,
                    "v": version,
                    "count": instance_count,
                },
            )
            if changed:
                enqueue(conn, handoff_topic, f"{series_id}:{version}", handoff_payload, traceparent)
        return bool(changed)

    def mark_failed(self, series_id: str, version: int, reason: str) -> None:
        with self.db.transaction() as conn:
            run(
                conn,
                "UPDATE series_versions SET state = 'FAILED', failure_reason = :r, update_time = :t,"
                " claim_holder = '' WHERE series_id = :s AND version = :v",
                {"r": reason, "t": time.time(), "s": series_id, "v": version},
            )

    def mark_dispatched(self, series_id: str, version: int) -> None:
        with self.db.transaction() as conn:
            run(
                conn,
                "UPDATE series_versions SET state = 'DISPATCHED', update_time = :t"
                " WHERE series_id = :s AND version = :v AND state = 'ASSEMBLED'",
                {"t": time.time(), "s": series_id, "v": version},
            )

    # ----------------------------------------------------------------------------- reads

    def get_series(self, series_id: str) -> SeriesVersion:
        with self.db.read() as conn:
            r = one(
                conn,
                "SELECT * FROM series_versions WHERE series_id = :s ORDER BY version DESC LIMIT 1",
                {"s": series_id},
            )
        if r is None:
            raise NotFound(
                "SERIES_NOT_FOUND", "series not found", domain="atlasflow.ingest", metadata={"series_id": series_id}
            )
        return _row_to_series(r)

    def get_series_version(self, series_id: str, version: int) -> SeriesVersion:
        """One version of a series (version >= 1). NotFound("SERIES_NOT_FOUND") for an unknown
        series, NotFound("SERIES_VERSION_NOT_FOUND") when the series has no such version."""
        with self.db.read() as conn:
            r = one(
                conn,
                "SELECT * FROM series_versions WHERE series_id = :s AND version = :v",
                {"s": series_id, "v": version},
            )
        if r is not None:
            return _row_to_series(r)
        self.get_series(series_id)  # SERIES_NOT_FOUND when the series is unknown
        raise NotFound(
            "SERIES_VERSION_NOT_FOUND",
            "series has no such version",
            domain="atlasflow.ingest",
            metadata={"series_id": series_id[:80], "version": str(version)},
        )

    def series_by_volume(self, volume_digest: str) -> SeriesVersion:
        """The series version that assembled the volume blob `volume_digest` (the most recently
        updated one when several assembled identical volumes); index `series_by_volume`.
        NotFound("VOLUME_NOT_FOUND") when none did."""
        r = None
        if volume_digest:
            with self.db.read() as conn:
                r = one(
                    conn,
                    "SELECT * FROM series_versions WHERE volume_digest = :d"
                    " ORDER BY update_time DESC, series_id LIMIT 1",
                    {"d": volume_digest},
                )
        if r is None:
            raise NotFound(
                "VOLUME_NOT_FOUND",
                "no series assembled this volume",
                domain="atlasflow.ingest",
                metadata={"volume_digest": volume_digest[:80]},
            )
        return _row_to_series(r)

    def list_series(self, page_size: int, page_token: str) -> tuple[list[SeriesVersion], str]:
        size = pages.clamp_page_size(page_size, domain="atlasflow.ingest")
        cursor = pages.decode_page_token(page_token, "series", domain="atlasflow.ingest")
        offset = int(cursor["offset"]) if cursor else 0
        with self.db.read() as conn:
            found = rows(
                conn,
                "SELECT s.* FROM series_versions s JOIN (SELECT series_id, MAX(version) AS v"
                " FROM series_versions GROUP BY series_id) m ON s.series_id = m.series_id"
                " AND s.version = m.v ORDER BY s.create_time DESC, s.series_id"
                " LIMIT :n OFFSET :o",
                {"n": size + 1, "o": offset},
            )
        items = [_row_to_series(r) for r in found[:size]]
        token = pages.encode_page_token("series", {"offset": offset + size}) if len(found) > size else ""
        return items, token

    def conflict_count(self, series_id: str | None = None) -> int:
        with self.db.read() as conn:
            if series_id is not None:
                return int(
                    scalar(conn, "SELECT COUNT(*) FROM instance_conflicts WHERE series_id = :s", {"s": series_id})
                )
            return int(scalar(conn, "SELECT COUNT(*) FROM instance_conflicts"))

    def receiving_count(self) -> int:
        with self.db.read() as conn:
            return int(scalar(conn, "SELECT COUNT(*) FROM series_versions WHERE state IN ('RECEIVING', 'ASSEMBLED')"))

    # ----------------------------------------------------------------------------- deletion

    def check_not_deleted(self, case_id: str) -> None:
        """FailedPrecondition STUDY_DELETED when `case_id`'s study was deleted less than
        `refuse_deleted_s` ago (a tombstone; `atlasflow.ingest.deletion`). This process's
        tombstones only (set before its purge starts); `_record` also looks in the database
        for another replica's deletion."""
        tomb = self.tombstones.get(case_id)
        if tomb is not None and time.time() - tomb[1] < self.refuse_deleted_s:
            raise _study_deleted(case_id, tomb[0])

    def _deletion_of(self, conn: sa.Connection, case_id: str) -> tuple[str, float] | None:
        """(deletion id, time) of the study's latest deletion younger than `refuse_deleted_s`
        (any replica's; index deletions_by_case), or None."""
        r = one(
            conn,
            "SELECT deletion_id, create_time FROM deletions WHERE case_id = :c AND create_time >= :t"
            " ORDER BY create_time DESC LIMIT 1",
            {"c": case_id, "t": time.time() - self.refuse_deleted_s},
        )
        return None if r is None else (r["deletion_id"], float(r["create_time"]))

    @contextlib.contextmanager
    def _drain_guard(self, header: dict[str, Any]) -> Iterator[bool]:
        """Around the move of one spooled record into the blob store (`SpoolDrain`): holds the
        study's lock (the one `purge_study` and `_record` take) and yields False when the study
        was deleted, by any replica, while its tombstone lasts (the record is then dropped: a
        DeleteStudy is never undone by a later drain or recovery). A tombstone refuses every
        instance from its deletion on, so a spooled record of a study with a live tombstone
        was received before the deletion, whatever the replicas' clocks say.

        SQLite: a read, no write lock (a BEGIN IMMEDIATE per record drained 124 instead of 561
        records/s in one run of benchmarks/bench_spool_drain.py on a loaded machine). SQLite is
        one process in production, where drains and `purge_study` (which drains first) are
        serialised by the drain's own lock."""
        case_id = atlas_id("case", header["study_uid"])
        if not self.db.is_postgresql:
            with self.db.read() as conn:
                yield self._deletion_of(conn, case_id) is None
            return
        with self.db.transaction() as conn:
            self.db.lock(conn, f"ingest-case:{case_id}")
            yield self._deletion_of(conn, case_id) is None

    def _receipt_series_sql(self) -> str:
        """SQL of an upload receipt's series id (``receipt_json`` is JSON text)."""
        if self.db.is_postgresql:
            return "(CAST(receipt_json AS jsonb) ->> 'series_id')"
        return "json_extract(receipt_json, '$.series_id')"

    def purge_study(
        self, case_id: str, in_transaction: Callable[[sa.Connection, dict[str, int], list[str]], None] | None = None
    ) -> tuple[dict[str, int], list[str]]:
        """Delete every row of `case_id`'s study: instances, conflicts, series versions, their
        segmentation hand-offs still in the outbox and the completed uploads that filed an
        instance in them. Returns (rows deleted per table, digests of the blobs the deleted rows
        referenced: instances, conflicts, volumes). The blobs themselves stay (the deletion's
        sweep removes those no service references). Incomplete uploads are not tied to a study
        yet: they expire (`upload_ttl_s`), and their instance is refused on completion while the
        study's tombstone lasts.

        The spool is drained first (no spooled record of the study is left to replay); callers
        set the tombstone before, so that no new instance of the study is recorded meanwhile.
        `in_transaction(conn, counts, digests)` runs inside the deleting transaction (the
        deletion records its operation and hand-offs there). Idempotent."""
        self.spool_drain.drain()
        with self.db.transaction() as conn:
            self.db.lock(conn, f"ingest-case:{case_id}")
            versions = rows(
                conn, "SELECT series_id, version, volume_digest FROM series_versions WHERE case_id = :c", {"c": case_id}
            )
            series = sorted({r["series_id"] for r in versions})
            digests = {r["volume_digest"] for r in versions if r["volume_digest"]}
            counts = {"instances": 0, "instance_conflicts": 0, "outbox": 0, "uploads": 0}
            for sid in series:
                self.db.lock(conn, f"ingest-series:{sid}")
                for table in ("instances", "instance_conflicts"):
                    digests.update(
                        r["digest"] for r in rows(conn, f"SELECT digest FROM {table} WHERE series_id = :s", {"s": sid})
                    )
                    counts[table] += run(conn, f"DELETE FROM {table} WHERE series_id = :s", {"s": sid})
                counts["uploads"] += run(
                    conn, f"DELETE FROM uploads WHERE complete = 1 AND {self._receipt_series_sql()} = :s", {"s": sid}
                )
            for r in versions:
                counts["outbox"] += run(
                    conn, "DELETE FROM outbox WHERE dedupe_key = :k", {"k": f"{r['series_id']}:{r['version']}"}
                )
            counts["series_versions"] = run(conn, "DELETE FROM series_versions WHERE case_id = :c", {"c": case_id})
            released = sorted(d for d in digests if d)
            if in_transaction is not None:
                in_transaction(conn, counts, released)
        return counts, released

    def referenced(self, digests: list[str]) -> list[str]:
        """Those of `digests` that a row of ingest references (an instance, a conflict, a volume)."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        query = sa.text(
            "SELECT digest FROM instances WHERE digest IN :d"
            " UNION SELECT digest FROM instance_conflicts WHERE digest IN :d"
            " UNION SELECT volume_digest FROM series_versions WHERE volume_digest IN :d"
        ).bindparams(sa.bindparam("d", expanding=True))
        with self.db.read() as conn:
            for i in range(0, len(wanted), 300):
                found.update(r[0] for r in conn.execute(query, {"d": wanted[i : i + 300]}))
        return sorted(found)


def _study_deleted(case_id: str, deletion_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        "STUDY_DELETED",
        "this study was deleted; its instances are refused",
        domain="atlasflow.ingest",
        metadata={"case_id": case_id, "deletion_id": deletion_id},
    )


def abandoned_reason(attempts: int) -> str:
    """failure_reason of a version whose assembly was started `attempts` times without finishing."""
    return f"ASSEMBLY_ABANDONED_AFTER_{attempts}_ATTEMPTS"


def resolve_series_version(store: IngestStore, series_id: str, version: int, volume_digest: str) -> SeriesVersion:
    """The series version named by (series_id, version; 0 = latest) or by the digest of the
    volume it assembled. NotFound SERIES_NOT_FOUND / SERIES_VERSION_NOT_FOUND /
    VOLUME_NOT_FOUND; InvalidArgument unless exactly one selector is given."""
    if bool(series_id) == bool(volume_digest):
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "exactly one of series_id and volume_digest is required",
            domain="atlasflow.ingest",
            metadata={"field": "series_id" if not series_id else "volume_digest"},
        )
    if version < 0 or (volume_digest and version):
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "series_version must be >= 0, and 0 with volume_digest",
            domain="atlasflow.ingest",
            metadata={"field": "series_version"},
        )
    if volume_digest:
        return store.series_by_volume(volume_digest)  # NotFound VOLUME_NOT_FOUND
    if version == 0:
        return store.get_series(series_id)  # NotFound SERIES_NOT_FOUND
    return store.get_series_version(series_id, version)
