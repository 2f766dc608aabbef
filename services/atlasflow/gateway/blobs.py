"""Blob bodies for HTTP: a stored blob streamed in chunks, its digest checked on the way.

The gateway reads a blob only after a gRPC call made as the user returned its `BlobRef` (the
service's policy decided that the user may see it). The response carries Content-Length; when
the bytes do not hash to the digest the stream is aborted before its end (the client sees a
truncated body, never a silently wrong one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from starlette.responses import StreamingResponse

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import DataLoss, NotFound

CHUNK_BYTES = 1 << 20


def _chunks(path: Path, digest: str) -> Iterator[bytes]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            yield chunk
    if "sha256:" + h.hexdigest() != digest:
        raise DataLoss("BLOB_CORRUPT", "blob content does not match its digest", domain="atlasflow.blobs")


def blob_response(
    store: LocalBlobStore, digest: str, name: str, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """``digest``'s bytes as a download named ``name`` (``.nii.gz`` or ``.nii`` appended by the
    content); `NotFound` BLOB_NOT_FOUND when the store lacks it."""
    path = store.path(digest)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    except FileNotFoundError:
        raise NotFound(
            "BLOB_NOT_FOUND", "blob not found", domain="atlasflow.blobs", metadata={"digest": digest}
        ) from None
    filename = f"{name}.nii.gz" if gz else f"{name}.nii"
    return StreamingResponse(
        _chunks(path, digest),
        media_type="application/gzip" if gz else "application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'inline; filename="{filename}"',
            "ETag": f'"{digest}"',
            "Cache-Control": "private, max-age=3600, immutable",
            **(headers or {}),
        },
    )
