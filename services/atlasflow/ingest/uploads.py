"""Resumable gRPC uploads: the durable partial bytes of one instance, by upload id (no grpc).

One partial file per upload under <data_dir>/uploads/, named by the SHA-256 of the upload id. A
chunk is durable when `UploadStore.write` returns: written at its offset, fdatasync'd, then the
committed offset is committed (SQLite, synchronous=FULL). A crash between the two leaves bytes
past the committed offset, which the next write at the committed offset overwrites (and
truncates away). Not for concurrent writers of one upload id: the second stream gets
OFFSET_MISMATCH once the first has moved on.

The table lives in the ingest database (`atlasflow.ingest.schema`); `IngestStore` opens it and
shares its connection and lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as db
from atlasflow.common.errors import Aborted, InvalidArgument, NotFound


@dataclass(frozen=True)
class UploadState:
    """A resumable upload: `committed_offset` bytes are durable; `receipt` once complete."""

    upload_id: str
    committed_offset: int
    complete: bool
    sha256: str
    receipt: dict[str, Any]


_UPLOAD_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_OWNER_TAG = re.compile(r"[0-9a-f]{16}\.")


def public_upload_id(key: str) -> str:
    """The client's upload id of a stored key (`atlasflow.ingest.servicer.upload_key` prefixes
    the owner's tag), for error metadata: a client sees only its own id."""
    return key[17:] if _OWNER_TAG.match(key) else key


class UploadStore:
    """The uploads table and partial files (thread-safe: ``lock`` guards ``conn``)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock, directory: Path) -> None:
        self.conn = conn
        self.lock = lock
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, upload_id: str) -> Path:
        return self.dir / (hashlib.sha256(upload_id.encode()).hexdigest() + ".part")

    @staticmethod
    def check_upload_id(upload_id: str) -> None:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise InvalidArgument(
                "INVALID_UPLOAD_ID", "upload_id must be 1-128 characters of [A-Za-z0-9._-]", domain="atlasflow.ingest"
            )

    def status(self, upload_id: str) -> UploadState:
        """The upload's state; NotFound UPLOAD_NOT_FOUND when nothing of it was committed."""
        with self.lock:
            r = self.conn.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if r is None:
            raise NotFound(
                "UPLOAD_NOT_FOUND",
                "no committed bytes for this upload_id",
                domain="atlasflow.ingest",
                metadata={"upload_id": public_upload_id(upload_id)[:128]},
            )
        return UploadState(
            r["upload_id"],
            r["committed_offset"],
            bool(r["complete"]),
            r["sha256"],
            json.loads(r["receipt_json"]) if r["receipt_json"] else {},
        )

    def state(self, upload_id: str) -> UploadState:
        """`status`, or the empty state (offset 0) of an upload nothing of which was committed."""
        try:
            return self.status(upload_id)
        except NotFound:
            return UploadState(upload_id, 0, False, "", {})

    def write(self, upload_id: str, offset: int, chunk: bytes) -> UploadState:
        """Durably write `chunk` at `offset` (must equal the committed offset, else Aborted
        OFFSET_MISMATCH with metadata ``expected_offset``). A complete upload is returned
        unchanged (chunks re-sent after completion are ignored: idempotent)."""
        state = self.state(upload_id)
        if state.complete:
            return state
        if offset != state.committed_offset:
            raise Aborted(
                "OFFSET_MISMATCH",
                "chunk offset is not the upload's committed offset",
                domain="atlasflow.ingest",
                metadata={
                    "upload_id": public_upload_id(upload_id)[:128],
                    "expected_offset": str(state.committed_offset),
                    "offset": str(offset),
                },
            )
        path = self._path(upload_id)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view, done = memoryview(chunk), 0
            while done < len(chunk):
                done += os.pwrite(fd, view[done:], offset + done)
            os.ftruncate(fd, offset + len(chunk))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        now = time.time()
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "INSERT INTO uploads(upload_id, committed_offset, create_time, update_time)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(upload_id) DO UPDATE SET"
                " committed_offset = excluded.committed_offset, update_time = excluded.update_time",
                (upload_id, offset + len(chunk), now, now),
            )
        return UploadState(upload_id, offset + len(chunk), False, "", {})

    def read(self, upload_id: str) -> bytes:
        """The committed bytes of an incomplete upload."""
        state = self.status(upload_id)
        path = self._path(upload_id)
        with open(path, "rb") as f:
            return f.read(state.committed_offset)

    def complete(self, upload_id: str, sha256: str, receipt: dict[str, Any]) -> None:
        """Record the upload as complete (after its instance is durable) with its receipt;
        the partial file goes."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE uploads SET complete = 1, sha256 = ?, receipt_json = ?, update_time = ? WHERE upload_id = ?",
                (sha256, json.dumps(receipt), time.time(), upload_id),
            )
        self._path(upload_id).unlink(missing_ok=True)

    def discard(self, upload_id: str) -> None:
        """Forget an incomplete upload (its bytes were refused: a retry starts over)."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute("DELETE FROM uploads WHERE upload_id = ? AND complete = 0", (upload_id,))
        self._path(upload_id).unlink(missing_ok=True)

    def purge(self, max_age_s: float) -> int:
        """Drop upload records (and partial files) untouched for `max_age_s` seconds."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT upload_id FROM uploads WHERE update_time < ?", (time.time() - max_age_s,)
            ).fetchall()
        for r in rows:
            with self.lock, db.transaction(self.conn):
                self.conn.execute("DELETE FROM uploads WHERE upload_id = ?", (r["upload_id"],))
            self._path(r["upload_id"]).unlink(missing_ok=True)
        return len(rows)
