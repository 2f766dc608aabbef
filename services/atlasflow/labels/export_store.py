"""Where an export's files go: one small writer interface, two back-ends (no grpc).

`ExportDestination` is what the export (atlasflow.labels.export, the worker) writes through:

- ``prepare()``: before the first case; removes a manifest an earlier export left there, so a
  consumer never takes a half-rewritten dataset for a complete one;
- ``write_case(case, files)``: one case's files ({relative path: bytes}) under ``<case>/``,
  replacing the case whole (files of an earlier export of the case that this one does not write
  are removed);
- ``write_manifest(data)``: ``manifest.json``, written LAST: the dataset is complete (every file
  the manifest lists, with its sha256) exactly when the manifest exists. A cancelled, failed or
  taken-over job never writes it.

`LocalDestination`: a directory (file:// destinations); each case is written into a temporary
sibling with fsync and renamed into place, the manifest likewise.

`S3Destination`: ``s3://<bucket>/<prefix>`` on an S3-compatible object store, through the
blob store's client (`atlasflow.common.s3blobs.s3_client`: endpoint, region, retries with
backoff, credentials from boto3's standard chain). Each file is one object
``<prefix>/<case>/<path>``: a single PUT with ``ChecksumSHA256`` (the store refuses bytes that
do not match) below the multipart threshold, a multipart upload with per-part SHA-256 above
it; every object carries its whole-file sha256 as user metadata ``sha256`` (the manifest lists
the same). A case's objects appear one by one (S3 has no rename); the manifest object, written
last, is what makes the dataset visible. Which buckets and prefixes a job may write to is the
server's configuration (`S3Exports`, labels setting EXPORT_S3_PREFIXES): a caller cannot name
another.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import unquote, urlparse

from atlasflow.common.blobstore import S3Options
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from types_boto3_s3.client import S3Client

DOMAIN = "atlasflow.labels"
MANIFEST = "manifest.json"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")


class ExportDestination(Protocol):
    """Where one export job writes (see the module docstring)."""

    url: str

    def prepare(self) -> None: ...

    def write_case(self, case_name: str, files: Mapping[str, bytes]) -> None: ...

    def write_manifest(self, data: bytes) -> None: ...


# ------------------------------------------------------------------ local directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalDestination:
    """A local directory: cases written in a temporary sibling and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else str(self.root)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / MANIFEST
        if manifest.exists():
            manifest.unlink()
            _fsync_dir(self.root)

    def write_case(self, case_name: str, files: Mapping[str, bytes]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{case_name}.tmp-"))
        try:
            dirs = {tmp}
            for rel, data in files.items():
                _write_file(tmp / rel, data)
                dirs.add((tmp / rel).parent)
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
            final = self.root / case_name
            if final.exists():
                old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{case_name}.old-"))
                os.replace(final, old / "case")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_manifest(self, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)


# ------------------------------------------------------------------ S3


@dataclass(frozen=True)
class S3Exports:
    """The server's S3 export configuration: the allowed ``(bucket, prefix)`` pairs (a job may
    write to the prefix or below it; prefix "" = the whole bucket) and how to reach the store."""

    allowed: tuple[tuple[str, str], ...]
    options: S3Options = field(default_factory=S3Options)

    def allows(self, bucket: str, prefix: str) -> bool:
        return any(bucket == b and (not p or prefix == p or prefix.startswith(p + "/")) for b, p in self.allowed)


def parse_s3_uri(uri: str, *, field_name: str = "destination_uri") -> tuple[str, str]:
    """(bucket, prefix) of ``s3://<bucket>/<prefix>``: a valid bucket name, a prefix of
    ``/``-separated segments of [A-Za-z0-9._=+-] (not starting with a dot: no ``.``/``..``),
    no query or fragment. InvalidArgument("INVALID_DESTINATION", metadata "field") otherwise."""

    def bad(message: str) -> NoReturn:
        raise InvalidArgument("INVALID_DESTINATION", message, domain=DOMAIN, metadata={"field": field_name})

    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        bad("an s3 destination must be s3://bucket/prefix")
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        bad("destination_uri must not carry a query or fragment")
    bucket = parsed.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        bad("s3 destination: the bucket must be a valid bucket name (3-63 of a-z 0-9 . -)")
    prefix = unquote(parsed.path).strip("/")
    if prefix and not all(_SEGMENT.match(s) for s in prefix.split("/")):
        bad("s3 destination: the prefix must be /-separated names of [A-Za-z0-9._=+-], none starting with a dot")
    if len(prefix) > 512:
        bad("s3 destination: the prefix is longer than 512 characters")
    return bucket, prefix


def parse_s3_prefixes(text: str, options: S3Options | None = None) -> S3Exports | None:
    """The S3 exports of the server's configuration (labels setting EXPORT_S3_PREFIXES): a
    comma-separated list of ``s3://bucket[/prefix]``. "" -> None (s3:// destinations refused).
    Raises ValueError (the service refuses to start) for a malformed entry."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        return None
    allowed = []
    for entry in entries:
        try:
            allowed.append(parse_s3_uri(entry, field_name="EXPORT_S3_PREFIXES"))
        except InvalidArgument as exc:
            raise ValueError(f"EXPORT_S3_PREFIXES: {entry[:200]!r}: {exc}") from None
    return S3Exports(tuple(allowed), options or S3Options())


def check_s3_destination(uri: str, exports: S3Exports) -> tuple[str, str]:
    """(bucket, prefix) of an s3:// destination the configuration allows;
    InvalidArgument("INVALID_DESTINATION") when malformed, ("DESTINATION_NOT_ALLOWED",
    metadata "bucket") when outside every allowed prefix."""
    bucket, prefix = parse_s3_uri(uri)
    if not exports.allows(bucket, prefix):
        raise InvalidArgument(
            "DESTINATION_NOT_ALLOWED",
            "destination must lie under one of the server's export prefixes (labels EXPORT_S3_PREFIXES)",
            domain=DOMAIN,
            metadata={"bucket": bucket},
        )
    return bucket, prefix


class S3Destination:
    """``s3://bucket/prefix``: one object per file, the manifest object last."""

    def __init__(self, bucket: str, prefix: str, options: S3Options | None = None) -> None:
        from atlasflow.common.s3blobs import s3_client  # boto3 only when S3 is used

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client: S3Client
        self.transfer: TransferConfig
        self.client, self.transfer = s3_client(options or S3Options())

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}".lstrip("/")

    def prepare(self) -> None:
        self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(MANIFEST)))

    def write_case(self, case_name: str, files: Mapping[str, bytes]) -> None:
        written = set()
        for rel, data in files.items():
            key = self.key(f"{case_name}/{rel}")
            self.put(key, data)
            written.add(key)
        # what an earlier export of this case wrote and this one does not (e.g. its DICOM SEG)
        stale = [k for k in self._list(self.key(case_name) + "/") if k not in written]
        for k in stale:
            self._call("delete", lambda k=k: self.client.delete_object(Bucket=self.bucket, Key=k))

    def write_manifest(self, data: bytes) -> None:
        self.put(self.key(MANIFEST), data)

    def put(self, key: str, data: bytes) -> None:
        """One object: a single PUT with ChecksumSHA256, or a multipart upload (per-part SHA-256)
        from the multipart threshold on; the whole file's sha256 as metadata ``sha256``."""
        from atlasflow.common.s3blobs import UPLOAD_ARGS

        digest = hashlib.sha256(data).digest()
        metadata = {"sha256": digest.hex()}
        if len(data) < self.transfer.multipart_threshold:
            sha = base64.b64encode(digest).decode()
            self._call(
                "put",
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=sha, Metadata=metadata
                ),
            )
        else:
            extra = {**UPLOAD_ARGS, "Metadata": metadata}
            self._call(
                "put",
                lambda: self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=self.transfer
                ),
            )

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, Any] = {}
        while True:
            page: Any = self._call(
                "list", lambda token=token: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **token)
            )
            keys += [str(o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _call(self, op: str, fn: Any) -> Any:
        """Run a client call; a store that refuses or cannot be reached after the client's
        retries is Unavailable("DESTINATION_WRITE_FAILED") (bucket and operation in the
        metadata, never credentials)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
        except BotoCoreError as exc:
            code = type(exc).__name__
        raise Unavailable(
            "DESTINATION_WRITE_FAILED",
            f"export object store refused or could not be reached ({op}: {code})",
            domain=DOMAIN,
            metadata={"destination": self.url[:200], "operation": op, "code": code},
        )


def destination_path(uri: str, export_root: Path | None = None) -> Path:
    """The local directory of a file:// destination; inside `export_root` when one is set.

    InvalidArgument("INVALID_DESTINATION") unless `uri` is file:///absolute/dir without a
    query or fragment (labels.proto, ExportDatasetRequest.destination_uri);
    InvalidArgument("DESTINATION_NOT_ALLOWED") outside `export_root`.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must be file:///absolute/dir or s3://bucket/prefix",
            domain=DOMAIN,
            metadata={"scheme": parsed.scheme[:20]},
        )
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must not carry a query or fragment",
            domain=DOMAIN,
            metadata={"field": "destination_uri"},
        )
    path = Path(unquote(parsed.path)).resolve()
    if export_root is not None and not path.is_relative_to(export_root):
        raise InvalidArgument(
            "DESTINATION_NOT_ALLOWED",
            "destination must lie inside the service's export directory",
            domain=DOMAIN,
            metadata={"export_dir": str(export_root)},
        )
    return path


def _not_configured(scheme: str, setting: str) -> NoReturn:
    raise FailedPrecondition(
        "EXPORT_NOT_CONFIGURED",
        f"{scheme}:// exports are not configured on this server (labels {setting})",
        domain=DOMAIN,
        metadata={"scheme": scheme},
    )


def check_destination(uri: str, export_root: Path | None, s3: S3Exports | None) -> None:
    """Where a new export job may write (the servicer, before accepting the job): a file://
    directory inside `export_root` (`destination_path`) or an s3:// prefix `s3` allows
    (`check_s3_destination`). FailedPrecondition("EXPORT_NOT_CONFIGURED", metadata "scheme")
    for a scheme the server has no setting for."""
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        if s3 is None:
            _not_configured("s3", "EXPORT_S3_PREFIXES")
        check_s3_destination(uri, s3)
    elif scheme == "file" and export_root is None:
        _not_configured("file", "EXPORT_DIR")
    else:
        destination_path(uri, export_root)


def open_destination(uri: str, s3: S3Exports | None = None) -> ExportDestination:
    """The writer of a job's destination (the worker): `S3Destination` for s3:// (checked
    against `s3` again: the configuration may have changed since the job was accepted),
    `LocalDestination` for file:// (checked when the job was accepted)."""
    if urlparse(uri).scheme == "s3":
        if s3 is None:
            _not_configured("s3", "EXPORT_S3_PREFIXES")
        bucket, prefix = check_s3_destination(uri, s3)
        return S3Destination(bucket, prefix, s3.options)
    return LocalDestination(destination_path(uri))
