"""Blob-store contract: the SAME tests on the local directory and on S3 (moto's server mode, a
real HTTP peer on loopback: `atlasflow.testing.s3.MotoS3`).

Run against: the local back-end and moto 5 (server mode). NOT run against AWS S3, MinIO or Ceph
RGW (none reachable here); deploy/README.md says so.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atlasflow.common.blobstore import BlobStore, LocalBlobStore, S3Options, digest_of, open_blob_store
from atlasflow.common.errors import AtlasflowError, DataLoss, InvalidArgument, NotFound, Unavailable
from atlasflow.common.ports import free_ports
from atlasflow.common.s3blobs import S3BlobStore
from atlasflow.testing.s3 import CREDENTIALS, MotoS3

MB = 1024 * 1024


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # boto3's standard chain finds them, as in a pod
    try:
        with MotoS3() as server:
            server.create_bucket("atlasflow-test")
            yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Backend:
    store: BlobStore
    #: replace the stored bytes of a digest with other bytes (a store that lies)
    tamper: Callable[[str, bytes], None]
    #: how many parts the stored object was uploaded in (None: not an object store)
    parts: Callable[[str], int | None]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        local = LocalBlobStore(tmp_path / "blobs")
        return Backend(local, lambda d, data: local.path(d).write_bytes(data), lambda d: None)
    moto: MotoS3 = request.getfixturevalue("moto")
    # a fresh prefix per test: the tests share the emulator and its bucket
    s3 = S3BlobStore("atlasflow-test", f"t/{tmp_path.name}", moto.options(multipart_threshold_mb=5))

    def tamper(digest: str, data: bytes) -> None:
        s3.client.put_object(Bucket=s3.bucket, Key=s3.key(digest), Body=data)

    def parts(digest: str) -> int | None:
        etag = s3.client.head_object(Bucket=s3.bucket, Key=s3.key(digest))["ETag"].strip('"')
        return int(etag.rpartition("-")[2]) if "-" in etag else 1

    return Backend(s3, tamper, parts)


def _reason(exc: AtlasflowError) -> str:
    return exc.reason


def test_put_get_roundtrip(backend: Backend) -> None:
    data = b"ct volume bytes \x00\xff" * 100
    info = backend.store.put(data)
    assert info.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert info.size_bytes == len(data)
    assert backend.store.get(info.digest) == data
    assert backend.store.exists(info.digest)
    assert backend.store.put(data) == info  # content-addressed: the same blob


def test_empty_blob(backend: Backend) -> None:
    info = backend.store.put(b"")
    assert backend.store.get(info.digest) == b""
    with backend.store.open(info.digest) as s:
        assert s.size_bytes == 0 and b"".join(s.chunks()) == b""


def test_missing_and_invalid(backend: Backend) -> None:
    absent = digest_of(b"never stored")
    with pytest.raises(NotFound) as e:
        backend.store.get(absent)
    assert _reason(e.value) == "BLOB_NOT_FOUND"
    with pytest.raises(NotFound):
        backend.store.open(absent)
    assert not backend.store.exists(absent)
    assert backend.store.modified(absent) is None
    for bad in ("sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:../../etc/passwd", ""):
        with pytest.raises(InvalidArgument) as e2:
            backend.store.get(bad)
        assert _reason(e2.value) == "INVALID_BLOB_DIGEST"


def test_open_streams_in_chunks(backend: Backend) -> None:
    data = os.urandom(3 * MB + 17)
    info = backend.store.put(data)
    with backend.store.open(info.digest) as s:
        assert s.size_bytes == len(data)
        head = s.read(2)
        chunks = list(s.chunks(MB))
    assert head + b"".join(chunks) == data
    assert len(chunks) >= 3


def test_corrupt_blob_refused_on_read(backend: Backend) -> None:
    data = os.urandom(2 * MB)
    info = backend.store.put(data)
    evil = bytearray(data)
    evil[MB + 5] ^= 0x01  # one bit flipped in the middle
    backend.tamper(info.digest, bytes(evil))
    with pytest.raises(DataLoss) as e:
        backend.store.get(info.digest)
    assert _reason(e.value) == "BLOB_CORRUPT"
    assert e.value.metadata["digest"] == info.digest
    # the stream raises before it hands out its last chunk
    got: list[bytes] = []
    with pytest.raises(DataLoss), backend.store.open(info.digest) as s:
        for chunk in s.chunks(MB // 2):
            got.append(chunk)
    assert sum(map(len, got)) < len(data)
    # a blob cut short is refused too
    backend.tamper(info.digest, data[:-1])
    with pytest.raises(DataLoss):
        backend.store.get(info.digest)


def test_large_blob_multipart(backend: Backend, tmp_path: Path) -> None:
    """Above the multipart threshold (5 MiB for the S3 test store) a volume goes up in parts,
    from bytes and from a file; it reads back verified."""
    data = os.urandom(11 * MB + 3)
    info = backend.store.put(data)
    assert backend.store.get(info.digest) == data
    src = tmp_path / "volume.nii.gz"
    other = os.urandom(12 * MB)
    src.write_bytes(other)
    finfo = backend.store.put_file(src)
    assert finfo.digest == digest_of(other) and finfo.size_bytes == len(other)
    assert src.exists()  # the caller's file is left in place
    assert backend.store.get(finfo.digest) == other
    # put_file with a digest the caller computed, of content already there: no second upload
    assert backend.store.put_file(src, finfo.digest) == finfo
    parts = backend.parts(info.digest), backend.parts(finfo.digest)
    if isinstance(backend.store, S3BlobStore):
        assert parts == (3, 3), parts  # 5 + 5 + 1 MiB and 5 + 5 + 2 MiB
    else:
        assert parts == (None, None)


def test_put_again_refreshes_modified_and_delete(backend: Backend) -> None:
    """The DeleteStudy sweep (`atlasflow.ingest.deletion`) keeps a blob put again within its
    grace period and deletes an unreferenced one: modified moves forward on a second put,
    delete says whether the blob was there."""
    info = backend.store.put(b"label map")
    first = backend.store.modified(info.digest)
    assert first is not None and abs(first - time.time()) < 120
    time.sleep(1.1)  # S3's LastModified has whole seconds
    backend.store.put(b"label map")
    second = backend.store.modified(info.digest)
    assert second is not None and second > first
    assert backend.store.get(info.digest) == b"label map"  # touching kept the bytes
    assert backend.store.delete(info.digest) is True
    assert backend.store.delete(info.digest) is False
    assert backend.store.modified(info.digest) is None
    assert not backend.store.exists(info.digest)
    with pytest.raises(NotFound):
        backend.store.get(info.digest)
    backend.store.put(b"label map")  # content can come back after a sweep
    assert backend.store.get(info.digest) == b"label map"


def test_open_blob_store_urls(tmp_path: Path, moto: MotoS3) -> None:
    assert isinstance(open_blob_store(str(tmp_path / "a")), LocalBlobStore)
    local = open_blob_store(f"file://{tmp_path}/b")
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "b"
    s3 = open_blob_store("s3://atlasflow-test/some/prefix/", moto.options())
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("atlasflow-test", "some/prefix")
    assert s3.url == "s3://atlasflow-test/some/prefix"
    info = s3.put(b"x")
    assert s3.key(info.digest) == f"some/prefix/sha256/{info.digest[7:9]}/{info.digest[7:]}"
    # the client retries with backoff (botocore's standard mode)
    retries = s3.client.meta.config.retries
    assert retries is not None and retries["mode"] == "standard" and retries.get("total_max_attempts") == 8
    for bad in ("ftp://host/x", "s3:///nobucket", ""):
        with pytest.raises(InvalidArgument) as e:
            open_blob_store(bad)
        assert e.value.reason == "BLOB_URL_INVALID"
    with pytest.raises(InvalidArgument):
        open_blob_store("s3://b", S3Options(addressing_style="sideways"))


def test_s3_unreachable_is_unavailable(moto: MotoS3) -> None:
    (dead,) = free_ports(1)
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{dead}", region="us-east-1", max_attempts=2)
    store = S3BlobStore("atlasflow-test", "", opts)
    for call in (lambda: store.put(b"x"), lambda: store.get(digest_of(b"x")), lambda: store.modified(digest_of(b"x"))):
        with pytest.raises(Unavailable) as e:
            call()
        assert e.value.reason == "BLOB_STORE_UNAVAILABLE"
        assert "secret" not in str(e.value.metadata).lower()


def test_s3_missing_bucket_is_unavailable(moto: MotoS3) -> None:
    store = S3BlobStore("no-such-bucket", "", moto.options(max_attempts=1))
    with pytest.raises(Unavailable) as e:
        store.put(b"x")
    assert e.value.metadata["code"] == "NoSuchBucket"
