"""Durable instance spool and series bookkeeping for the ingest service (no grpc).

An instance is durable when `store_instance` returns: its bytes are in an fdatasync'd spool
record (a redo log, see `atlasflow.ingest.spool`) and its row is committed (SQLite WAL). Only then does the
caller acknowledge it (C-STORE Success, or a gRPC receipt).

Identity: atlasflow never exposes DICOM UIDs (`atlasflow.ingest.identity.atlas_id`).

Versions: a series version collects instances while RECEIVING; after the quiet period (or an
explicit commit) it is ASSEMBLED into a volume and the segmentation hand-off is queued in the
outbox in the same transaction. An instance that arrives after assembly opens version + 1,
which re-assembles with every instance of the series: never a silent change to a version.

Duplicates: the same SOP Instance UID with the same content is stored once (reported
duplicate, counted in the version's `duplicate_count`); with different content the first is kept
and the second is recorded in `instance_conflicts` (counted in `conflict_count`); its bytes are
kept too. "Same content" compares `content_key`s (`atlasflow.ingest.identity.content_key`), not file bytes: the
C-STORE path stores pynetdicom's re-encoding (its own preamble and File Meta, possibly another
transfer syntax) of an instance the gRPC path receives as the sender's file, and both must be
recognised as the same instance.

The fast durable path (spool record, then a row committed with synchronous=NORMAL, one flush
per instance) and the recovery from it are described in `atlasflow.ingest.spool`; this module
commits the rows (and re-creates a lost one on replay); `atlasflow.ingest.spool_drain` drains the
spool into the blob store and replays it at start-up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as db
from atlasflow.common.blobstore import BlobStore, LocalBlobStore, digest_of
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.outbox import enqueue
from atlasflow.ingest.identity import atlas_id, content_key_of_bytes
from atlasflow.ingest.schema import MIGRATIONS
from atlasflow.ingest.spool import InstanceSpool
from atlasflow.ingest.spool_drain import SpoolDrain
from atlasflow.ingest.uploads import UploadStore

log = logging.getLogger(__name__)


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


def _row_to_series(r: sqlite3.Row) -> SeriesVersion:
    return SeriesVersion(
        r["series_id"],
        r["version"],
        r["case_id"],
        r["state"],
        r["instance_count"],
        r["last_instance_at"],
        r["volume_digest"],
        r["volume_size"],
        json.loads(r["geometry_json"]) if r["geometry_json"] else {},
        r["failure_reason"],
        r["traceparent"],
        r["create_time"],
        r["update_time"],
        r["duplicate_count"],
        r["conflict_count"],
        r["assembly_attempts"],
    )


class IngestStore:
    """Instances (spooled, then drained into the blob store) and the series versions they make.
    Thread-safe (one lock around the connection)."""

    def __init__(
        self,
        data_dir: str | Path,
        blobs: BlobStore,
        *,
        spool_segment_bytes: int = 128 * 1024 * 1024,
        spool_spares: int = 2,
    ) -> None:
        """`spool_segment_bytes` x `spool_spares` of zero-filled spool space is prepared at
        start-up (128 MiB x 2 by default: ~500 CT slices before a refill)."""
        self.db_path = Path(data_dir) / "ingest.sqlite3"
        self.conn = db.connect(self.db_path)
        db.migrate(self.conn, MIGRATIONS)
        self.lock = threading.RLock()
        self.blobs = blobs
        self.spool = InstanceSpool(Path(data_dir) / "spool", spool_segment_bytes, spool_spares)
        #: spool -> blob store (`drain`, `drain_if_idle`); replays what a previous process left
        self.spool_drain = SpoolDrain(
            self.spool,
            blobs,
            self.lock,
            lambda header, data: self._record(header, data, recovering=True),
            self._sync_db,
        )
        #: resumable gRPC uploads (same database and lock)
        self.uploads = UploadStore(self.conn, self.lock, Path(data_dir) / "uploads")
        #: deleted studies whose new instances are refused: case id -> (deletion id, time of
        #: the deletion), kept by `atlasflow.ingest.deletion` (loaded at its start), refused
        #: for `refuse_deleted_s` seconds after the deletion
        self.tombstones: dict[str, tuple[str, float]] = {}
        self.refuse_deleted_s = 30 * 86400.0
        self.spool_drain.recover()

    def close(self) -> None:
        with self.lock:
            self.spool.seal()
            self.conn.close()

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
        synchronous=NORMAL by `_record` are in the WAL or the database file, not yet flushed)."""
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
        """Under self.lock: check for a duplicate, spool the bytes (unless `recovering`:
        replay of a spooled record, already durable; or `data` is None: the bytes, `size` of
        them, are already a durable blob, `store_instance_file`), commit the row.

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
        cur = self.conn.execute(
            "SELECT * FROM series_versions WHERE series_id = ? ORDER BY version DESC LIMIT 1", (series_id,)
        ).fetchone()
        existing = self.conn.execute(
            "SELECT digest, content_key FROM instances WHERE series_id = ? AND sop_key = ?", (series_id, sop_key)
        ).fetchone()
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
                    if stored_key != existing["digest"]:
                        with db.transaction(self.conn):  # cache it (not an acknowledgement)
                            self.conn.execute(
                                "UPDATE instances SET content_key = ? WHERE series_id = ? AND sop_key = ?",
                                (stored_key, series_id, sop_key),
                            )
                same = stored_key == key
                header["content_key"] = key
        if same:
            assert cur is not None
            if not recovering:
                with db.transaction(self.conn):
                    self.conn.execute(
                        "UPDATE series_versions SET duplicate_count = duplicate_count + 1"
                        " WHERE series_id = ? AND version = ?",
                        (series_id, cur["version"]),
                    )
            return StoredInstance(series_id, case_id, cur["version"], True, False, cur["traceparent"])
        if (
            existing is not None
            and recovering
            and self.conn.execute(
                "SELECT 1 FROM instance_conflicts WHERE series_id = ? AND sop_key = ? AND digest = ?",
                (series_id, sop_key, digest),
            ).fetchone()
        ):
            return StoredInstance(series_id, case_id, cur["version"], False, True, cur["traceparent"])
        if recovering:
            assert data is not None
            return self._commit_row(series_id, case_id, sop_key, digest, key, len(data), now, header, cur, existing)
        if data is None:  # already a durable blob: the row commits with synchronous=FULL
            return self._commit_row(series_id, case_id, sop_key, digest, key, size, now, header, cur, existing)
        self.spool.append(header, data)
        # The fdatasync'd spool record is the instance's redo log: recovery re-creates a row
        # that a crash lost. So the row's commit need not flush the WAL itself (one flush per
        # instance instead of two, ~0.5-3 ms each here); it is visible (committed) before the
        # acknowledgement, and made durable (`_sync_db`) before its spool record may go.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        try:
            return self._commit_row(series_id, case_id, sop_key, digest, key, len(data), now, header, cur, existing)
        finally:
            self.conn.execute("PRAGMA synchronous = FULL")

    def _commit_row(
        self,
        series_id: str,
        case_id: str,
        sop_key: str,
        digest: str,
        key: str,
        size: int,
        now: float,
        header: dict[str, Any],
        cur: sqlite3.Row | None,
        existing: sqlite3.Row | None,
    ) -> StoredInstance:
        """The row (or conflict row) of a spooled instance, in one transaction."""
        with db.transaction(self.conn):
            if existing is not None:
                assert cur is not None
                self.conn.execute(
                    "INSERT INTO instance_conflicts(series_id, sop_key, digest, size_bytes,"
                    " received_at, content_key) VALUES (?, ?, ?, ?, ?, ?)",
                    (series_id, sop_key, digest, size, now, key),
                )
                self.conn.execute(
                    "UPDATE series_versions SET conflict_count = conflict_count + 1"
                    " WHERE series_id = ? AND version = ?",
                    (series_id, cur["version"]),
                )
                return StoredInstance(series_id, case_id, cur["version"], False, True, cur["traceparent"])
            new_tp = header.get("traceparent", "")
            if cur is None or cur["state"] != "RECEIVING":
                version = 1 if cur is None else cur["version"] + 1
                prior = 0 if cur is None else cur["instance_count"]
                traceparent = new_tp if cur is None else (cur["traceparent"] or new_tp)
                self.conn.execute(
                    "INSERT INTO series_versions(series_id, version, case_id, state,"
                    " instance_count, last_instance_at, traceparent, create_time, update_time)"
                    " VALUES (?, ?, ?, 'RECEIVING', ?, ?, ?, ?, ?)",
                    (series_id, version, case_id, prior, now, traceparent, now, now),
                )
            else:
                version, traceparent = cur["version"], cur["traceparent"]
            self.conn.execute(
                "INSERT INTO instances(series_id, sop_key, version_added, digest, size_bytes,"
                " received_at, content_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (series_id, sop_key, version, digest, size, now, key),
            )
            self.conn.execute(
                "UPDATE series_versions SET instance_count = instance_count + 1,"
                " last_instance_at = ?, update_time = ? WHERE series_id = ? AND version = ?",
                (max(now, time.time()), time.time(), series_id, version),
            )
        return StoredInstance(series_id, case_id, version, False, False, traceparent)

    def series_traceparent(self, series_uid: str) -> str:
        with self.lock:
            r = self.conn.execute(
                "SELECT traceparent FROM series_versions WHERE series_id = ? ORDER BY version DESC LIMIT 1",
                (atlas_id("ser", series_uid),),
            ).fetchone()
        return r["traceparent"] if r else ""

    def due_for_assembly(self, quiet_period_s: float) -> list[SeriesVersion]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT * FROM series_versions WHERE state = 'RECEIVING' AND last_instance_at <= ?"
                " ORDER BY last_instance_at",
                (time.time() - quiet_period_s,),
            ).fetchall()
        return [_row_to_series(r) for r in rows]

    def instance_digests(self, series_id: str, version: int) -> list[str]:
        """Digests of the version's instances, all readable from the blob store (drains the
        spool first)."""
        self.spool_drain.drain()
        with self.lock:
            rows = self.conn.execute(
                "SELECT digest FROM instances WHERE series_id = ? AND version_added <= ? ORDER BY sop_key",
                (series_id, version),
            ).fetchall()
        return [r["digest"] for r in rows]

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
    ) -> None:
        """Record the volume AND queue the segmentation hand-off, atomically."""
        now = time.time()
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'ASSEMBLED', volume_digest = ?, volume_size = ?,"
                " geometry_json = ?, update_time = ? WHERE series_id = ? AND version = ?"
                " AND state = 'RECEIVING'",
                (volume_digest, volume_size, json.dumps(geometry), now, series_id, version),
            )
            enqueue(self.conn, handoff_topic, f"{series_id}:{version}", handoff_payload, traceparent)

    def begin_assembly(self, series_id: str, version: int, max_attempts: int) -> int | None:
        """Count one more assembly of a RECEIVING version, durably (synchronous=FULL) before it
        starts, and return the attempt's number. A process killed while assembling leaves the
        count raised: once `max_attempts` were started and none finished, the version ends
        FAILED ``ASSEMBLY_ABANDONED_AFTER_<n>_ATTEMPTS`` and None is returned (not assembled
        again: a poison series does not crash-loop the service). None too when the version is
        no longer RECEIVING."""
        now = time.time()
        with self.lock, db.transaction(self.conn):
            r = self.conn.execute(
                "SELECT assembly_attempts FROM series_versions WHERE series_id = ? AND version = ?"
                " AND state = 'RECEIVING'",
                (series_id, version),
            ).fetchone()
            if r is None:
                return None
            attempts = int(r["assembly_attempts"])
            if attempts >= max_attempts:
                self.conn.execute(
                    "UPDATE series_versions SET state = 'FAILED', failure_reason = ?, update_time = ?"
                    " WHERE series_id = ? AND version = ?",
                    (abandoned_reason(attempts), now, series_id, version),
                )
                return None
            self.conn.execute(
                "UPDATE series_versions SET assembly_attempts = ? WHERE series_id = ? AND version = ?",
                (attempts + 1, series_id, version),
            )
        return attempts + 1

    def end_assembly_attempt(self, series_id: str, version: int) -> None:
        """Take back the attempt counted by `begin_assembly` of an assembly that did not kill
        the process but stopped on the service's own storage (the series is not at fault)."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET assembly_attempts = MAX(assembly_attempts - 1, 0)"
                " WHERE series_id = ? AND version = ? AND state = 'RECEIVING'",
                (series_id, version),
            )

    def mark_failed(self, series_id: str, version: int, reason: str) -> None:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'FAILED', failure_reason = ?, update_time = ?"
                " WHERE series_id = ? AND version = ?",
                (reason, time.time(), series_id, version),
            )

    def mark_dispatched(self, series_id: str, version: int) -> None:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'DISPATCHED', update_time = ?"
                " WHERE series_id = ? AND version = ? AND state = 'ASSEMBLED'",
                (time.time(), series_id, version),
            )

    def get_series(self, series_id: str) -> SeriesVersion:
        with self.lock:
            r = self.conn.execute(
                "SELECT * FROM series_versions WHERE series_id = ? ORDER BY version DESC LIMIT 1", (series_id,)
            ).fetchone()
        if r is None:
            raise NotFound(
                "SERIES_NOT_FOUND", "series not found", domain="atlasflow.ingest", metadata={"series_id": series_id}
            )
        return _row_to_series(r)

    def get_series_version(self, series_id: str, version: int) -> SeriesVersion:
        """One version of a series (version >= 1). NotFound("SERIES_NOT_FOUND") for an unknown
        series, NotFound("SERIES_VERSION_NOT_FOUND") when the series has no such version."""
        with self.lock:
            r = self.conn.execute(
                "SELECT * FROM series_versions WHERE series_id = ? AND version = ?", (series_id, version)
            ).fetchone()
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
            with self.lock:
                r = self.conn.execute(
                    "SELECT * FROM series_versions WHERE volume_digest = ?"
                    " ORDER BY update_time DESC, series_id LIMIT 1",
                    (volume_digest,),
                ).fetchone()
        if r is None:
            raise NotFound(
                "VOLUME_NOT_FOUND",
                "no series assembled this volume",
                domain="atlasflow.ingest",
                metadata={"volume_digest": volume_digest[:80]},
            )
        return _row_to_series(r)

    def list_series(self, page_size: int, page_token: str) -> tuple[list[SeriesVersion], str]:
        size = db.clamp_page_size(page_size, domain="atlasflow.ingest")
        cursor = db.decode_page_token(page_token, "series", domain="atlasflow.ingest")
        offset = int(cursor["offset"]) if cursor else 0
        with self.lock:
            rows = self.conn.execute(
                "SELECT s.* FROM series_versions s JOIN (SELECT series_id, MAX(version) v"
                " FROM series_versions GROUP BY series_id) m ON s.series_id = m.series_id"
                " AND s.version = m.v ORDER BY s.create_time DESC, s.series_id"
                " LIMIT ? OFFSET ?",
                (size + 1, offset),
            ).fetchall()
        items = [_row_to_series(r) for r in rows[:size]]
        token = db.encode_page_token("series", {"offset": offset + size}) if len(rows) > size else ""
        return items, token

    def conflict_count(self, series_id: str | None = None) -> int:
        if series_id is not None:
            with self.lock:
                return int(
                    self.conn.execute(
                        "SELECT COUNT(*) FROM instance_conflicts WHERE series_id = ?", (series_id,)
                    ).fetchone()[0]
                )
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM instance_conflicts").fetchone()[0])

    def receiving_count(self) -> int:
        with self.lock:
            return int(
                self.conn.execute(
                    "SELECT COUNT(*) FROM series_versions WHERE state IN ('RECEIVING', 'ASSEMBLED')"
                ).fetchone()[0]
            )

    # ----------------------------------------------------------------------------- deletion

    def check_not_deleted(self, case_id: str) -> None:
        """FailedPrecondition STUDY_DELETED when `case_id`'s study was deleted less than
        `refuse_deleted_s` ago (a tombstone; `atlasflow.ingest.deletion`)."""
        tomb = self.tombstones.get(case_id)
        if tomb is not None and time.time() - tomb[1] < self.refuse_deleted_s:
            raise FailedPrecondition(
                "STUDY_DELETED",
                "this study was deleted; its instances are refused",
                domain="atlasflow.ingest",
                metadata={"case_id": case_id, "deletion_id": tomb[0]},
            )

    def purge_study(
        self, case_id: str, in_transaction: Callable[[dict[str, int], list[str]], None] | None = None
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
        `in_transaction(counts, digests)` runs inside the deleting transaction (the deletion
        records its operation and hand-offs there). Idempotent."""
        self.spool_drain.drain()
        with self.lock, db.transaction(self.conn):
            versions = self.conn.execute(
                "SELECT series_id, version, volume_digest FROM series_versions WHERE case_id = ?", (case_id,)
            ).fetchall()
            series = sorted({r["series_id"] for r in versions})
            digests = {r["volume_digest"] for r in versions if r["volume_digest"]}
            counts = {"instances": 0, "instance_conflicts": 0, "outbox": 0, "uploads": 0}
            for sid in series:
                for table in ("instances", "instance_conflicts"):
                    digests.update(
                        r[0] for r in self.conn.execute(f"SELECT digest FROM {table} WHERE series_id = ?", (sid,))
                    )
                    counts[table] += self.conn.execute(f"DELETE FROM {table} WHERE series_id = ?", (sid,)).rowcount
                counts["uploads"] += self.conn.execute(
                    "DELETE FROM uploads WHERE complete = 1 AND json_extract(receipt_json, '$.series_id') = ?", (sid,)
                ).rowcount
            for r in versions:
                counts["outbox"] += self.conn.execute(
                    "DELETE FROM outbox WHERE dedupe_key = ?", (f"{r['series_id']}:{r['version']}",)
                ).rowcount
            counts["series_versions"] = self.conn.execute(
                "DELETE FROM series_versions WHERE case_id = ?", (case_id,)
            ).rowcount
            released = sorted(d for d in digests if d)
            if in_transaction is not None:
                in_transaction(counts, released)
        return counts, released

    def referenced(self, digests: list[str]) -> list[str]:
        """Those of `digests` that a row of ingest references (an instance, a conflict, a volume)."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        with self.lock:
            for i in range(0, len(wanted), 300):
                chunk = wanted[i : i + 300]
                marks = ",".join("?" * len(chunk))
                for r in self.conn.execute(
                    f"SELECT digest FROM instances WHERE digest IN ({marks})"
                    f" UNION SELECT digest FROM instance_conflicts WHERE digest IN ({marks})"
                    f" UNION SELECT volume_digest FROM series_versions WHERE volume_digest IN ({marks})",
                    (*chunk, *chunk, *chunk),
                ):
                    found.add(r[0])
        return sorted(found)


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
