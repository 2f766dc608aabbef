"""Content-addressed blob store (claim-check pattern): volumes, label maps, heatmaps.

Blobs are immutable and named by `sha256:<hex>` of their bytes. Every read verifies the digest
(`get`, and `open` when the stream reaches its end): bytes that do not hash to their name are
refused with DataLoss BLOB_CORRUPT, never returned. `put` is durable when it returns.

Two back-ends implement `BlobStore`, chosen by one URL (`open_blob_store`, the services'
``BLOB_URL`` setting):

- `LocalBlobStore`, a directory (a path or ``file://``; the embedded default): the bytes are
  written to a temporary file, fsync'd, renamed into place and the directory fsync'd.
- `atlasflow.common.s3blobs.S3BlobStore`, any S3-compatible object store (``s3://bucket/prefix``):
  keys ``<prefix>/sha256/<aa>/<hex>``, multipart upload of large blobs, retries with backoff.

Deletion contract (what the DeleteStudy sweep, `atlasflow.ingest.deletion`, relies on): `put` of
content that already exists is a new use of it and refreshes `modified`; `modified` is None for
an absent blob; `delete` is False when the blob was not there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlparse

from atlasflow.common.disk import write_atomically
from atlasflow.common.errors import DataLoss, InvalidArgument, NotFound

DOMAIN = "atlasflow.blobs"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class BlobInfo:
    digest: str  # "sha256:<64 hex>"
    size_bytes: int


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """The 64 lowercase hex digits of ``digest`` ("sha256:<hex>"); InvalidArgument otherwise."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(
            "INVALID_BLOB_DIGEST",
            "blob digest must be 'sha256:<64 lowercase hex>'",
            domain=DOMAIN,
            metadata={"digest": digest[:80]},
        )
    return hexpart


_check_digest = check_digest  # the old private name


def not_found(digest: str) -> NotFound:
    return NotFound("BLOB_NOT_FOUND", "blob not found", domain=DOMAIN, metadata={"digest": digest})


def corrupt(digest: str, got: str) -> DataLoss:
    return DataLoss(
        "BLOB_CORRUPT",
        "blob content does not match its digest (the store returned other bytes than were put)",
        domain=DOMAIN,
        metadata={"digest": digest, "read_digest": got},
    )


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Readable(Protocol):
    """A binary stream: a file, or an object store's response body."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class BlobStream:
    """A stored blob read sequentially: ``size_bytes`` known up front, every byte read hashed,
    and at the end of the stream the hash compared with the digest: DataLoss BLOB_CORRUPT
    instead of the last (empty) read when they differ, or when the stream ends short."""

    def __init__(self, digest: str, size_bytes: int, raw: Readable) -> None:
        self.digest = digest
        self.size_bytes = size_bytes
        self._raw = raw
        self._hash = hashlib.sha256()
        self._read = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read() if n < 0 else self._raw.read(n)
        self._hash.update(data)
        self._read += len(data)
        if n < 0 or self._read >= self.size_bytes or (n > 0 and not data):
            self._finish()
        return data

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        got = "sha256:" + self._hash.hexdigest()
        if self._read != self.size_bytes:
            # the stream ended short (or long): the store lost bytes, or the connection broke
            raise corrupt(self.digest, f"read {self._read} of {self.size_bytes} bytes")
        if got != self.digest:
            raise corrupt(self.digest, got)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The rest of the blob in chunks; the digest is checked before the last chunk is
        yielded, so a consumer never receives the end of a wrong blob."""
        while True:
            chunk = self.read(chunk_bytes)
            if self._checked:
                if chunk:
                    yield chunk
                return
            yield chunk

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore(Protocol):
    """What every service needs of the blob store; both back-ends pass the same contract suite
    (tests/common/test_common_blobstore.py)."""

    #: where the blobs are (a directory, or s3://bucket/prefix), for logs and errors
    url: str

    def put(self, data: bytes) -> BlobInfo:
        """Store ``data``; durable when it returns. Existing content: refreshes `modified`."""
        ...

    def put_file(self, path: Path, digest: str | None = None) -> BlobInfo:
        """Store the file ``path`` without reading it into memory (large volumes: multipart on
        S3); ``digest`` when the caller already hashed it. The file is left in place."""
        ...

    def get(self, digest: str) -> bytes:
        """The blob's bytes, verified; NotFound BLOB_NOT_FOUND, DataLoss BLOB_CORRUPT."""
        ...

    def open(self, digest: str) -> BlobStream:
        """The blob as a verified stream (close it); NotFound BLOB_NOT_FOUND."""
        ...

    def exists(self, digest: str) -> bool: ...

    def modified(self, digest: str) -> float | None:
        """When the blob was last written or put again (seconds since the epoch); None if absent."""
        ...

    def delete(self, digest: str) -> bool:
        """Remove the blob; False when it was not there (only the deletion sweep calls this)."""
        ...


class LocalBlobStore:
    """Blobs as files `<root>/sha256/<aa>/<hex>`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexpart = check_digest(digest)
        return self.root / "sha256" / hexpart[:2] / hexpart

    def put(self, data: bytes) -> BlobInfo:
        digest = digest_of(data)
        dest = self.path(digest)
        if not self._touch(dest):
            self._write(dest, lambda f: f.write(data))
        return BlobInfo(digest, len(data))

    def put_file(self, path: Path, digest: str | None = None) -> BlobInfo:
        digest = digest or file_sha256(path)
        dest = self.path(digest)
        size = path.stat().st_size
        if not self._touch(dest):
            with path.open("rb") as src:
                self._write(dest, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES))
        return BlobInfo(digest, size)

    @staticmethod
    def _touch(dest: Path) -> bool:
        """True when ``dest`` exists; then a put of existing content is a new use of it: the
        deletion sweep keeps blobs touched within its grace period (`atlasflow.ingest.deletion`)."""
        if not dest.exists():
            return False
        try:
            os.utime(dest)
        except FileNotFoundError:
            return False  # deleted by a sweep in between: write it again
        except OSError:
            pass
        return True

    @staticmethod
    def _write(dest: Path, write: Callable[[IO[bytes]], object]) -> None:
        write_atomically(dest, write)

    def get(self, digest: str) -> bytes:
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise not_found(digest) from None
        got = digest_of(data)
        if got != digest:
            raise corrupt(digest, got)
        return data

    def open(self, digest: str) -> BlobStream:
        p = self.path(digest)
        try:
            f = p.open("rb")
        except FileNotFoundError:
            raise not_found(digest) from None
        return BlobStream(digest, os.fstat(f.fileno()).st_size, f)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def modified(self, digest: str) -> float | None:
        """When the blob was last written or put again (seconds since the epoch); None if absent."""
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, digest: str) -> bool:
        """Remove the blob; False when it was not there. Only the deletion sweep calls this, for
        a blob that no row of any service references (`atlasflow.ingest.deletion`)."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store (the ``BLOB_S3_*`` settings). Credentials are not
    here: boto3's standard chain finds them (AWS_* variables, AWS_SHARED_CREDENTIALS_FILE — e.g.
    a mounted Secret —, web identity / IRSA, instance profile)."""

    endpoint_url: str = ""  # empty: AWS S3 of the region
    region: str = ""
    addressing_style: str = "auto"  # "path" for most MinIO / Ceph RGW set-ups
    max_attempts: int = 8  # per request, with the client's exponential backoff and jitter
    multipart_threshold_mb: int = 64
    multipart_chunk_mb: int = 16


def open_blob_store(url: str, s3: S3Options | None = None) -> BlobStore:
    """The blob store at ``url``: a directory path or ``file:///path`` (`LocalBlobStore`), or
    ``s3://bucket[/prefix]`` (`atlasflow.common.s3blobs.S3BlobStore`, with ``s3``'s endpoint,
    region and retry settings). InvalidArgument BLOB_URL_INVALID for anything else."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(
                "BLOB_URL_INVALID",
                "s3:// blob URL needs a bucket: s3://bucket/prefix",
                domain=DOMAIN,
                metadata={"url": url[:200]},
            )
        from atlasflow.common.s3blobs import S3BlobStore  # boto3 only when S3 is used

        return S3BlobStore(parsed.netloc, parsed.path.strip("/"), s3 or S3Options())
    if parsed.scheme == "file":
        return LocalBlobStore(unquote(parsed.path))
    if parsed.scheme == "" and url:
        return LocalBlobStore(url)
    raise InvalidArgument(
        "BLOB_URL_INVALID",
        "blob URL must be a directory path, file:///path or s3://bucket/prefix",
        domain=DOMAIN,
        metadata={"url": url[:200]},
    )
