"""Durable instance spool and series bookkeeping for the ingest service (no grpc).

An instance is durable when `store_instance` returns: its bytes are in the content-addressed
blob store (fsync'd) and its row is committed (SQLite WAL, synchronous=FULL). Only then does the
caller acknowledge it (C-STORE Success, or a gRPC receipt).

Identity: atlasflow never exposes DICOM UIDs. `series_id`/`case_id` are salted-free SHA-256
prefixes of the Series/Study Instance UIDs (stable across restarts and replicas).

Versions: a series version collects instances while RECEIVING; after the quiet period (or an
explicit commit) it is ASSEMBLED into a volume and the segmentation hand-off is queued in the
outbox in the same transaction. An instance that arrives after assembly opens version + 1,
which re-assembles with every instance of the series: never a silent change to a version.

Duplicates: the same SOP Instance UID with the same bytes is stored once (reported duplicate);
with different bytes the first is kept and the second is recorded in `instance_conflicts`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from atlasflow.common import sqlite as db
from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import NotFound
from atlasflow.common.outbox import OUTBOX_MIGRATION, enqueue

MIGRATIONS = [
    """
    CREATE TABLE series_versions (
        series_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        case_id TEXT NOT NULL,
        state TEXT NOT NULL,                 -- RECEIVING | ASSEMBLED | DISPATCHED | FAILED
        instance_count INTEGER NOT NULL DEFAULT 0,
        last_instance_at REAL NOT NULL,
        volume_digest TEXT NOT NULL DEFAULT '',
        volume_size INTEGER NOT NULL DEFAULT 0,
        geometry_json TEXT NOT NULL DEFAULT '',
        failure_reason TEXT NOT NULL DEFAULT '',
        traceparent TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL,
        PRIMARY KEY (series_id, version)
    );
    CREATE INDEX series_state ON series_versions(state, last_instance_at);
    CREATE TABLE instances (
        series_id TEXT NOT NULL,
        sop_key TEXT NOT NULL,               -- sha256 of the SOP Instance UID
        version_added INTEGER NOT NULL,
        digest TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (series_id, sop_key)
    );
    CREATE TABLE instance_conflicts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_id TEXT NOT NULL,
        sop_key TEXT NOT NULL,
        digest TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        received_at REAL NOT NULL
    );
    """,
    OUTBOX_MIGRATION,
]


def atlas_id(prefix: str, uid: str) -> str:
    return f"{prefix}-{hashlib.sha256(uid.encode()).hexdigest()[:20]}"


@dataclass(frozen=True)
class StoredInstance:
    series_id: str
    case_id: str
    version: int
    duplicate: bool
    conflict: bool
    traceparent: str  # the series' trace


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
    geometry: dict
    failure_reason: str
    traceparent: str
    create_time: float
    update_time: float


def _row_to_series(r) -> SeriesVersion:  # type: ignore[no-untyped-def]
    return SeriesVersion(
        r["series_id"], r["version"], r["case_id"], r["state"], r["instance_count"],
        r["last_instance_at"], r["volume_digest"], r["volume_size"],
        json.loads(r["geometry_json"]) if r["geometry_json"] else {}, r["failure_reason"],
        r["traceparent"], r["create_time"], r["update_time"])


class IngestStore:
    def __init__(self, data_dir: str | Path, blobs: BlobStore) -> None:
        self.conn = db.connect(Path(data_dir) / "ingest.sqlite3")
        db.migrate(self.conn, MIGRATIONS)
        self.lock = threading.Lock()
        self.blobs = blobs

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def store_instance(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str,
                       new_traceparent: str = "") -> StoredInstance:
        """Persist one validated instance; returns once it is durable.

        `new_traceparent` is used as the series' trace if this instance opens a new version.
        """
        info = self.blobs.put(data)  # fsync'd before the row refers to it
        series_id = atlas_id("ser", series_uid)
        case_id = atlas_id("case", study_uid)
        sop_key = hashlib.sha256(sop_uid.encode()).hexdigest()
        now = time.time()
        with self.lock, db.transaction(self.conn):
            cur = self.conn.execute(
                "SELECT * FROM series_versions WHERE series_id = ? ORDER BY version DESC LIMIT 1",
                (series_id,)).fetchone()
            existing = self.conn.execute(
                "SELECT digest FROM instances WHERE series_id = ? AND sop_key = ?",
                (series_id, sop_key)).fetchone()
            if existing is not None:
                duplicate = existing["digest"] == info.digest
                if not duplicate:
                    self.conn.execute(
                        "INSERT INTO instance_conflicts(series_id, sop_key, digest, size_bytes,"
                        " received_at) VALUES (?, ?, ?, ?, ?)",
                        (series_id, sop_key, info.digest, info.size_bytes, now))
                assert cur is not None
                return StoredInstance(series_id, case_id, cur["version"], duplicate,
                                      not duplicate, cur["traceparent"])
            if cur is None or cur["state"] != "RECEIVING":
                version = 1 if cur is None else cur["version"] + 1
                prior = 0 if cur is None else cur["instance_count"]
                traceparent = new_traceparent if cur is None else (cur["traceparent"] or new_traceparent)
                self.conn.execute(
                    "INSERT INTO series_versions(series_id, version, case_id, state,"
                    " instance_count, last_instance_at, traceparent, create_time, update_time)"
                    " VALUES (?, ?, ?, 'RECEIVING', ?, ?, ?, ?, ?)",
                    (series_id, version, case_id, prior, now, traceparent, now, now))
            else:
                version, traceparent = cur["version"], cur["traceparent"]
            self.conn.execute(
                "INSERT INTO instances(series_id, sop_key, version_added, digest, size_bytes,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (series_id, sop_key, version, info.digest, info.size_bytes, now))
            self.conn.execute(
                "UPDATE series_versions SET instance_count = instance_count + 1,"
                " last_instance_at = ?, update_time = ? WHERE series_id = ? AND version = ?",
                (now, now, series_id, version))
        return StoredInstance(series_id, case_id, version, False, False, traceparent)

    def series_traceparent(self, series_uid: str) -> str:
        with self.lock:
            r = self.conn.execute(
                "SELECT traceparent FROM series_versions WHERE series_id = ?"
                " ORDER BY version DESC LIMIT 1", (atlas_id("ser", series_uid),)).fetchone()
        return r["traceparent"] if r else ""

    def due_for_assembly(self, quiet_period_s: float) -> list[SeriesVersion]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT * FROM series_versions WHERE state = 'RECEIVING' AND last_instance_at <= ?"
                " ORDER BY last_instance_at", (time.time() - quiet_period_s,)).fetchall()
        return [_row_to_series(r) for r in rows]

    def instance_digests(self, series_id: str, version: int) -> list[str]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT digest FROM instances WHERE series_id = ? AND version_added <= ?"
                " ORDER BY sop_key", (series_id, version)).fetchall()
        return [r["digest"] for r in rows]

    def mark_assembled(self, series_id: str, version: int, volume_digest: str, volume_size: int,
                       geometry: dict, handoff_topic: str, handoff_payload: bytes,
                       traceparent: str) -> None:
        """Record the volume AND queue the segmentation hand-off, atomically."""
        now = time.time()
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'ASSEMBLED', volume_digest = ?, volume_size = ?,"
                " geometry_json = ?, update_time = ? WHERE series_id = ? AND version = ?"
                " AND state = 'RECEIVING'",
                (volume_digest, volume_size, json.dumps(geometry), now, series_id, version))
            enqueue(self.conn, handoff_topic, f"{series_id}:{version}", handoff_payload, traceparent)

    def mark_failed(self, series_id: str, version: int, reason: str) -> None:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'FAILED', failure_reason = ?, update_time = ?"
                " WHERE series_id = ? AND version = ?", (reason, time.time(), series_id, version))

    def mark_dispatched(self, series_id: str, version: int) -> None:
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE series_versions SET state = 'DISPATCHED', update_time = ?"
                " WHERE series_id = ? AND version = ? AND state = 'ASSEMBLED'",
                (time.time(), series_id, version))

    def get_series(self, series_id: str) -> SeriesVersion:
        with self.lock:
            r = self.conn.execute(
                "SELECT * FROM series_versions WHERE series_id = ? ORDER BY version DESC LIMIT 1",
                (series_id,)).fetchone()
        if r is None:
            raise NotFound("SERIES_NOT_FOUND", "series not found", domain="atlasflow.ingest",
                           metadata={"series_id": series_id})
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
                " LIMIT ? OFFSET ?", (size + 1, offset)).fetchall()
        items = [_row_to_series(r) for r in rows[:size]]
        token = db.encode_page_token("series", {"offset": offset + size}) if len(rows) > size else ""
        return items, token

    def conflict_count(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM instance_conflicts").fetchone()[0])

    def receiving_count(self) -> int:
        with self.lock:
            return int(self.conn.execute(
                "SELECT COUNT(*) FROM series_versions WHERE state IN ('RECEIVING', 'ASSEMBLED')"
            ).fetchone()[0])
