"""The instance spool: the fast durable path of reception (no grpc).

Creating a file is what costs on ext4: a blob put (temp file, fsync, rename, directory fsync)
takes ~7.5 ms on this kind of machine, an append + fdatasync to an open file ~0.5 ms and a small
SQLite WAL commit ~0.2 ms. So `IngestStore.store_instance` makes an instance durable in two steps, both
before it returns:

1. the bytes are appended to the open spool segment (`<data_dir>/spool/seg-<n>.log`) as one
   record (header with the identity UIDs and the SHA-256 digest, the bytes, a CRC-32 of both)
   and the segment is fdatasync'd;
2. the row (or conflict row) that names the digest is committed, with synchronous=NORMAL: the
   commit reaches the WAL file but does not flush it, because the spool record of step 1 is the
   redo log of that row (start-up recovery re-creates a row that a power loss took away). The
   rows are flushed (`IngestStore._sync_db`) before any spool segment is recycled. One flush per instance
   instead of two; everything else in the database (series states, the outbox, uploads) is
   committed with synchronous=FULL.

The bytes move from the spool into the content-addressed blob store later
(`atlasflow.ingest.spool_drain`, called when reception is idle, before any read of instance
digests and at start-up); a segment file is deleted only after every record in it is a durable blob. Start-up recovery replays every
remaining segment: each complete record becomes a blob and, if its row never committed (a crash
between steps 1 and 2: the instance was not acknowledged), its row. A torn last record (a crash
inside step 1) is dropped: it was never acknowledged either. A corrupt record in the middle
(media error) stops the replay of that segment, which is kept as ``*.corrupt`` for inspection.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atlasflow.common.blobstore import digest_of
from atlasflow.common.errors import DataLoss

_FILE_MAGIC = b"AFSPOOL2"
_FILE_HEAD = struct.Struct("<8s8s")  # magic, generation nonce
_RECORD = struct.Struct("<4s8sIQ")  # b"AFR2", nonce, header length, data length
_RECORD_MAGIC = b"AFR2"  # then header (JSON), data, CRC-32 of header + data
_ZERO_BLOCK = bytes(1 << 20)


class InstanceSpool:
    """Preallocated, fdatasync'd segments of received instance bytes (see module docstring).

    A segment is written in place into a file that was already zero-filled (or recycled from
    a drained segment) and whose directory entry is durable, so the fdatasync after each record
    flushes data only: no file-system journal commit, which is what makes it cheap. Each segment
    generation has a random nonce in its file header and in every record: stale records of a
    recycled file are never read back. `spares` segments are prepared at start-up and
    replenished while reception is idle (`prepare_spares`), never during a burst.

    Not thread-safe for writers: the caller serialises `append` and `seal` (IngestStore's lock).
    """

    def __init__(self, directory: Path, segment_bytes: int = 128 * 1024 * 1024, spares: int = 2) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.spares = spares
        self._fd: int | None = None
        self._path: Path | None = None
        self._offset = 0
        self._nonce = b""
        self._next = 1 + max((self._number(p) for p in self.segments()), default=0)
        self.last_append = 0.0
        self.pending_bytes = 0
        # digest -> (segment, offset of the data, length) of records appended by this process
        # and not yet drained (`read_pending`); entries go when their segment is recycled.
        self._pending: dict[str, tuple[Path, int, int]] = {}
        self._spare_lock = threading.Lock()
        for stale in self.dir.glob(".zero-*"):
            stale.unlink()
        self._prepare_spares()

    @staticmethod
    def _number(p: Path) -> int:
        return int(p.stem.split("-")[1])

    def segments(self) -> list[Path]:
        """Segment files with records, oldest first (sealed ones and the open one)."""
        return sorted(self.dir.glob("seg-*.log"), key=self._number)

    def _free(self) -> list[Path]:
        return sorted(self.dir.glob("free-*.log"), key=self._number)

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _prepare_spares(self) -> None:
        """Zero-fill spare segments until `spares` are ready (blocking)."""
        with self._spare_lock:
            while len(self._free()) < self.spares:
                n = int(time.time() * 1e6)
                tmp = self.dir / f".zero-{n}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    for _ in range(self.segment_bytes // len(_ZERO_BLOCK)):
                        os.write(fd, _ZERO_BLOCK)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, self.dir / f"free-{n}.log")
                self._fsync_dir()

    def prepare_spares(self) -> None:
        """Replenish the spare segments (blocking; call while reception is idle)."""
        self._prepare_spares()

    def read_pending(self, digest: str) -> bytes | None:
        """The bytes of a record appended by this process and not drained yet, else None."""
        where = self._pending.get(digest)
        if where is None:
            return None
        path, offset, length = where
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data if digest_of(data) == digest else None

    def forget(self, path: Path) -> None:
        """Drop the `read_pending` entries of a segment that leaves the spool."""
        self._pending = {d: w for d, w in self._pending.items() if w[0] != path}

    def recycle(self, path: Path) -> None:
        """A drained segment becomes a spare (its stale records are fenced by the nonce)."""
        self.forget(path)
        if len(self._free()) < self.spares and path.stat().st_size >= self.segment_bytes:
            path.rename(self.dir / f"free-{int(time.time() * 1e6)}.log")
        else:
            path.unlink()

    def _open_new(self) -> None:
        free = self._free()
        path = self.dir / f"seg-{self._next:012d}.log"
        self._next += 1
        if free:
            os.rename(free[0], path)
            fd = os.open(path, os.O_WRONLY)
        else:  # no spare ready: a growing file (slower fdatasync, still durable)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._nonce = os.urandom(8)
        os.pwrite(fd, _FILE_HEAD.pack(_FILE_MAGIC, self._nonce), 0)
        os.fsync(fd)
        self._fsync_dir()  # the segment's name is durable before any record in it
        self._fd, self._path, self._offset = fd, path, _FILE_HEAD.size

    def append(self, header: dict[str, Any], data: bytes) -> None:
        """Write one record; durable (fdatasync'd) when it returns."""
        head = json.dumps(header, separators=(",", ":")).encode()
        size = _RECORD.size + len(head) + len(data) + 4
        if self._fd is None or (self._offset + size > self.segment_bytes and self._offset > _FILE_HEAD.size):
            self.seal()
            self._open_new()
        assert self._fd is not None
        crc = zlib.crc32(data, zlib.crc32(head))
        record = b"".join(
            (_RECORD.pack(_RECORD_MAGIC, self._nonce, len(head), len(data)), head, data, struct.pack("<I", crc))
        )
        view = memoryview(record)
        done = 0
        while done < len(record):
            done += os.pwrite(self._fd, view[done:], self._offset + done)
        os.fdatasync(self._fd)
        assert self._path is not None
        self._pending[header["digest"]] = (self._path, self._offset + _RECORD.size + len(head), len(data))
        self._offset += len(record)
        self.pending_bytes += len(data)
        self.last_append = time.monotonic()

    def seal(self) -> None:
        """Close the open segment (the next append opens a new one)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._path = None, None

    @staticmethod
    def read_segment(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
        """Valid records of a segment in order, up to the first one that is missing or torn
        (a crash while writing it: never acknowledged). Raises DataLoss when a torn record is
        followed by a valid one (media corruption, not a crash)."""
        with open(path, "rb") as f:
            raw = f.read(_FILE_HEAD.size)
            if len(raw) < _FILE_HEAD.size:
                return
            magic, nonce = _FILE_HEAD.unpack(raw)
            if magic != _FILE_MAGIC:
                return  # crash before the header was durable: no records
            total = os.fstat(f.fileno()).st_size

            def header_at(pos: int) -> tuple[int, int] | None:
                f.seek(pos)
                raw = f.read(_RECORD.size)
                if len(raw) < _RECORD.size:
                    return None
                m, n, hlen, dlen = _RECORD.unpack(raw)
                if m != _RECORD_MAGIC or n != nonce or pos + _RECORD.size + hlen + dlen + 4 > total:
                    return None
                return hlen, dlen

            pos = _FILE_HEAD.size
            while (lengths := header_at(pos)) is not None:
                hlen, dlen = lengths
                head = f.read(hlen)
                data = f.read(dlen)
                (crc,) = struct.unpack("<I", f.read(4))
                end = pos + _RECORD.size + hlen + dlen + 4
                if zlib.crc32(data, zlib.crc32(head)) != crc:
                    if header_at(end) is not None:
                        raise DataLoss(
                            "SPOOL_CORRUPT",
                            "spool record checksum mismatch",
                            domain="atlasflow.ingest",
                            metadata={"segment": path.name},
                        )
                    return  # torn tail
                yield json.loads(head), data
                pos = end
