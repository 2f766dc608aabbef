"""Exports to an S3-compatible object store (moto's server mode, a real HTTP peer on loopback:
`atlasflow.testing.s3.MotoS3`): the same files as a file:// export, only the configured
prefixes, the manifest object last (a cancelled job leaves none), multipart for big files.

Run against moto 5 (server mode); NOT run against AWS S3, MinIO or Ceph RGW."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_labels_deid import _labels_on, _sources  # the 3 real CT instances, labels on their grid

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.labels.deid import Pseudonymizer
from atlasflow.labels.export_jobs import ExportOptions
from atlasflow.labels.export_store import MANIFEST, S3Destination, check_destination, parse_s3_prefixes
from atlasflow.labels.repository import Provenance
from atlasflow.labels.servicer import LabelServicer
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.v1 import labels_pb2
from atlasflow.labels.worker import Exporter
from atlasflow.testing.s3 import CREDENTIALS, MotoS3

BUCKET = "atlasflow-exports"
OTHER = "someone-elses-bucket"
AI = Provenance("ai", model_version="trio-v1", job_id="job-1")


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)  # boto3's standard chain finds them, as in a pod
        with MotoS3() as server:
            server.create_bucket(BUCKET)
            server.create_bucket(OTHER)
            yield server


@pytest.fixture
def stack(tmp_path: Path, moto: MotoS3):
    """A SQLite label store with two cases, a local blob store and an exporter whose server
    allows s3://atlasflow-exports/team-a only."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite", export_lease_s=0.6)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine_t = tuple(float(a) for a in affine.ravel())
    rng = np.random.default_rng(7)
    for k in range(2):
        ct = rng.integers(-1000, 1000, (12, 10, 6)).astype(np.int16)
        labels = np.zeros(ct.shape, np.uint8)
        labels[2:6, 2:5, 1:4] = 5
        labels[7:10, 3:8, 2:5] = 8
        repo.create_version(
            f"case-{k}",
            blobs.put(to_nifti_bytes(labels, affine)),
            blobs.put(to_nifti_bytes(ct, affine)),
            AI,
            f"req-{k}",
            organs=(5, 8),
            shape=ct.shape,
            affine=affine_t,
        )
    s3 = parse_s3_prefixes(f"s3://{BUCKET}/team-a", moto.options(multipart_threshold_mb=5))
    exporter = Exporter(
        repo, blobs, Metrics("labels"), pseudonymizer=Pseudonymizer(b"s3-export-key-0123456789"), export_s3=s3
    )
    yield repo, blobs, exporter, s3
    repo.close()


def _objects(dest: S3Destination) -> dict[str, bytes]:
    out = {}
    for key in dest._list(dest.prefix + "/"):
        out[key.removeprefix(dest.prefix + "/")] = dest.client.get_object(Bucket=dest.bucket, Key=key)["Body"].read()
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_s3_export_writes_the_same_files_as_a_file_export(stack, tmp_path, moto):
    """De-identified, with DICOM SEGs (a third case on the grid of real CT instances; the two
    small ones get none: their grid differs from the source images)."""
    repo, blobs, exporter, s3 = stack
    labels, affine = _labels_on(_sources())
    repo.create_version(
        "case-seg",
        blobs.put(to_nifti_bytes(labels, affine)),
        blobs.put(to_nifti_bytes(np.zeros(labels.shape, np.int16), affine)),
        AI,
        "req-seg",
        organs=(5, 8),
        shape=labels.shape,
        affine=tuple(float(a) for a in affine.ravel()),
    )
    exporter.sources = lambda _d: _sources()
    options = ExportOptions(include_dicom_seg=True).to_dict()
    uri = f"s3://{BUCKET}/team-a/ds-1"
    dest = S3Destination(BUCKET, "team-a/ds-1", s3.options)
    # an object an earlier export of case-0 left (not written now: removed with the case's rewrite)
    case0 = exporter.pseudonymizer.case("case-0")
    dest.put(dest.key(f"{case0}/dicom_seg/seg.dcm"), b"stale")
    for target in ((tmp_path / "out").as_uri(), uri):
        job = repo.create_export_job([], target, options=options)
        exporter.run_job(job)
        done = repo.get_export_job(job.job_id)
        assert (done.state, done.error_reason) == ("SUCCEEDED", "")
    local, remote = _files(tmp_path / "out"), _objects(dest)
    seg = f"{exporter.pseudonymizer.case('case-seg')}/dicom_seg/seg.dcm"
    assert sorted(remote) == sorted(local) and MANIFEST in remote and seg in remote and len(remote) == 1 + 3 * 11 + 1
    assert [name for name in local if remote[name] != local[name] and name not in (seg, MANIFEST)] == []
    # the SEG too, byte for byte: all its UIDs are derived from the label version
    assert remote[seg] == local[seg]
    manifests = [json.loads(files[MANIFEST]) for files in (local, remote)]
    assert manifests[0] == manifests[1]
    head = dest.client.head_object(Bucket=BUCKET, Key=dest.key(f"{case0}/ct.nii.gz"))
    assert head["Metadata"]["sha256"] == hashlib.sha256(local[f"{case0}/ct.nii.gz"]).hexdigest()


@pytest.mark.parametrize(
    "uri,reason",
    [
        (f"s3://{OTHER}/team-a", "DESTINATION_NOT_ALLOWED"),
        (f"s3://{BUCKET}/team-ab/x", "DESTINATION_NOT_ALLOWED"),
        (f"s3://{BUCKET}", "DESTINATION_NOT_ALLOWED"),
        (f"s3://{BUCKET}/team-a/../team-b", "INVALID_DESTINATION"),
        (f"s3://{BUCKET}/team-a/x?versionId=1", "INVALID_DESTINATION"),
        ("s3://Bad_Bucket/team-a", "INVALID_DESTINATION"),
        ("file:///tmp/x", "EXPORT_NOT_CONFIGURED"),  # this server has no EXPORT_DIR
        ("http://example.org/x", "INVALID_DESTINATION"),
    ],
)
def test_destinations_outside_the_configured_prefixes_are_refused(stack, uri, reason):
    s3 = stack[3]
    with pytest.raises(AtlasflowError) as e:
        check_destination(uri, None, s3)
    assert e.value.reason == reason


def test_a_refused_bucket_gets_no_job_and_a_changed_configuration_fails_the_job(stack, moto):
    repo, blobs, exporter, s3 = stack

    class Context:
        def invocation_metadata(self):
            return ()

    servicer = LabelServicer(repo, blobs, exporter, None, export_s3=s3)
    request = labels_pb2.ExportDatasetRequest(destination_uri=f"s3://{OTHER}/team-a")
    with pytest.raises(AtlasflowError) as e:
        asyncio.run(servicer.ExportDataset(request, Context()))
    assert e.value.reason == "DESTINATION_NOT_ALLOWED" and e.value.metadata == {"bucket": OTHER}
    assert repo.list_export_jobs() == []
    # a job accepted earlier, whose prefix the configuration no longer allows: nothing written
    job = repo.create_export_job([], f"s3://{OTHER}/team-a")
    exporter.run_job(job)
    assert repo.get_export_job(job.job_id).error_reason == "DESTINATION_NOT_ALLOWED"
    assert "Contents" not in S3Destination(OTHER, "", s3.options).client.list_objects_v2(Bucket=OTHER)


def test_a_cancelled_s3_export_leaves_no_manifest(stack):
    """A complete export to the prefix, then a second one cancelled after its first case: the
    earlier manifest is gone (removed when the job started) and no new one is written."""
    repo, blobs, exporter, s3 = stack
    uri = f"s3://{BUCKET}/team-a/cancelled"
    dest = S3Destination(BUCKET, "team-a/cancelled", s3.options)
    exporter.run_job(repo.create_export_job([], uri))
    assert MANIFEST in _objects(dest)

    job = repo.create_export_job([], uri)
    cancelled = threading.Event()
    real_get = blobs.get
    gets = 0

    def get(digest: str) -> bytes:  # the 3rd read is case 2's label map: cancel then
        nonlocal gets
        gets += 1
        if gets == 3:
            repo.update_export_job(job.job_id, state="CANCELLED")
            cancelled.set()
        return real_get(digest)

    blobs.get = get  # type: ignore[method-assign]  # a hook inside the export, not a fake store
    claimed = repo.claim_export_job()
    assert claimed is not None and claimed.job_id == job.job_id
    exporter.run_claimed(claimed)
    assert cancelled.is_set()
    assert repo.get_export_job(job.job_id).state == "CANCELLED"
    assert MANIFEST not in _objects(dest)


def test_big_files_go_up_in_parts_with_their_sha256(moto):
    dest = S3Destination(BUCKET, "team-a/big", moto.options(multipart_threshold_mb=5))
    data = np.random.default_rng(1).bytes(6 * 1024 * 1024)
    dest.put(dest.key("c/ct.nii.gz"), data)
    head = dest.client.head_object(Bucket=BUCKET, Key=dest.key("c/ct.nii.gz"))
    assert head["ETag"].strip('"').endswith("-2")  # two parts (5 MiB + 1 MiB)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert _objects(dest)["c/ct.nii.gz"] == data
