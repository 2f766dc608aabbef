"""DICOM SEG inside ExportDataset, end to end with real services: ingest and labels run as
subprocesses (each with its OWN blob store, so the source instances can only reach labels
through IngestService.StreamSeriesInstances), a real Orthanc receives the SEG by C-STORE.

Data: TotalSegmentator's real 20-slice CT (JPEG 2000, UIDs empty in the files: given here) and
its TotalSegmentator labels on that DICOM grid (example_seg_dicom.nii.gz, LAS), mapped to the
nine atlas organs. Series A is the whole CT; series B lacks one middle slice, which ingest fills
by interpolation (a resampled grid): its SEG must be refused while its other files export.

The export is de-identified (the default): its case folders, the SEG's patient and every UID
it holds are the keyed pseudonyms of the service's key (DEID_KEY_FILE, known to the test); an
identified export is an audited admin request. PACS destinations are the service's
configuration (EXPORT_PACS_DESTINATIONS), named by id.

Unit tests at the end: the job's SEG options and per-case outcomes live in the label
repository (committed per case, so a crash mid-export loses none; a resume replaces them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import NotFound, Unavailable
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.client import send_files
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.case_seg import build_case_seg
from atlasflow.labels.deid import DATES_MODIFIED, DeidOptions, Pseudonymizer
from atlasflow.labels.export import destination_path
from atlasflow.labels.export_jobs import ExportOptions, PacsDestination, SegOutcome, parse_pacs_destinations
from atlasflow.labels.repository import Provenance
from atlasflow.labels.servicer import IDENTIFIED_EXPORT_METHOD, export_to_proto
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.worker import Exporter
from atlasflow.testing import auth, peers
from atlasflow.testing.data import REPO, TEST_DATA

REF = TEST_DATA / "totalsegmentator/tests/reference_files"
KEY = b"seg-export-test-key-0123456789abcdef"
PSEUDO = Pseudonymizer(KEY)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
TERMINAL = (
    common_pb2.OPERATION_STATE_SUCCEEDED,
    common_pb2.OPERATION_STATE_FAILED,
    common_pb2.OPERATION_STATE_CANCELLED,
)


def _write_series(out: Path, tag: str, drop: int | None = None) -> list[Path]:
    """The 20 real slices with Study/Series/SOP Instance UIDs given (derived from `tag`),
    pixel data untouched (JPEG 2000); `drop`: index (in z order) of a slice to leave out."""
    out.mkdir(parents=True)
    files = sorted(
        (REF / "example_ct_dicom").iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    paths = []
    for i, f in enumerate(files):
        if i == drop:
            continue
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = peers.bench_uid(tag, f"sop/{i}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = peers.bench_uid(tag, "study")
        ds.SeriesInstanceUID = peers.bench_uid(tag, "series")
        path = out / f"{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class LabelsProcess:
    """`atlasflow serve labels` on free ports with its own data and blob directories."""

    def __init__(self, root: Path, ingest_target: str, extra: dict[str, str] | None = None) -> None:
        self.root = root
        (self.port,) = peers.free_ports(1)
        self.env = dict(
            os.environ, PYTHONUNBUFFERED="1", OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="none", TCP_NODELAY="1"
        )
        self.env.update(
            {
                "ATLASFLOW_LABELS_" + k: v
                for k, v in {
                    "GRPC_PORT": str(self.port),
                    "DATA_DIR": str(root / "data"),
                    "BLOB_DIR": str(root / "blobs"),
                    "INGEST_TARGET": ingest_target,
                    "SHUTDOWN_GRACE_S": "1",
                    **(extra or {}),
                }.items()
            }
        )
        self.env.update(auth.auth_env("ATLASFLOW_LABELS_"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LabelsProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "labels.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atlasflow.cli.main", "serve", "labels"],
            cwd=REPO,
            env=self.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )  # noqa: SIM115
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "labels did not become ready"
                try:
                    if (
                        health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return self
                except grpc.RpcError:
                    time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    series_a = _write_series(root / "a", "seg-export-a")
    series_b = _write_series(root / "b", "seg-export-b", drop=10)
    ingest = peers.IngestProcess(root / "ingest").start()
    labels = orthanc = None
    try:
        t0 = time.perf_counter()
        receipts = send_files(series_a + series_b, ingest.target, commit=True)
        print(f"upload + assembly of 39 instances: {time.perf_counter() - t0:.2f} s")
        orthanc = peers.OrthancProcess(root / "orthanc").start()
        (dead,) = peers.free_ports(1)
        key = root / "deid.key"
        key.write_bytes(KEY)
        key.chmod(0o600)
        destinations = {
            "orthanc": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": orthanc.aet},
            "nobody": {"host": "127.0.0.1", "port": dead, "called_ae": "NOBODY"},
        }
        labels = LabelsProcess(
            root / "labels",
            ingest.target,
            {
                # every test's tmp_path lies under the session's base directory
                "EXPORT_DIR": str(tmp_path_factory.getbasetemp()),
                "DEID_KEY_FILE": str(key),
                "EXPORT_PACS_DESTINATIONS": json.dumps(destinations),
            },
        ).start()
        yield {
            "root": root,
            "ingest": ingest,
            "labels": labels,
            "orthanc": orthanc,
            "series_id": {"a": receipts[0].series_id, "b": receipts[-1].series_id},
            "files": {"a": series_a, "b": series_b},
        }
    finally:
        for proc in (orthanc, labels, ingest):
            if proc is not None:
                proc.stop()


def _stubs(env):
    return (
        # sync_channel: the session's all-roles token (ATLASFLOW_TOKEN_FILE)
        ingest_pb2_grpc.IngestServiceStub(sync_channel(env["ingest"].target)),
        labels_pb2_grpc.LabelServiceStub(sync_channel(f"127.0.0.1:{env['labels'].port}")),
    )


def _stream(stub, **request) -> tuple[ingest_pb2.Series, list[bytes], list]:
    """(series of the first message, instance bytes, last-chunk messages) of one stream."""
    series, instances, lasts, buf = None, [], [], b""
    for msg in stub.StreamSeriesInstances(ingest_pb2.StreamSeriesInstancesRequest(**request), timeout=60):
        if series is None:
            series, count = msg.series, msg.instance_count
        assert msg.instance_index == len(instances) and msg.offset == len(buf)
        buf += msg.chunk
        if msg.last_chunk:
            assert hashlib.sha256(buf).hexdigest() == msg.sha256
            instances.append(buf)
            lasts.append(msg)
            buf = b""
    assert series is not None and count == len(instances)
    return series, instances, lasts


def _reason(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    info = error_info_of(e.value)
    assert info is not None
    return e.value.code(), info.reason, dict(info.metadata)


# ------------------------------------------------------------------ ingest: the new RPC


def test_stream_series_instances(env):
    stub, _ = _stubs(env)
    sent = {hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes() for p in env["files"]["a"]}

    t0 = time.perf_counter()
    series, whole, lasts = _stream(stub, series_id=env["series_id"]["a"])
    t_whole = time.perf_counter() - t0
    assert series.series_id == env["series_id"]["a"] and series.version == 1
    assert series.state in (ingest_pb2.SERIES_STATE_ASSEMBLED, ingest_pb2.SERIES_STATE_DISPATCHED)
    # the stored bytes, unchanged: exactly the uploaded files
    assert sorted(hashlib.sha256(b).hexdigest() for b in whole) == sorted(sent)
    for data, last in zip(whole, lasts):
        assert last.instance.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert not last.headers_only

    t0 = time.perf_counter()
    by_volume, heads, hlasts = _stream(stub, volume_digest=series.volume.digest, headers_only=True)
    t_heads = time.perf_counter() - t0
    print(
        f"20 instances whole {sum(map(len, whole))} B in {t_whole:.3f} s, headers only "
        f"{sum(map(len, heads))} B in {t_heads:.3f} s"
    )
    assert by_volume.series_id == series.series_id and by_volume.version == 1
    whole_of = {pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID: b for b in whole}
    assert len(heads) == 20
    for data, last in zip(heads, hlasts):
        assert last.headers_only and len(data) < last.instance.size_bytes
        head = pydicom.dcmread(io.BytesIO(data))
        assert "PixelData" not in head
        stored = whole_of[head.SOPInstanceUID]
        assert stored.startswith(data)  # a prefix of the stored file, cut before PixelData
        assert last.instance.digest == "sha256:" + hashlib.sha256(stored).hexdigest()
        ref = pydicom.dcmread(io.BytesIO(stored))
        del ref.PixelData
        assert head == ref  # every other attribute, as stored


@pytest.mark.parametrize(
    "request_fields,code,reason",
    [
        ({"series_id": "ser-unknown"}, grpc.StatusCode.NOT_FOUND, "SERIES_NOT_FOUND"),
        ({"series_id": "A", "series_version": 7}, grpc.StatusCode.NOT_FOUND, "SERIES_VERSION_NOT_FOUND"),
        ({"volume_digest": "sha256:" + "0" * 64}, grpc.StatusCode.NOT_FOUND, "VOLUME_NOT_FOUND"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (
            {"series_id": "A", "volume_digest": "sha256:" + "0" * 64},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_stream_series_instances_errors(env, request_fields, code, reason):
    stub, _ = _stubs(env)
    fields = {k: (env["series_id"]["a"] if v == "A" else v) for k, v in request_fields.items()}
    got = _reason(
        lambda: list(stub.StreamSeriesInstances(ingest_pb2.StreamSeriesInstancesRequest(**fields), timeout=30))
    )
    assert got[:2] == (code, reason)


# ------------------------------------------------------------------ labels: export with SEG


def _atlas_labels_on(series: ingest_pb2.Series) -> np.ndarray:
    """TotalSegmentator's labels of this CT (LAS, (512, 512, 20)) mapped to the atlas ids and
    put on the ingest volume's grid: ingest keeps DICOM order (i = column, j = row), so its
    y axis is the LAS file's flipped; checked against both affines."""
    seg, las_affine = from_nifti_bytes((REF / "example_seg_dicom.nii.gz").read_bytes())
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, seg.shape[1] - 1
    affine = np.asarray(series.geometry.affine).reshape(4, 4)
    assert tuple(series.geometry.shape) == seg.shape
    assert np.allclose(affine, las_affine @ flip, atol=1e-3)
    return totalseg_to_atlas(seg)[:, ::-1, :].copy()


def _put(blobs: LocalBlobStore, data: bytes) -> common_pb2.BlobRef:
    info = blobs.put(data)
    return common_pb2.BlobRef(digest=info.digest, size_bytes=info.size_bytes)


def _export(stub, dest: Path, cases: list[str], **options) -> labels_pb2.ExportJob:
    job = stub.ExportDataset(
        labels_pb2.ExportDatasetRequest(
            case_ids=cases, destination_uri=dest.as_uri(), include_dicom_seg=True, **options
        ),
        timeout=30,
    ).job
    deadline = time.monotonic() + 120
    while job.state not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
        job = stub.GetExportJob(labels_pb2.GetExportJobRequest(job_id=job.job_id), timeout=30).job
    return job


def _orthanc_seg_ids(orthanc, sop_uid: str) -> list[str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=sop_uid.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return [x["ID"] for x in json.loads(r.read()) if x["Type"] == "Instance"]


@pytest.fixture(scope="module")
def exported(env):
    ingest_stub, stub = _stubs(env)
    ingest_blobs = LocalBlobStore(env["root"] / "ingest" / "blobs")
    labels_blobs = LocalBlobStore(env["root"] / "labels" / "blobs")
    versions = {}
    for tag in ("a", "b"):
        series = ingest_stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=env["series_id"][tag]), timeout=30).series
        # labels has a blob store of its own: the CT blob is copied (same digest), the source
        # instances are not
        ct = _put(labels_blobs, ingest_blobs.get(series.volume.digest))
        assert ct.digest == series.volume.digest
        labels = _atlas_labels_on(series)
        affine = np.asarray(series.geometry.affine).reshape(4, 4)
        versions[tag] = (
            stub.CreateLabelVersion(
                labels_pb2.CreateLabelVersionRequest(
                    case_id=f"case-{tag}",
                    label_map=_put(labels_blobs, to_nifti_bytes(labels, affine)),
                    ct=ct,
                    provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI, model_version="trio-v1"),
                    request_id=f"seg-{tag}",
                ),
                timeout=30,
            ).version,
            labels,
            series,
        )
    # a CT that ingest never assembled (uploaded as NIfTI): no source instances
    ct_c, aff_c = from_nifti_bytes((REF / "example_ct_sm.nii.gz").read_bytes())
    lab_c = np.zeros(ct_c.shape, np.uint8)
    lab_c[40:60, 40:60, 10:20] = 5
    stub.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id="case-c",
            label_map=_put(labels_blobs, to_nifti_bytes(lab_c, aff_c)),
            ct=_put(labels_blobs, to_nifti_bytes(ct_c.astype(np.int16), aff_c)),
            provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_ORIGINAL),
            request_id="seg-c",
        ),
        timeout=30,
    )
    dest = env["root"] / "export"
    t0 = time.perf_counter()
    job = _export(stub, dest, ["case-a", "case-b", "case-c"], pacs_destination_id="orthanc")
    elapsed = time.perf_counter() - t0
    print(f"export of 3 cases with DICOM SEG + C-STORE to Orthanc: {elapsed:.2f} s")
    return {"job": job, "dest": dest, "versions": versions, "stub": stub}


def test_export_writes_and_sends_the_seg(env, exported):
    job, dest = exported["job"], exported["dest"]
    version, labels, series = exported["versions"]["a"]
    assert job.state == common_pb2.OPERATION_STATE_SUCCEEDED, job.error_reason
    assert job.include_dicom_seg and job.pacs_destination_id == "orthanc"
    assert job.identity == labels_pb2.EXPORT_IDENTITY_DEIDENTIFIED
    outcome = {o.case_id: o for o in job.dicom_seg_outcomes}  # the API names the real case ids
    a = outcome["case-a"]
    assert a.state == labels_pb2.DICOM_SEG_STATE_SENT, a
    assert a.c_store_status == 0 and a.version_id == version.version_id
    folder = PSEUDO.case("case-a")  # the files name the case's pseudonym
    assert a.path == f"{folder}/dicom_seg/seg.dcm"
    path = dest / a.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == a.sha256
    manifest = {c["case"]: c for c in json.loads((dest / "manifest.json").read_text())["cases"]}
    assert manifest[folder]["files"]["dicom_seg/seg.dcm"]["sha256"] == a.sha256
    assert manifest[folder]["dicom_seg"]["state"] == "SENT"
    assert "case-a" not in (dest / "manifest.json").read_text()

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SEG_STORAGE
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in env["files"]["a"]]
    # de-identified: the references are the source instances' pseudonyms, each once
    uids = [PSEUDO.uid(ds.SOPInstanceUID) for ds in sources]
    refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert sorted(refs) == sorted(uids)
    assert a.referenced_instance_count == 20
    assert seg.StudyInstanceUID == PSEUDO.uid(sources[0].StudyInstanceUID)
    assert seg.FrameOfReferenceUID == PSEUDO.uid(sources[0].FrameOfReferenceUID)
    assert seg.PatientIdentityRemoved == "YES" and not [e for e in seg if e.tag.is_private]
    for ds in sources[:1]:
        for ident in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert ident.encode() not in path.read_bytes()
    present = sorted(int(o) for o in np.unique(labels) if o)
    assert list(a.organs) == present
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [ORGANS[o] for o in present]
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=list(range(1, len(present) + 1)),
        combine_segments=True,
        relabel=False,
    )
    lut = np.zeros(len(present) + 1, np.uint8)
    lut[1:] = present
    z0 = min(float(ds.ImagePositionPatient[2]) for ds in sources)
    for ds, frame in zip(sources, got):
        k = int(round((float(ds.ImagePositionPatient[2]) - z0) / 2.0))
        # ingest's grid: i = column, j = row, k = slice in z order
        assert np.array_equal(lut[frame], labels[:, :, k].T), ds.InstanceNumber

    # the PACS holds it: same SOP Instance, same frames
    (orthanc_id,) = _orthanc_seg_ids(env["orthanc"], seg.SOPInstanceUID)
    with urllib.request.urlopen(
        f"http://127.0.0.1:{env['orthanc'].http_port}/instances/{orthanc_id}/file", timeout=10
    ) as r:
        stored = pydicom.dcmread(io.BytesIO(r.read()))
    assert stored.SOPClassUID == SEG_STORAGE and stored.PixelData == seg.PixelData


def test_resampled_grid_is_refused_the_rest_exported(exported):
    job, dest = exported["job"], exported["dest"]
    outcome = {o.case_id: o for o in job.dicom_seg_outcomes}
    b = outcome["case-b"]
    assert b.state == labels_pb2.DICOM_SEG_STATE_REFUSED
    assert b.reason == "GRID_DIFFERS_FROM_SOURCE" and b.reason_metadata["problem"] == "SLICES"
    folder_b = PSEUDO.case("case-b")
    assert not b.path and not (dest / folder_b / "dicom_seg").exists()
    manifest = {c["case"]: c for c in json.loads((dest / "manifest.json").read_text())["cases"]}
    assert manifest[folder_b]["dicom_seg"]["reason"] == "GRID_DIFFERS_FROM_SOURCE"
    for rel in ("ct.nii.gz", "combined_labels.nii.gz", "segmentations/liver.nii.gz"):
        data = (dest / folder_b / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest[folder_b]["files"][rel]["sha256"]
    c = outcome["case-c"]
    assert c.state == labels_pb2.DICOM_SEG_STATE_REFUSED
    assert c.reason == "SOURCE_SERIES_NOT_FOUND"
    assert (dest / PSEUDO.case("case-c") / "combined_labels.nii.gz").exists()
    assert [o.case_id for o in job.dicom_seg_outcomes] == ["case-a", "case-b", "case-c"]


def test_export_again_resends_the_same_sop_instance(env, exported):
    first = next(o for o in exported["job"].dicom_seg_outcomes if o.case_id == "case-a")
    uid = pydicom.dcmread(exported["dest"] / first.path, stop_before_pixels=True).SOPInstanceUID
    job = _export(exported["stub"], env["root"] / "export2", ["case-a"], pacs_destination_id="orthanc")
    (again,) = job.dicom_seg_outcomes
    assert again.state == labels_pb2.DICOM_SEG_STATE_SENT
    path = env["root"] / "export2" / again.path
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    assert len(_orthanc_seg_ids(env["orthanc"], uid)) == 1  # replaced, not duplicated


def _removed_field_request(dest: Path) -> labels_pb2.ExportDatasetRequest:
    """A request from an old client that still sets field 4, the removed host:port
    DicomDestination (host "h", port 104): kept as an unknown field and sent on."""
    old = bytes([0x22, 0x07, 0x0A, 0x01, ord("h"), 0x10, 0x68, 0x1A, 0x00])  # field 4 {1: "h", 2: 104, 3: ""}
    req = labels_pb2.ExportDatasetRequest(destination_uri=dest.as_uri(), include_dicom_seg=True)
    return labels_pb2.ExportDatasetRequest.FromString(req.SerializeToString() + old)


@pytest.mark.parametrize(
    "request_fields,code,reason,metadata",
    [
        (
            {"include_dicom_seg": True, "pacs_destination_id": "elsewhere"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_PACS_DESTINATION",
            {"pacs_destination_id": "elsewhere"},
        ),
        (
            {"include_dicom_seg": False, "pacs_destination_id": "orthanc"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PACS_DESTINATION",
            {"field": "include_dicom_seg"},
        ),
        (
            "removed-field",
            grpc.StatusCode.INVALID_ARGUMENT,
            "PACS_DESTINATION_BY_ADDRESS_REMOVED",
            {"field": "pacs_destination"},
        ),
        (
            {
                "identity": labels_pb2.EXPORT_IDENTITY_IDENTIFIED,
                "deidentification": labels_pb2.DeidentificationOptions(clean_descriptors=True),
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            {"field": "deidentification"},
        ),
    ],
)
def test_bad_export_requests_are_refused(env, tmp_path, request_fields, code, reason, metadata):
    _, stub = _stubs(env)
    if request_fields == "removed-field":
        request = _removed_field_request(tmp_path)
    else:
        request = labels_pb2.ExportDatasetRequest(destination_uri=tmp_path.as_uri(), **request_fields)
    got = _reason(lambda: stub.ExportDataset(request, timeout=30))
    assert got == (code, reason, metadata)
    assert not any(tmp_path.iterdir())  # nothing written


def test_identified_export_is_admin_only_and_audited(env, exported, tmp_path):
    target = f"127.0.0.1:{env['labels'].port}"
    request = labels_pb2.ExportDatasetRequest(
        case_ids=["case-a"],
        destination_uri=(tmp_path / "id").as_uri(),
        include_dicom_seg=True,
        identity=labels_pb2.EXPORT_IDENTITY_IDENTIFIED,
    )
    with grpc.insecure_channel(target) as channel:
        stub = labels_pb2_grpc.LabelServiceStub(channel)
        for role in ("annotator", "reviewer"):
            code, reason, _ = _reason(
                lambda role=role: stub.ExportDataset(
                    request, metadata=auth.metadata(role, subject=f"mallory-{role}"), timeout=30
                )
            )
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
        admin = auth.metadata("admin", subject="dr-admin")
        job = stub.ExportDataset(request, metadata=admin, timeout=30).job
        assert job.identity == labels_pb2.EXPORT_IDENTITY_IDENTIFIED
        deadline = time.monotonic() + 120
        while job.state not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.2)
            job = stub.GetExportJob(labels_pb2.GetExportJobRequest(job_id=job.job_id), metadata=admin, timeout=30).job
        assert job.state == common_pb2.OPERATION_STATE_SUCCEEDED, job.error_reason
        (o,) = job.dicom_seg_outcomes
        assert o.path == "case-a/dicom_seg/seg.dcm"  # identified: the case id as stored
        seg = pydicom.dcmread(tmp_path / "id" / o.path, stop_before_pixels=True)
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in env["files"]["a"]]
        assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and "PatientIdentityRemoved" not in seg
        records = stub.ListAuditRecords(
            labels_pb2.ListAuditRecordsRequest(principal="dr-admin", page_size=100), metadata=admin, timeout=30
        ).records
        ident = [r for r in records if r.method == IDENTIFIED_EXPORT_METHOD]
        assert [(r.principal, r.job_id, r.outcome) for r in ident] == [("dr-admin", job.job_id, "OK")]
        assert ident[0].time.seconds > 0 and list(ident[0].version_ids)
        assert not [r for r in records if r.principal.startswith("mallory")]  # refused before any handler


def test_unreachable_pacs_is_a_send_failure(env, exported, tmp_path):
    job = _export(
        exported["stub"],
        tmp_path / "out",
        ["case-a"],
        pacs_destination_id="nobody",
    )
    assert job.state == common_pb2.OPERATION_STATE_SUCCEEDED
    (o,) = job.dicom_seg_outcomes
    assert o.state == labels_pb2.DICOM_SEG_STATE_SEND_FAILED and o.reason == "PACS_UNAVAILABLE"
    assert hashlib.sha256((tmp_path / "out" / o.path).read_bytes()).hexdigest() == o.sha256


def test_pacs_destinations_configuration(tmp_path):
    good = {"pacs-a": {"host": "pacs.example.org", "port": 11112, "called_ae": "PACS A&B", "calling_ae": "ME"}}
    assert parse_pacs_destinations(json.dumps(good)) == {
        "pacs-a": PacsDestination("pacs.example.org", 11112, "PACS A&B", "ME")
    }
    (tmp_path / "d.json").write_text(json.dumps(good))
    assert parse_pacs_destinations(str(tmp_path / "d.json")) == parse_pacs_destinations(json.dumps(good))
    assert parse_pacs_destinations("") == {}
    for bad in (
        {"pacs-a": {"host": "h", "port": 0, "called_ae": "P"}},
        {"pacs-a": {"host": "h", "port": 104, "called_ae": "A" * 17}},
        {"pacs-a": {"port": 104, "called_ae": "P"}},
        {"../x": {"host": "h", "port": 104, "called_ae": "P"}},
    ):
        with pytest.raises(ValueError):
            parse_pacs_destinations(json.dumps(bad))


def test_destination_with_query_or_fragment_is_refused(env, tmp_path):
    """labels.proto: destination_uri is file:///absolute/dir, no query or fragment."""
    _, stub = _stubs(env)
    for suffix in ("?x=1", "#part"):
        code, reason, _ = _reason(
            lambda suffix=suffix: stub.ExportDataset(
                labels_pb2.ExportDatasetRequest(destination_uri=tmp_path.as_uri() + suffix, include_dicom_seg=True),
                timeout=30,
            )
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DESTINATION")
    # a percent-encoded "?" is part of the directory name
    assert destination_path((tmp_path / "a?b").as_uri()) == tmp_path / "a?b"


# ------------------------------------------------------------------ job options, outcomes (unit)


@pytest.mark.parametrize(
    "options",
    [
        ExportOptions(),
        ExportOptions(include_dicom_seg=True),
        ExportOptions(include_dicom_seg=True, pacs_destination_id="pacs-a"),
        ExportOptions(deid=DeidOptions(DATES_MODIFIED, clean_descriptors=True)),
        ExportOptions(include_dicom_seg=True, identified=True),
    ],
)
def test_export_options_are_stored_in_the_job_row(tmp_path, options):
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    repo.create_version(
        "c1",
        LocalBlobStore(tmp_path / "b").put(b"lm"),
        LocalBlobStore(tmp_path / "b").put(b"ct"),
        Provenance("ai"),
        "r1",
        organs=(5,),
        shape=(1, 1, 1),
        affine=np.eye(4),
    )
    uri = "file:///exports/run%201"
    job = repo.create_export_job(["c1"], uri, options=options.to_dict())
    repo.close()
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")  # a restart
    stored = repo.get_export_job(job.job_id)
    assert stored.destination_uri == uri  # the client's URI, as given
    assert ExportOptions.from_dict(stored.options) == options
    assert (stored.options == {}) == (options == ExportOptions())  # default: no SEG
    msg = export_to_proto(stored)
    assert msg.destination_uri == uri and msg.include_dicom_seg == options.include_dicom_seg
    assert msg.pacs_destination_id == options.pacs_destination_id
    assert (msg.identity == labels_pb2.EXPORT_IDENTITY_IDENTIFIED) == options.identified
    if not options.identified:
        assert msg.deidentification.clean_descriptors == options.deid.clean_descriptors
    repo.close()


class _Crash(BaseException):
    """The process dying mid-export (not an error the exporter handles)."""


def test_outcomes_are_committed_per_case_and_a_resume_replaces_them(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    ct = np.zeros((6, 5, 4), np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 5
    ct_info = blobs.put(to_nifti_bytes(ct, affine))
    for case in ("case-1", "case-2", "case-3"):
        repo.create_version(
            case,
            blobs.put(to_nifti_bytes(labels, affine)),
            ct_info,
            Provenance("ai", model_version="trio-v1"),
            "r-" + case,
            organs=(5,),
            shape=ct.shape,
            affine=affine,
        )
    options = ExportOptions(include_dicom_seg=True, identified=True)  # case folders by case id
    dest = tmp_path / "out"
    job = repo.create_export_job([], dest.as_uri(), options=options.to_dict())
    calls: list[str] = []

    def first_run(digest: str) -> list[pydicom.Dataset]:
        calls.append(digest)
        if len(calls) == 3:
            raise _Crash()
        raise Unavailable("INGEST_UNAVAILABLE", "down", domain="atlasflow.labels")

    with pytest.raises(_Crash):
        Exporter(repo, blobs, Metrics("labels"), sources=first_run).run_job(job)
    repo.close()

    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")  # the restarted service
    crashed = repo.get_export_job(job.job_id)
    assert (crashed.state, crashed.cases_done) == ("RUNNING", 2)
    kept = repo.list_export_outcomes(job.job_id)
    assert [(o.case_id, o.outcome["state"], o.outcome["reason"]) for o in kept] == [
        ("case-1", "FAILED", "INGEST_UNAVAILABLE"),
        ("case-2", "FAILED", "INGEST_UNAVAILABLE"),
    ]
    assert [
        o.case_id for o in export_to_proto(crashed, [SegOutcome.from_dict(o.outcome) for o in kept]).dicom_seg_outcomes
    ] == ["case-1", "case-2"]

    def not_assembled(_digest: str) -> list[pydicom.Dataset]:
        raise NotFound("SOURCE_SERIES_NOT_FOUND", "no such volume", domain="atlasflow.labels")

    Exporter(repo, blobs, Metrics("labels"), sources=not_assembled).run_job(crashed)
    done = repo.get_export_job(job.job_id)
    assert (done.state, done.cases_done) == ("SUCCEEDED", 3)
    got = [SegOutcome.from_dict(o.outcome) for o in repo.list_export_outcomes(job.job_id)]
    assert [(o.case_id, o.state, o.reason) for o in got] == [
        (c, "REFUSED", "SOURCE_SERIES_NOT_FOUND") for c in ("case-1", "case-2", "case-3")
    ]
    versions = dict(job.versions)
    assert [o.version_id for o in got] == [versions[c] for c in ("case-1", "case-2", "case-3")]
    manifest = {c["case"]: c for c in json.loads((dest / "manifest.json").read_text())["cases"]}
    assert {c: m["dicom_seg"]["state"] for c, m in manifest.items()} == {
        c: "REFUSED" for c in ("case-1", "case-2", "case-3")
    }
    repo.close()


def test_build_case_seg_never_raises(tmp_path):
    labels = np.zeros((4, 4, 2), np.uint8)
    labels[1, 1, 1] = 5
    nifti = to_nifti_bytes(labels, np.eye(4))

    def broken_headers(_digest: str) -> list[pydicom.Dataset]:
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = ds.SOPClassUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2"
        return [ds]  # no geometry at all

    def ingest_down(_digest: str) -> list[pydicom.Dataset]:
        raise Unavailable("INGEST_UNAVAILABLE", "down", domain="atlasflow.labels")

    for fetch, state, reason in (
        (broken_headers, "FAILED", "DICOM_SEG_ERROR"),
        (ingest_down, "FAILED", "INGEST_UNAVAILABLE"),
    ):
        seg, data, outcome = build_case_seg(fetch, "sha256:x", nifti, Provenance("ai"), "v1")
        assert seg is None and data is None
        assert (outcome.state, outcome.reason) == (state, reason)
