"""Spool -> blob store: the drain of reception's spool and its start-up replay (no grpc).

`IngestStore` spools each instance (`atlasflow.ingest.spool`) and commits its row; this module
moves the spooled bytes into the content-addressed blob store afterwards (when reception is
idle, before any read of instance digests) and, at start-up, replays the segments a previous
process left: each complete record becomes a blob and, if its row never committed, its row
again (the store's ``replay`` callback). A segment goes only after every record in it is a
durable blob and the rows it could re-create are flushed (the store's ``sync_rows``); a
corrupt segment is kept as ``*.corrupt`` for inspection.

Deleted studies: each record is moved under the store's ``guard(header)``, which holds the
study's lock in the database and says whether the study was deleted meanwhile (by any replica:
the tombstone is a row of ``deletions``). A record of a deleted study is dropped, neither put
into the blob store nor replayed: a DeleteStudy served by another replica is not undone by this
replica's later drain or start-up recovery. The lock orders the put and the deletion's purge: a
put before the purge is a blob the deletion's sweep finds (and deletes after its grace period);
after the purge the tombstone is seen and nothing is put.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import DataLoss
from atlasflow.ingest.spool import InstanceSpool

log = logging.getLogger(__name__)


class SpoolDrain:
    """Drains `spool` into `blobs`. `lock` is the store's lock (it serialises the spool's
    writers and the rows); `replay(header, data)` re-creates a spooled record's row (called
    under `lock`, recovery only); `sync_rows()` makes every committed row durable (under `lock`);
    `guard(header)` is entered around each record's move and yields False when the record's study
    was deleted (the record is then dropped; see the module doc). Thread-safe: one drain at a time."""

    def __init__(
        self,
        spool: InstanceSpool,
        blobs: BlobStore,
        lock: threading.RLock,
        replay: Callable[[dict[str, Any], bytes], object],
        sync_rows: Callable[[], None],
        guard: Callable[[dict[str, Any]], AbstractContextManager[bool]] | None = None,
    ) -> None:
        self.spool = spool
        self.blobs = blobs
        self.lock = lock
        self._replay = replay
        self._sync_rows = sync_rows
        self._guard = guard
        #: records of deleted studies dropped by this process's drains (not put, not replayed)
        self.dropped_deleted = 0
        self._drain_lock = threading.Lock()

    def drain(self) -> int:
        """Move every spooled record into the blob store; delete drained segments.

        Returns the number of records moved. Safe to call from any thread at any time.
        """
        with self._drain_lock:
            with self.lock:
                self.spool.seal()
                segments = self.spool.segments()
                self.spool.pending_bytes = 0
            moved = 0
            for seg in segments:
                moved += self._drain_segment(seg, recovering=False)
            return moved

    def drain_if_idle(self, idle_s: float = 1.0, max_pending_bytes: int = 1 << 30) -> int:
        """`drain()` when nothing was spooled for `idle_s` seconds (or too much is pending):
        keeps blob-store writes (file creation, the slow part) out of a C-STORE burst."""
        idle = time.monotonic() - self.spool.last_append >= idle_s
        if not self.spool.pending_bytes:
            if idle:
                self.spool.prepare_spares()
            return 0
        if not idle and self.spool.pending_bytes < max_pending_bytes:
            return 0
        moved = self.drain()
        self.spool.prepare_spares()
        return moved

    def recover(self) -> int:
        """Replay spool segments left by a previous process (start-up). Returns records."""
        with self._drain_lock:
            with self.lock:
                self.spool.seal()
                segments = self.spool.segments()
            moved = sum(self._drain_segment(seg, recovering=True) for seg in segments)
        if moved:
            log.info("spool recovered", extra={"fields": {"records": moved, "segments": len(segments)}})
        return moved

    def _drain_segment(self, seg: Path, *, recovering: bool) -> int:
        moved = 0
        try:
            for header, data in InstanceSpool.read_segment(seg):
                if self._guard is None:
                    self._put(seg, header, data)
                    if recovering:
                        with self.lock:
                            self._replay(header, data)
                    moved += 1
                    continue
                with self._guard(header) as live:
                    if live:
                        self._put(seg, header, data)
                if not live:  # its study was deleted (by any replica): dropped
                    self.dropped_deleted += 1
                    log.info("spooled instance of a deleted study dropped", extra={"fields": {"segment": seg.name}})
                    continue
                if recovering:  # outside the guard: the replay takes the study's lock itself
                    with self.lock:
                        self._replay(header, data)
                moved += 1
        except DataLoss:
            log.error(
                "spool segment corrupt; kept for inspection",
                extra={"fields": {"segment": seg.name, "records_moved": moved}},
            )
            with self.lock:
                self.spool.forget(seg)
            seg.rename(seg.with_suffix(".corrupt"))
            return moved
        with self.lock:
            self._sync_rows()  # rows replayable from this segment are durable before it goes
            self.spool.recycle(seg)
        return moved

    def _put(self, seg: Path, header: dict[str, Any], data: bytes) -> None:
        """One record's bytes into the blob store (DataLoss when they do not match its digest)."""
        info = self.blobs.put(data)
        if info.digest != header["digest"]:
            raise DataLoss(
                "SPOOL_CORRUPT",
                "spooled bytes do not match their digest",
                domain="atlasflow.ingest",
                metadata={"segment": seg.name},
            )
