"""Blob bodies for HTTP: a stored blob streamed in chunks, its digest checked on the way.

The gateway reads a blob only after a gRPC call made as the user returned its `BlobRef` (the
service's policy decided that the user may see it). The response carries Content-Length; when
the bytes do not hash to the digest the stream is aborted before its end (the client sees a
truncated body, never a silently wrong one).
"""

from __future__ import annotations

from collections.abc import Iterator

from starlette.responses import StreamingResponse

from atlasflow.common.blobstore import CHUNK_BYTES, BlobStore, BlobStream


def _chunks(head: bytes, stream: BlobStream) -> Iterator[bytes]:
    """``head`` then the rest; `BlobStream` raises DataLoss BLOB_CORRUPT before the last chunk
    of bytes that do not hash to the digest."""
    try:
        if head:
            yield head
        yield from stream.chunks(CHUNK_BYTES)
    finally:
        stream.close()


def blob_response(store: BlobStore, digest: str, name: str, headers: dict[str, str] | None = None) -> StreamingResponse:
    """``digest``'s bytes as a download named ``name`` (``.nii.gz`` or ``.nii`` appended by the
    content); `NotFound` BLOB_NOT_FOUND when the store lacks it."""
    stream = store.open(digest)
    try:
        head = stream.read(2)
    except BaseException:
        stream.close()
        raise
    gz = head == b"\x1f\x8b"
    filename = f"{name}.nii.gz" if gz else f"{name}.nii"
    return StreamingResponse(
        _chunks(head, stream),
        media_type="application/gzip" if gz else "application/octet-stream",
        headers={
            "Content-Length": str(stream.size_bytes),
            "Content-Disposition": f'inline; filename="{filename}"',
            "ETag": f'"{digest}"',
            "Cache-Control": "private, max-age=3600, immutable",
            **(headers or {}),
        },
    )
