"""Durable instance spool and series bookkeeping for the ingest service (no grpc).

An instance is durable when `store_instance` returns: its bytes are in an fdatasync'd spool
record (a redo log, see "Spool" below) and its row is committed (SQLite WAL). Only then does the
caller acknowledge it (C-STORE Success, or a gRPC receipt).

Identity: atlasflow never exposes DICOM UIDs. `series_id`/`case_id` are salted-free SHA-256
prefixes of the Series/Study Instance UIDs (stable across restarts and replicas).

Versions: a series version collects instances while RECEIVING; after the quiet period (or an
explicit commit) it is ASSEMBLED into a volume and the segmentation hand-off is queued in the
outbox in the same transaction. An instance that arrives after assembly opens version + 1,
which re-assembles with every instance of the series: never a silent change to a version.

Duplicates: the same SOP Instance UID with the same content is stored once (reported
duplicate, counted in the version's `duplicate_count`); with different content the first is kept
and the second is recorded in `instance_conflicts` (counted in `conflict_count`); its bytes are
kept too. "Same content" compares `content_key`s (see `content_key`), not file bytes: the
C-STORE path stores pynetdicom's re-encoding (its own preamble and File Meta, possibly another
transfer syntax) of an instance the gRPC path receives as the sender's file, and both must be
recognised as the same instance.

Spool (the fast durable path)
-----------------------------
Creating a file is what costs on ext4: a blob put (temp file, fsync, rename, directory fsync)
takes ~7.5 ms on this kind of machine, an append + fdatasync to an open file ~0.5 ms and a small
SQLite WAL commit ~0.2 ms. So `store_instance` makes an instance durable in two steps, both
before it returns:

1. the bytes are appended to the open spool segment (`<data_dir>/spool/seg-<n>.log`) as one
   record (header with the identity UIDs and the SHA-256 digest, the bytes, a CRC-32 of both)
   and the segment is fdatasync'd;
2. the row (or conflict row) that names the digest is committed, with synchronous=NORMAL: the
   commit reaches the WAL file but does not flush it, because the spool record of step 1 is the
   redo log of that row (start-up recovery re-creates a row that a power loss took away). The
   rows are flushed (`_sync_db`) before any spool segment is recycled. One flush per instance
   instead of two; everything else in the database (series states, the outbox, uploads) is
   committed with synchronous=FULL.

The bytes move from the spool into the content-addressed blob store later (`drain`, called
when reception is idle, before any read of instance digests and at start-up); a segment file is
deleted only after every record in it is a durable blob. Start-up recovery replays every
remaining segment: each complete record becomes a blob and, if its row never committed (a crash
between steps 1 and 2: the instance was not acknowledged), its row. A torn last record (a crash
inside step 1) is dropped: it was never acknowledged either. A corrupt record in the middle
(media error) stops the replay of that segment, which is kept as ``*.corrupt`` for inspection.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import write_data_element

from atlasflow.common import sqlite as db
from atlasflow.common.blobstore import BlobStore, digest_of
from atlasflow.common.errors import Aborted, DataLoss, InvalidArgument, NotFound
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
    """
    ALTER TABLE series_versions ADD COLUMN duplicate_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series_versions ADD COLUMN conflict_count INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX instance_conflicts_key ON instance_conflicts(series_id, sop_key, digest);
    """,
    # content_key: see `content_key`; '' = not computed yet (rows written before it existed, and
    # first receptions: computed from the stored bytes when the SOP Instance UID comes again)
    """
    ALTER TABLE instances ADD COLUMN content_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE instance_conflicts ADD COLUMN content_key TEXT NOT NULL DEFAULT '';
    """,
    # resumable gRPC uploads (see `IngestStore.upload_write`)
    """
    CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY,
        committed_offset INTEGER NOT NULL,
        complete INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT NOT NULL DEFAULT '',
        receipt_json TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL
    );
    """,
    # series versions by the volume they assembled (`series_by_volume`, StreamSeriesInstances)
    """
    CREATE INDEX series_by_volume ON series_versions(volume_digest, update_time);
    """,
]

log = logging.getLogger(__name__)


def atlas_id(prefix: str, uid: str) -> str:
    return f"{prefix}-{hashlib.sha256(uid.encode()).hexdigest()[:20]}"


def content_key(ds: Dataset) -> str:
    """Digest of a DICOM data set's content, independent of how it was framed and encoded.

    ``"sha256:<hex>"`` over every element in tag order, recursively into sequences, each as
    tag + 32-bit length + little-endian value bytes (the Implicit VR Little Endian framing,
    without VRs), leaving out the File Meta group (0002,xxxx), group lengths (gggg,0000) and
    (FFFC,FFFC) DataSetTrailingPadding; sequences and items are hashed by content, so
    defined- and undefined-length encodings agree. Consequences: the same instance as a
    Part-10 file (any preamble, any File Meta) and as re-encoded by a C-STORE peer or by
    pynetdicom has one key, whether the transfer syntax was Implicit or Explicit VR Little
    Endian or Deflated Explicit VR Little Endian (pydicom inflates on read). Values of an
    encapsulated (compressed) transfer syntax are hashed as their encapsulated bytes: the same
    pixels compressed differently are different content (a recorded conflict, never a silent
    replacement). Explicit VR Big Endian (retired) keeps OB/OW values in big-endian byte order.

    Converts the data set's raw elements in place (values are unchanged). Returns "" when an
    element's value cannot be converted (malformed but accepted input): callers then compare
    file bytes (`IngestStore.store_instance`'s default).
    """
    parts: list[bytes] = []
    try:
        _canonical(parts, ds)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert: fall back to bytes
        return ""
    return "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()


def content_key_of_bytes(data: bytes) -> str:
    """`content_key` of DICOM Part-10 bytes (a preamble, or a stream that starts with File
    Meta); "" when they do not parse as DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_preamble and data[:2] != b"\x02\x00":
        return ""
    try:
        ds = dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, Exception):  # noqa: BLE001 - not DICOM: compared by bytes
        return ""
    return content_key(ds)


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item
_ITEM_END = b"\xfe\xff\x0d\xe0"  # (FFFE,E00D) Item Delimitation Item
_HEAD = struct.Struct("<HHI")  # group, element, length (Implicit VR LE)


def _implicit_sequence(value: bytes) -> list[Dataset] | None:
    """Items of a value that parses as an Implicit VR Little Endian sequence, else None."""
    try:
        fp = DicomBytesIO(value)
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        seq = read_sequence(fp, True, True, len(value), "iso8859")
        return list(seq) if len(seq) else None
    except Exception:  # noqa: BLE001 - not a sequence after all: hashed as bytes
        return None


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _canonical(parts: list[bytes], ds: Dataset) -> None:
    """Append the canonical encoding of `ds` (see `content_key`) to `parts`."""
    encodings = getattr(ds, "_character_set", None) or ["iso8859"]
    for tag in sorted(ds.keys()):
        t = int(tag)
        if t >> 16 == 0x0002 or t & 0xFFFF == 0 or t == 0xFFFCFFFC:
            continue
        items: list[Dataset] | None = None
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is not None:
            # Fast path: a raw value's bytes are the same in Implicit and Explicit VR Little
            # Endian. Sequences (and undefined-length values that may be one) are parsed.
            vr = raw.VR or _dictionary_vr(t)
            if vr in ("", "UN") and raw.value[:4] == _ITEM:
                items = _implicit_sequence(raw.value)  # e.g. a private SQ read as Implicit VR
            if items is None and vr != "SQ" and (raw.length != 0xFFFFFFFF or t == 0x7FE00010):
                parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(raw.value)))
                parts.append(raw.value)
                continue
        if items is None:
            elem = ds[tag]  # converted (a sequence is parsed into items)
            if elem.VR == "SQ":
                items = list(elem.value)
            elif isinstance(elem.value, (bytes, bytearray)):
                parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(elem.value)))
                parts.append(bytes(elem.value))
                continue
            else:
                out = DicomBytesIO()
                out.is_little_endian = True
                out.is_implicit_VR = True
                write_data_element(out, elem, encodings)
                parts.append(out.getvalue())
                continue
        parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(items)))
        for item in items:
            parts.append(_ITEM)
            _canonical(parts, item)
            parts.append(_ITEM_END)


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

    def append(self, header: dict, data: bytes) -> None:
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
    def read_segment(path: Path) -> Iterator[tuple[dict, bytes]]:
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


@dataclass(frozen=True)
class StoredInstance:
    series_id: str
    case_id: str
    version: int
    duplicate: bool
    conflict: bool
    traceparent: str  # the series' trace


@dataclass(frozen=True)
class UploadState:
    """A resumable upload: `committed_offset` bytes are durable; `receipt` once complete."""

    upload_id: str
    committed_offset: int
    complete: bool
    sha256: str
    receipt: dict


_UPLOAD_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


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
    duplicate_count: int = 0
    conflict_count: int = 0


def _row_to_series(r) -> SeriesVersion:  # type: ignore[no-untyped-def]
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
    )


class IngestStore:
    """Instance spool + series bookkeeping. Thread-safe (one lock around the connection)."""

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
        self._drain_lock = threading.Lock()
        self.blobs = blobs
        self.spool = InstanceSpool(Path(data_dir) / "spool", spool_segment_bytes, spool_spares)
        self.uploads_dir = Path(data_dir) / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.recover()

    def close(self) -> None:
        with self.lock:
            self.spool.seal()
            self.conn.close()

    # ---------------------------------------------------------------------- resumable uploads
    #
    # One partial file per upload under <data_dir>/uploads/, named by the SHA-256 of the
    # upload id. A chunk is durable when `upload_write` returns: written at its offset,
    # fdatasync'd, then the committed offset is committed (SQLite, synchronous=FULL). A crash
    # between the two leaves bytes past the committed offset, which the next write at the
    # committed offset overwrites (and truncates away). Not for concurrent writers of one
    # upload id: the second stream gets OFFSET_MISMATCH once the first has moved on.

    def _upload_path(self, upload_id: str) -> Path:
        return self.uploads_dir / (hashlib.sha256(upload_id.encode()).hexdigest() + ".part")

    @staticmethod
    def check_upload_id(upload_id: str) -> None:
        if not _UPLOAD_ID.match(upload_id):
            raise InvalidArgument(
                "INVALID_UPLOAD_ID", "upload_id must be 1-128 characters of [A-Za-z0-9._-]", domain="atlasflow.ingest"
            )

    def upload_status(self, upload_id: str) -> UploadState:
        """The upload's state; NotFound UPLOAD_NOT_FOUND when nothing of it was committed."""
        with self.lock:
            r = self.conn.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if r is None:
            raise NotFound(
                "UPLOAD_NOT_FOUND",
                "no committed bytes for this upload_id",
                domain="atlasflow.ingest",
                metadata={"upload_id": upload_id[:128]},
            )
        return UploadState(
            r["upload_id"],
            r["committed_offset"],
            bool(r["complete"]),
            r["sha256"],
            json.loads(r["receipt_json"]) if r["receipt_json"] else {},
        )

    def upload_write(self, upload_id: str, offset: int, chunk: bytes) -> UploadState:
        """Durably write `chunk` at `offset` (must equal the committed offset, else Aborted
        OFFSET_MISMATCH with metadata ``expected_offset``). A complete upload is returned
        unchanged (chunks re-sent after completion are ignored: idempotent)."""
        try:
            state = self.upload_status(upload_id)
        except NotFound:
            state = UploadState(upload_id, 0, False, "", {})
        if state.complete:
            return state
        if offset != state.committed_offset:
            raise Aborted(
                "OFFSET_MISMATCH",
                "chunk offset is not the upload's committed offset",
                domain="atlasflow.ingest",
                metadata={
                    "upload_id": upload_id[:128],
                    "expected_offset": str(state.committed_offset),
                    "offset": str(offset),
                },
            )
        path = self._upload_path(upload_id)
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
            dfd = os.open(self.uploads_dir, os.O_RDONLY)
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

    def upload_read(self, upload_id: str) -> bytes:
        """The committed bytes of an incomplete upload."""
        state = self.upload_status(upload_id)
        path = self._upload_path(upload_id)
        with open(path, "rb") as f:
            return f.read(state.committed_offset)

    def upload_complete(self, upload_id: str, sha256: str, receipt: dict) -> None:
        """Record the upload as complete (after its instance is durable) with its receipt;
        the partial file goes."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute(
                "UPDATE uploads SET complete = 1, sha256 = ?, receipt_json = ?, update_time = ? WHERE upload_id = ?",
                (sha256, json.dumps(receipt), time.time(), upload_id),
            )
        self._upload_path(upload_id).unlink(missing_ok=True)

    def upload_discard(self, upload_id: str) -> None:
        """Forget an incomplete upload (its bytes were refused: a retry starts over)."""
        with self.lock, db.transaction(self.conn):
            self.conn.execute("DELETE FROM uploads WHERE upload_id = ? AND complete = 0", (upload_id,))
        self._upload_path(upload_id).unlink(missing_ok=True)

    def purge_uploads(self, max_age_s: float) -> int:
        """Drop upload records (and partial files) untouched for `max_age_s` seconds."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT upload_id FROM uploads WHERE update_time < ?", (time.time() - max_age_s,)
            ).fetchall()
        for r in rows:
            with self.lock, db.transaction(self.conn):
                self.conn.execute("DELETE FROM uploads WHERE upload_id = ?", (r["upload_id"],))
            self._upload_path(r["upload_id"]).unlink(missing_ok=True)
        return len(rows)

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
        self, header: dict, data: bytes, *, recovering: bool, key_fn: Callable[[], str] | None = None
    ) -> StoredInstance:
        """Under self.lock: check for a duplicate, spool the bytes (unless `recovering`:
        replay of a spooled record, already durable), commit the row.

        Content keys are computed only here, and only when the SOP Instance UID is already
        stored with other bytes (same bytes: a duplicate without one). A row's content_key
        '' means "not computed".
        """
        series_id = atlas_id("ser", header["series_uid"])
        case_id = atlas_id("case", header["study_uid"])
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
                    key = (key_fn() if key_fn is not None else "") or content_key_of_bytes(data) or digest
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
            return self._commit_row(series_id, case_id, sop_key, digest, key, len(data), now, header, cur, existing)
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
        header: dict,
        cur,
        existing,
    ) -> StoredInstance:  # type: ignore[no-untyped-def]
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

    # --------------------------------------------------------------------- spool -> blob store

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

    def _drain_segment(self, seg: Path, *, recovering: bool) -> int:
        moved = 0
        try:
            for header, data in InstanceSpool.read_segment(seg):
                info = self.blobs.put(data)
                if info.digest != header["digest"]:
                    raise DataLoss(
                        "SPOOL_CORRUPT",
                        "spooled bytes do not match their digest",
                        domain="atlasflow.ingest",
                        metadata={"segment": seg.name},
                    )
                if recovering:
                    with self.lock:
                        self._record(header, data, recovering=True)
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
            self._sync_db()  # rows replayable from this segment are durable before it goes
            self.spool.recycle(seg)
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
        self.drain()
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
        geometry: dict,
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
