"""Content-addressed blob store (claim-check pattern): volumes, label maps, heatmaps.

Blobs are immutable and named by `sha256:<hex>` of their bytes. Every read verifies the digest.
`put` is durable when it returns: the bytes are written to a temporary file, fsync'd, renamed
into place and the directory fsync'd. The local directory backend is the embedded default; an
object-storage backend implements the same `BlobStore` protocol.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from atlasflow.common.errors import DataLoss, InvalidArgument, NotFound


@dataclass(frozen=True)
class BlobInfo:
    digest: str  # "sha256:<64 hex>"
    size_bytes: int


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    def put(self, data: bytes) -> BlobInfo: ...
    def get(self, digest: str) -> bytes: ...
    def exists(self, digest: str) -> bool: ...


def _check_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(
            "INVALID_BLOB_DIGEST",
            "blob digest must be 'sha256:<64 lowercase hex>'",
            domain="atlasflow.blobs",
            metadata={"digest": digest[:80]},
        )
    return hexpart


class LocalBlobStore:
    """Blobs as files `<root>/sha256/<aa>/<hex>`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexpart = _check_digest(digest)
        return self.root / "sha256" / hexpart[:2] / hexpart

    def put(self, data: bytes) -> BlobInfo:
        digest = digest_of(data)
        dest = self.path(digest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dfd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        else:
            # a put of existing content is a new use of it: the deletion sweep keeps blobs
            # touched within its grace period (`atlasflow.ingest.deletion`)
            try:
                os.utime(dest)
            except OSError:
                pass
        return BlobInfo(digest, len(data))

    def get(self, digest: str) -> bytes:
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                "BLOB_NOT_FOUND", "blob not found", domain="atlasflow.blobs", metadata={"digest": digest}
            ) from None
        if digest_of(data) != digest:
            raise DataLoss(
                "BLOB_CORRUPT",
                "blob content does not match its digest",
                domain="atlasflow.blobs",
                metadata={"digest": digest},
            )
        return data

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
