"""Ingest on the S3 blob store, end to end: `atlasflow serve ingest` as a subprocess with
``BLOB_URL=s3://...`` against moto's server mode (a real HTTP peer on loopback), a CT series sent
by dcmtk's storescu, committed: the volume is an object in the bucket, read back verified, and the
service wrote no blob directory of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.s3blobs import S3BlobStore
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers
from atlasflow.testing.s3 import MotoS3

BUCKET = "atlasflow-ingest"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        server.create_bucket(BUCKET)
        yield server


def test_series_volume_and_instances_land_in_s3(moto: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto.env.items():  # this test's own reads of the bucket
        monkeypatch.setenv(k, v)
    files = peers.build_ct_series(tmp_path / "series", 3, seed="s3-ingest")
    env = {
        "BLOB_URL": f"s3://{BUCKET}/site-a",
        "BLOB_S3_ENDPOINT_URL": moto.endpoint,
        "BLOB_S3_REGION": "us-east-1",
        "BLOB_S3_ADDRESSING_STYLE": "path",
    }
    proc = peers.IngestProcess(tmp_path / "ingest", env=env)
    proc.env.update(moto.env)  # credentials through boto3's standard chain (AWS_* variables)
    with proc:
        r = peers.storescu(files, proc.dicom_port)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
        series_id = atlas_id("ser", str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
        with sync_channel(proc.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            series = stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=120).series
        assert series.state == ingest_pb2.SERIES_STATE_ASSEMBLED, proc.log_text()[-3000:]
        store = S3BlobStore(BUCKET, "site-a", moto.options())
        volume, _ = from_nifti_bytes(store.get(series.volume.digest))
        assert volume.shape[2] == 3
        # the instances drain from the spool into the object store (the spool is the durable
        # copy until then): three instance objects besides the volume
        deadline = time.monotonic() + 90
        while len(keys := _keys(store, "site-a/")) < 4:
            assert time.monotonic() < deadline, (keys, proc.log_text()[-3000:])
            time.sleep(0.5)
        assert all(k.startswith("site-a/sha256/") for k in keys), keys
        for key in keys:  # every object is a blob named by the SHA-256 of its bytes
            assert store.get("sha256:" + key.rpartition("/")[2])
    assert not (tmp_path / "ingest" / "blobs").exists()


def _keys(store: S3BlobStore, prefix: str) -> list[str]:
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]
