"""Resumable gRPC uploads: the durable partial bytes of one instance, by upload id (no grpc).

One partial file per upload under <data_dir>/uploads/, named by the SHA-256 of the upload id. A
chunk is durable when `UploadStore.write` returns: written at its offset, fdatasync'd, then the
committed offset is committed (SQLite, synchronous=FULL). A crash between the two leaves bytes
past the committed offset, which the next write at the committed offset overwrites (and
truncates away). Not for concurrent writers of one upload id: the second stream gets
OFFSET_MISMATCH once the first has moved on.

A whole (non-resumable) instance of an UploadInstances stream is a `StreamedInstance`: its
chunks stay in memory up to `MEMORY_MAX_BYTES` (a CT slice is ~0.5 MB: the fast spool path of
`atlasflow.ingest.store` keeps it), beyond that they go to a spool file
``<data_dir>/uploads/stream-<random>.part`` (0600) as they arrive, hashed incrementally; the size
limit is enforced before a chunk is taken and the free-disk floor checked every
`FLOOR_CHECK_BYTES`. The file is fsync'd and then renamed into the blob store
(`atlasflow.ingest.store.IngestStore.store_instance_file`) before the receipt. Spool files of a
process that died, and partial files untouched for the upload TTL, are removed by `purge`.

The table lives in the ingest database (`atlasflow.ingest.migrations`); `IngestStore` opens it
and shares its `atlasflow.common.db.Database`. The partial files are local to the process's data
directory: a resumed upload must reach the replica that holds its partial file (the row is
shared; the bytes are not). The row names that replica (``owner_replica``, migration 0004;
`volume_replica_id`: it follows the volume, not the process); a chunk or the last chunk of the
upload that reaches another replica is refused with Unavailable UPLOAD_ON_OTHER_REPLICA
(ErrorInfo metadata ``replica``: the holder, its pod name before the ``:``), never written after
a hole or checked against bytes that are not there. The client
continues on that replica (a StatefulSet pod: ``<pod>.<headless Service>``), or sends the
upload again from offset 0 here: a first chunk takes the upload over (the old partial file is
purged with the TTL on its replica).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from atlasflow.common.db import Database
from atlasflow.common.disk import DiskFloor, atomic_write
from atlasflow.common.errors import Aborted, InvalidArgument, NotFound, Unavailable

#: an instance up to this size is kept in memory while it arrives (then the spool path of the store)
MEMORY_MAX_BYTES = 8 * 1024 * 1024
#: the free-disk floor is checked when an instance starts and every this many bytes of it
FLOOR_CHECK_BYTES = 64 * 1024 * 1024
_STREAM_PREFIX = "stream-"


def too_large(limit_bytes: int, upload_id: str = "") -> InvalidArgument:
    """InvalidArgument INSTANCE_TOO_LARGE (metadata ``limit_bytes``, and ``upload_id``)."""
    metadata = {"limit_bytes": str(limit_bytes)}
    if upload_id:
        metadata["upload_id"] = public_upload_id(upload_id)[:128]
    return InvalidArgument(
        "INSTANCE_TOO_LARGE", "instance exceeds the size limit", domain="atlasflow.ingest", metadata=metadata
    )


def sha256_of_file(path: Path, length: int | None = None) -> str:
    """Hex SHA-256 of the first `length` bytes of a file (all when None), read 1 MiB at a time."""
    h = hashlib.sha256()
    left = -1 if length is None else length
    with open(path, "rb") as f:
        while left:
            block = f.read(1 << 20 if left < 0 else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            left = left - len(block) if left > 0 else left
    return h.hexdigest()


def offset_mismatch(upload_id: str, expected: int, offset: int) -> Aborted:
    """Aborted("OFFSET_MISMATCH"): a chunk whose offset is not the upload's committed offset
    (the client resumes from ``expected_offset``)."""
    return Aborted(
        "OFFSET_MISMATCH",
        "chunk offset is not the upload's committed offset",
        domain="atlasflow.ingest",
        metadata={
            "upload_id": public_upload_id(upload_id)[:128],
            "expected_offset": str(expected),
            "offset": str(offset),
        },
    )


class StreamedInstance:
    """One instance of a non-resumable upload stream as its chunks arrive (see module doc).

    ``buffer`` holds it while it is at most `memory_max` bytes; past that ``path`` is its spool
    file (written, not yet fsync'd: `atlasflow.ingest.store.IngestStore.store_instance_file`
    syncs it before it becomes the blob). ``sha256`` (hex) is the digest of every byte taken.
    Blocking file I/O: call from a worker thread."""

    def __init__(
        self, directory: Path, max_bytes: int, *, memory_max: int = MEMORY_MAX_BYTES, floor: DiskFloor | None = None
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.memory_max = memory_max
        self.floor = floor
        self.size = 0
        self.buffer: bytearray | None = bytearray()
        self.path: Path | None = None
        self._fd: int | None = None
        self._hash = hashlib.sha256()
        self._next_floor_check = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def append(self, chunk: bytes) -> None:
        """Take one chunk: InvalidArgument INSTANCE_TOO_LARGE (nothing of the chunk taken) when
        the instance would exceed ``max_bytes``; ResourceExhausted DISK_FULL below the floor."""
        if self.size + len(chunk) > self.max_bytes:
            raise too_large(self.max_bytes)
        if self.floor is not None and self.size + len(chunk) > self._next_floor_check:
            self.floor.check()
            self._next_floor_check = self.size + FLOOR_CHECK_BYTES
        if self.buffer is not None and self.size + len(chunk) > self.memory_max:
            self.path = self.dir / f"{_STREAM_PREFIX}{os.urandom(12).hex()}.part"
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._write(self.buffer)
            self.buffer = None
        if self.buffer is not None:
            self.buffer += chunk
        else:
            self._write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def _write(self, data: bytes | bytearray) -> None:
        assert self._fd is not None
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.write(self._fd, view[done:])

    def close(self) -> None:
        """Close the spool file (it stays until `discard` or until the store takes it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Drop what was taken (refused, abandoned, or done: a file the store took is gone already)."""
        self.close()
        self.buffer = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class UploadState:
    """A resumable upload: `committed_offset` bytes are durable; `receipt` once complete."""

    upload_id: str
    committed_offset: int
    complete: bool
    sha256: str
    receipt: dict[str, Any]
    owner: str = ""  # the replica holding the partial bytes ('' = any: a row of an older version)


def on_other_replica(upload_id: str, owner: str) -> Unavailable:
    """Unavailable UPLOAD_ON_OTHER_REPLICA: the upload's partial bytes are on replica `owner`."""
    return Unavailable(
        "UPLOAD_ON_OTHER_REPLICA",
        "this upload's committed bytes are on another ingest replica: continue it there, or send"
        " it again from offset 0",
        domain="atlasflow.ingest",
        metadata={"upload_id": public_upload_id(upload_id)[:128], "replica": owner[:200]},
    )


def volume_replica_id(data_dir: Path, name: str) -> str:
    """The replica id of a data directory: `name` (host name and directory) as it was when the
    directory was first used, kept in ``<data_dir>/replica-id``. It follows the volume that holds
    the partial files, not the process: a Deployment's restarted pod (another host name, the same
    volume) is the same replica; each StatefulSet pod's volume is its own."""
    path = Path(data_dir) / "replica-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, name.encode())
    return name


_UPLOAD_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_OWNER_TAG = re.compile(r"[0-9a-f]{16}\.")


def public_upload_id(key: str) -> str:
    """The client's upload id of a stored key (`atlasflow.ingest.servicer.upload_key` prefixes
    the owner's tag), for error metadata: a client sees only its own id."""
    return key[17:] if _OWNER_TAG.match(key) else key


class UploadStore:
    """The uploads table and partial files (thread-safe: one pooled connection per call)."""

    def __init__(self, db: Database, directory: Path, replica: str = "") -> None:
        """`replica`: this replica's name in ``owner_replica`` ('' = a single replica); it must
        follow the directory, not the process (`volume_replica_id`)."""
        self.db = db
        self.replica = replica
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
        with self.db.read() as conn:
            r = conn.execute(sa.text("SELECT * FROM uploads WHERE upload_id = :u"), {"u": upload_id}).mappings().first()
        if r is None:
            raise NotFound(
                "UPLOAD_NOT_FOUND",
                "no committed bytes for this upload_id",
                domain="atlasflow.ingest",
                metadata={"upload_id": public_upload_id(upload_id)[:128]},
            )
        return UploadState(
            r["upload_id"],
            int(r["committed_offset"]),
            bool(r["complete"]),
            r["sha256"],
            json.loads(r["receipt_json"]) if r["receipt_json"] else {},
            r["owner_replica"],
        )

    def check_here(self, state: UploadState) -> None:
        """Unavailable UPLOAD_ON_OTHER_REPLICA when the incomplete upload's committed bytes are
        on another replica (see the module doc)."""
        if not state.complete and state.committed_offset and state.owner not in ("", self.replica):
            raise on_other_replica(state.upload_id, state.owner)

    def state(self, upload_id: str) -> UploadState:
        """`status`, or the empty state (offset 0) of an upload nothing of which was committed."""
        try:
            return self.status(upload_id)
        except NotFound:
            return UploadState(upload_id, 0, False, "", {})

    def path(self, upload_id: str) -> Path:
        """The partial file of an upload (the committed bytes are its first `committed_offset`)."""
        return self._path(upload_id)

    def stream(self, max_bytes: int, floor: DiskFloor | None = None) -> StreamedInstance:
        """A new `StreamedInstance` spooled in this directory."""
        return StreamedInstance(self.dir, max_bytes, floor=floor)

    def write(
        self, upload_id: str, offset: int, chunk: bytes, *, max_bytes: int = 0, floor: DiskFloor | None = None
    ) -> UploadState:
        """Durably write `chunk` at `offset` (must equal the committed offset, else Aborted
        OFFSET_MISMATCH with metadata ``expected_offset``). A complete upload is returned
        unchanged (chunks re-sent after completion are ignored: idempotent). `max_bytes` (0: no
        limit): InvalidArgument INSTANCE_TOO_LARGE, nothing written, when the chunk would take
        the upload past it. `floor`: checked (DISK_FULL) on an upload's first chunk and every
        `FLOOR_CHECK_BYTES`. Replicas: Unavailable UPLOAD_ON_OTHER_REPLICA when another replica
        holds the committed bytes (a chunk at offset 0 starts the upload again here instead);
        the row is moved on only if it is still as read (another stream's chunk meanwhile:
        OFFSET_MISMATCH or UPLOAD_ON_OTHER_REPLICA)."""
        state = self.state(upload_id)
        if state.complete:
            return state
        if max_bytes and offset + len(chunk) > max_bytes:
            raise too_large(max_bytes, upload_id)
        if floor is not None and (
            offset == 0 or offset // FLOOR_CHECK_BYTES != (offset + len(chunk)) // FLOOR_CHECK_BYTES
        ):
            floor.check()
        # a first chunk (offset 0) of an upload another replica holds starts it again here
        takeover = offset == 0 and state.committed_offset > 0 and state.owner not in ("", self.replica)
        if offset:
            self.check_here(state)
        if offset != state.committed_offset and not takeover:
            raise offset_mismatch(upload_id, state.committed_offset, offset)
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
        with self.db.transaction() as conn:
            # another replica's chunk committed meanwhile (two streams of one upload): not ours
            # to move on; the re-read below says why
            changed = conn.execute(
                sa.text(
                    "INSERT INTO uploads(upload_id, committed_offset, create_time, update_time, owner_replica)"
                    " VALUES (:u, :o, :t, :t, :me) ON CONFLICT(upload_id) DO UPDATE SET"
                    " committed_offset = excluded.committed_offset, update_time = excluded.update_time,"
                    " owner_replica = excluded.owner_replica"
                    " WHERE uploads.complete = 0 AND uploads.committed_offset = :seen"
                    " AND uploads.owner_replica = :seen_owner"
                ),
                {
                    "u": upload_id,
                    "o": offset + len(chunk),
                    "t": now,
                    "me": self.replica,
                    "seen": state.committed_offset,
                    "seen_owner": state.owner,
                },
            ).rowcount
        if not changed:
            now_state = self.state(upload_id)
            self.check_here(now_state)
            raise offset_mismatch(upload_id, now_state.committed_offset, offset)
        return UploadState(upload_id, offset + len(chunk), False, "", {}, self.replica)

    def read(self, upload_id: str) -> bytes:
        """The committed bytes of an incomplete upload."""
        state = self.status(upload_id)
        path = self._path(upload_id)
        with open(path, "rb") as f:
            return f.read(state.committed_offset)

    def complete(self, upload_id: str, sha256: str, receipt: dict[str, Any]) -> None:
        """Record the upload as complete (after its instance is durable) with its receipt;
        the partial file goes."""
        with self.db.transaction() as conn:
            conn.execute(
                sa.text(
                    "UPDATE uploads SET complete = 1, sha256 = :h, receipt_json = :r, update_time = :t"
                    " WHERE upload_id = :u"
                ),
                {"h": sha256, "r": json.dumps(receipt), "t": time.time(), "u": upload_id},
            )
        self._path(upload_id).unlink(missing_ok=True)

    def discard(self, upload_id: str) -> None:
        """Forget an incomplete upload (its bytes were refused: a retry starts over)."""
        with self.db.transaction() as conn:
            conn.execute(sa.text("DELETE FROM uploads WHERE upload_id = :u AND complete = 0"), {"u": upload_id})
        self._path(upload_id).unlink(missing_ok=True)

    def purge(self, max_age_s: float, *, at_start: bool = False) -> int:
        """Drop upload records (and partial files) untouched for `max_age_s` seconds, and any
        file here untouched that long (a partial whose record never committed, an abandoned
        stream spool file). `at_start`: also every stream spool file (no process is writing
        them: a non-resumable upload cut by a restart is sent again). Returns the records dropped."""
        cutoff = time.time() - max_age_s
        with self.db.read() as conn:
            stale_ids = [
                r[0]
                for r in conn.execute(sa.text("SELECT upload_id FROM uploads WHERE update_time < :c"), {"c": cutoff})
            ]
        for upload_id in stale_ids:
            with self.db.transaction() as conn:
                conn.execute(sa.text("DELETE FROM uploads WHERE upload_id = :u"), {"u": upload_id})
            self._path(upload_id).unlink(missing_ok=True)
        for p in self.dir.iterdir():
            try:
                stale = p.stat().st_mtime < cutoff or (at_start and p.name.startswith(_STREAM_PREFIX))
            except FileNotFoundError:
                continue
            if stale and p.is_file():
                p.unlink(missing_ok=True)
        return len(stale_ids)
