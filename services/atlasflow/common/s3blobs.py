"""The blob store on any S3-compatible object store (AWS S3, MinIO, Ceph RGW): `S3BlobStore`.

Client: boto3 (botocore + s3transfer). Chosen over obstore because it is the reference S3 client
that AWS maintains and every S3-compatible store tests against; its blocking API fits the
services, which run blob I/O in worker threads (`asyncio.to_thread`); retries with exponential
backoff and jitter are client configuration (``retries={"mode": "standard"}``); s3transfer does
multipart upload (parallel parts, abort on failure) of large volumes; it honours the standard
credential chain (AWS_* variables, AWS_SHARED_CREDENTIALS_FILE pointing at a mounted Secret,
web identity / IRSA, instance metadata); and moto, the S3 emulator the contract suite runs
against, is built for it. obstore (Rust, async-first) is faster for many small parallel reads,
but younger, and its blocking calls would buy us nothing here.

Layout: blob ``sha256:<hex>`` is the object ``<prefix>/sha256/<hex[:2]>/<hex>`` (the same path as
`LocalBlobStore`'s, so a directory can be copied to a bucket with ``aws s3 sync``).

- put: single PUT with ``ChecksumSHA256`` (the server refuses bytes that do not match the
  digest) up to ``multipart_threshold_mb``; above it a multipart upload in
  ``multipart_chunk_mb`` parts (each part checksummed by the client). An object appears only
  when the upload completes: a reader never sees half a blob. Put of existing content is a new
  use of it (the DeleteStudy sweep's grace period): the object is copied onto itself with
  replaced metadata, which refreshes its LastModified without sending the bytes again.
- get / open: every read is hashed and compared with the key's digest; DataLoss BLOB_CORRUPT
  otherwise (nothing of a wrong blob is returned by `get`; `open` raises before its last chunk).
- modified: LastModified (HEAD); delete: HEAD then DELETE (False when it was not there).
- errors: a missing object is NotFound BLOB_NOT_FOUND; a store that cannot be reached or refuses
  us after the retries is Unavailable BLOB_STORE_UNAVAILABLE (the bucket in the metadata, never
  credentials).

Buckets should have a lifecycle rule aborting incomplete multipart uploads after a day (a process
killed mid-upload leaves parts behind; s3transfer aborts them on errors it sees).
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from atlasflow.common.blobstore import (
    DOMAIN,
    BlobInfo,
    BlobStream,
    S3Options,
    check_digest,
    corrupt,
    digest_of,
    file_sha256,
    not_found,
)
from atlasflow.common.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

_MISSING = {"404", "NoSuchKey", "NotFound"}


def s3_client(opts: S3Options) -> tuple[S3Client, TransferConfig]:
    """A boto3 S3 client for ``opts`` (endpoint, region, addressing style; standard retries
    with backoff and jitter, ``max_attempts`` per request) and the transfer settings of its
    multipart uploads (``multipart_threshold_mb`` / ``multipart_chunk_mb``). Credentials: boto3's
    standard chain. Shared by the blob store and the labels service's S3 exports."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
        s3={"addressing_style": _addressing_style(opts.addressing_style)},
        connect_timeout=10,
        read_timeout=60,
        # send a checksum only when the operation needs one, so that stores without the
        # newer flexible checksums (older MinIO / Ceph) accept our requests; puts send
        # their own SHA-256 explicitly.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    client: S3Client = session.client(
        "s3",
        endpoint_url=opts.endpoint_url or None,
        region_name=opts.region or None,
        config=config,
    )
    transfer = TransferConfig(
        multipart_threshold=opts.multipart_threshold_mb * 1024 * 1024,
        multipart_chunksize=opts.multipart_chunk_mb * 1024 * 1024,
        max_concurrency=4,
    )
    return client, transfer


class S3BlobStore:
    """Blobs as objects ``<prefix>/sha256/<aa>/<hex>`` in ``bucket``."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        opts = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client, self.transfer = s3_client(opts)

    def key(self, digest: str) -> str:
        hexpart = check_digest(digest)
        return f"{self.prefix}/sha256/{hexpart[:2]}/{hexpart}".lstrip("/")

    # -- writes

    def put(self, data: bytes) -> BlobInfo:
        digest = digest_of(data)
        key = self.key(digest)
        if self._touch(key):
            return BlobInfo(digest, len(data))
        try:
            if len(data) < self.transfer.multipart_threshold:
                sha = base64.b64encode(bytes.fromhex(digest[7:])).decode()
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=sha)
            else:
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, ExtraArgs=UPLOAD_ARGS, Config=self.transfer
                )
        except (ClientError, BotoCoreError) as exc:
            self._unavailable("put", exc)
        return BlobInfo(digest, len(data))

    def put_file(self, path: Path, digest: str | None = None) -> BlobInfo:
        digest = digest or file_sha256(path)
        key = self.key(digest)
        size = path.stat().st_size
        if self._touch(key):
            return BlobInfo(digest, size)
        try:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=UPLOAD_ARGS, Config=self.transfer)
        except (ClientError, BotoCoreError) as exc:
            self._unavailable("put", exc)
        return BlobInfo(digest, size)

    def _touch(self, key: str) -> bool:
        """True when the object exists; then its LastModified is refreshed (copied onto itself
        with new metadata: S3 objects have no mtime of their own to set)."""
        head = self._head(key)
        if head is None:
            return False
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": key},
                self.bucket,
                key,
                ExtraArgs={"Metadata": {"used-at": f"{time.time():.3f}"}, "MetadataDirective": "REPLACE"},
                Config=self.transfer,
            )
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False  # deleted by a sweep in between: write it again
            self._unavailable("put", exc)
        except BotoCoreError as exc:
            self._unavailable("put", exc)
        return True

    # -- reads

    def get(self, digest: str) -> bytes:
        with self.open(digest) as stream:
            data = stream.read()
        # stream.read() verified the digest; checked again so a future change cannot skip it
        got = digest_of(data)
        if got != digest:
            raise corrupt(digest, got)
        return data

    def open(self, digest: str) -> BlobStream:
        key = self.key(digest)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise not_found(digest) from None
            self._unavailable("get", exc)
        except BotoCoreError as exc:
            self._unavailable("get", exc)
        return BlobStream(digest, int(resp["ContentLength"]), _Body(resp["Body"], self, digest))

    def exists(self, digest: str) -> bool:
        return self._head(self.key(digest)) is not None

    def modified(self, digest: str) -> float | None:
        head = self._head(self.key(digest))
        return None if head is None else head["LastModified"].timestamp()

    def delete(self, digest: str) -> bool:
        key = self.key(digest)
        if self._head(key) is None:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            self._unavailable("delete", exc)
        return True

    def _head(self, key: str) -> Any:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            self._unavailable("head", exc)
        except BotoCoreError as exc:
            self._unavailable("head", exc)

    def _unavailable(self, op: str, exc: Exception) -> NoReturn:
        code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
        raise Unavailable(
            "BLOB_STORE_UNAVAILABLE",
            f"object store refused or could not be reached ({op}: {code})",
            domain=DOMAIN,
            metadata={"store": self.url, "operation": op, "code": code},
        ) from exc


#: multipart parts carry a client-computed SHA-256 the server checks per part
UPLOAD_ARGS: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"}


def _addressing_style(style: str) -> Literal["auto", "virtual", "path"]:
    if style == "path":
        return "path"
    if style == "virtual":
        return "virtual"
    if style == "auto":
        return "auto"
    raise InvalidArgument(
        "INVALID_SETTING",
        "BLOB_S3_ADDRESSING_STYLE must be auto, virtual or path",
        domain=DOMAIN,
        metadata={"value": style[:40]},
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _Body:
    """An object's body as a file: reads that fail mid-stream are Unavailable, not a botocore
    error from deep inside a consumer."""

    def __init__(self, body: Any, store: S3BlobStore, digest: str) -> None:
        self._body = body
        self._store = store
        self._digest = digest

    def read(self, n: int = -1, /) -> bytes:
        try:
            return bytes(self._body.read() if n < 0 else self._body.read(n))
        except (BotoCoreError, OSError) as exc:
            self._store._unavailable("get", exc)

    def close(self) -> None:
        self._body.close()


__all__ = ["UPLOAD_ARGS", "S3BlobStore", "s3_client"]
