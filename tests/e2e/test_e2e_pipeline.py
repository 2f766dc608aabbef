"""End to end, over real gRPC between separate processes, with a real Triton server (PyTriton),
dcmtk's storescu as the DICOM peer, and an OTLP receiver of the test's own collecting the
spans every process exports.

One deployment serves the whole module (Triton start-up and CPU inference dominate the cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from atlasflow.cli.demo_series import SENTINEL_PATIENT_DATA, write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.common.auth import TokenSource
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.server import error_info_of
from atlasflow.ingest.client import UploadError, send_files, upload_requests
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

pytestmark = pytest.mark.e2e

DEMO_CT = Path(__file__).resolve().parents[2] / "services" / "atlasflow" / "cli" / "data" / "example_ct.nii.gz"


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Minimal OTLP/gRPC trace receiver: keeps every exported span with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            {
                                "service": attrs.get("service.name", ""),
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "kind": s.kind,
                                "attributes": {a.key: str(a.value) for a in s.attributes},
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def otlp():
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, otlp):
    _receiver, port = otlp
    state = tmp_path_factory.mktemp("state")
    dep = LocalDeployment.create(
        state,
        auto_ports=True,
        quiet_period_s=2.0,
        accepted_aets=("E2E", "E2EBAD"),
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        },
    )
    dep.start()
    try:
        dep.wait_healthy(240)
        yield dep
    finally:
        dep.stop()


def stubs(dep: LocalDeployment):
    """Stubs as the stack's operator (role admin, a token of the stack's own issuer)."""

    def channel(service: str) -> grpc.Channel:
        return grpc.intercept_channel(dep.bare_channel(service), Bearer(dep.mint("admin", "e2e-operator")))

    return (
        ingest_pb2_grpc.IngestServiceStub(channel("ingest")),
        segmentation_pb2_grpc.SegmentationServiceStub(channel("segmentation")),
        labels_pb2_grpc.LabelServiceStub(channel("labels")),
        ranking_pb2_grpc.RankingServiceStub(channel("ranking")),
    )


def connector(dep: LocalDeployment) -> TokenSource:
    """A PACS connector's token for this stack (the test session's own token is another issuer's)."""
    return dep.token_source("connector", "e2e-connector")


class Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a bearer token to every call (plain channels: no retries that would hide a kill)."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with(self, details):
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)


def storescu(files: list[Path], port: int) -> subprocess.CompletedProcess:
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (scripts/bootstrap.sh installs it)"
    return subprocess.run(
        [exe, "-aet", "E2E", "-aec", "ATLASFLOW", "127.0.0.1", str(port), *map(str, files)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_case(dep: LocalDeployment, case_id: str, timeout_s: float = 400) -> tuple:
    _ingest, _seg, labels, ranking = stubs(dep)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            versions = labels.ListLabelVersions(
                labels_pb2.ListLabelVersionsRequest(case_id=case_id), timeout=5
            ).versions
            item = ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case_id), timeout=5).item
            if versions:
                return versions[0], item
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise AssertionError(f"case {case_id} did not complete in {timeout_s} s")


def series_of(dep: LocalDeployment, n_expected: int, timeout_s: float = 30):
    ingest = stubs(dep)[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        series = ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series
        if len(series) >= n_expected:
            return series
        time.sleep(0.3)
    raise AssertionError("series did not appear")


@pytest.fixture(scope="module")
def first_case(deployment, tmp_path_factory):
    files = write_demo_series(DEMO_CT, tmp_path_factory.mktemp("dicom"), seed_name="e2e-one")
    result = storescu(files, deployment.ports["dicom"])
    assert result.returncode == 0, result.stderr
    series = series_of(deployment, 1)[0]
    assert series.instance_count == len(files)
    version, item = wait_case(deployment, series.case_id)
    return series, version, item


def test_study_flows_through_every_service_and_geometry_round_trips(deployment, first_case):
    series, version, item = first_case
    ingest, seg, _labels, _ranking = stubs(deployment)
    s = ingest.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series.series_id)).series
    assert s.state == ingest_pb2.SERIES_STATE_DISPATCHED

    ref = nib.load(str(DEMO_CT))
    blobs = LocalBlobStore(deployment.blob_dir)
    ct, ct_affine = from_nifti_bytes(blobs.get(s.volume.digest))
    # The assembled volume is the original CT: HU exact, affine within 1e-4 mm (after RAS
    # canonicalisation of both, since DICOM slice order may differ from the NIfTI's).
    canon_ref = nib.as_closest_canonical(ref)
    canon_ct = nib.as_closest_canonical(nib.Nifti1Image(ct, ct_affine))
    np.testing.assert_array_equal(np.asarray(canon_ct.dataobj), np.asarray(canon_ref.dataobj))
    np.testing.assert_allclose(canon_ct.affine, canon_ref.affine, atol=1e-4)

    # The AI label version is on the CT's grid exactly, with valid ids and AI provenance.
    labels, label_affine = from_nifti_bytes(blobs.get(version.label_map.digest))
    assert labels.shape == ct.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(label_affine, ct_affine)
    assert set(np.unique(labels)) <= set(range(10))
    assert version.provenance.source == labels_pb2.LABEL_SOURCE_AI
    assert version.provenance.model_version == "abdomen-trio-v1"
    assert version.ct.digest == s.volume.digest

    job = seg.GetSegmentationJob(segmentation_pb2.GetSegmentationJobRequest(job_id=version.provenance.job_id)).job
    assert job.result.members == ["unet", "swin_unetr", "dynunet"]
    heat, heat_affine = from_nifti_bytes(blobs.get(job.result.heatmap.digest))
    assert heat.shape == ct.shape and heat.dtype == np.uint8
    np.testing.assert_array_equal(heat_affine, ct_affine)

    # The worklist entry is ranked and derived from the attention statistics.
    assert item.rank >= 1 and len(item.organs) == 9
    # Plausibility findings travel with the attention: a score, reasons and a pointer (where
    # to look) for each present organ; the case priority sums the organs' scores.
    scored = [o for o in item.organs if o.HasField("score")]
    assert scored, "no organ carries a plausibility score"
    assert all(o.reasons for o in scored if o.score > 0)  # an organ with nothing to say has score 0
    assert any(o.HasField("pointer") for o in scored)
    for o in scored:
        if o.HasField("pointer"):
            b = o.pointer.voxel_box
            assert 0 <= b.x_min <= b.x_max < ct.shape[0] and 0 <= b.z_min <= b.z_max < ct.shape[2]
    assert item.priority == pytest.approx(sum(o.score for o in scored), rel=1e-6)
    heat_ml = [o.heatmap_ml for o in item.organs]
    assert heat_ml == sorted(heat_ml, reverse=True)


def test_one_trace_follows_the_study_through_all_services(deployment, first_case, otlp):
    receiver, _port = otlp
    series, _version, _item = first_case
    trace_id = stubs(deployment)[0].GetSeries(ingest_pb2.GetSeriesRequest(series_id=series.series_id)).series.trace_id
    assert len(trace_id) == 32
    deadline = time.monotonic() + 20
    needed = {"atlasflow-ingest", "atlasflow-segmentation", "atlasflow-labels", "atlasflow-ranking"}

    def roots_of(spans: list[dict]) -> list[dict]:
        ids = {s["span_id"] for s in spans}
        return [s for s in spans if not s["parent"] or s["parent"] not in ids]

    # Each process exports its spans in batches, so a child can arrive before its parent: wait
    # for the complete tree, not just for the services.
    while time.monotonic() < deadline:
        with receiver.lock:
            in_trace = [s for s in receiver.spans if s["trace_id"] == trace_id]
        if (
            needed <= {s["service"] for s in in_trace}
            and any(s["name"] == "triton.infer" for s in in_trace)
            and any(s["name"].endswith("/RecordLabelVersion") for s in in_trace)
            and len(roots_of(in_trace)) == 1
        ):
            break
        time.sleep(0.5)
    services = {s["service"] for s in in_trace}
    assert needed <= services, services
    names = {(s["service"], s["name"]) for s in in_trace}
    assert ("atlasflow-ingest", "ingest.assemble") in names
    assert ("atlasflow-segmentation", "/atlasflow.segmentation.v1.SegmentationService/SegmentSeries") in names
    assert ("atlasflow-labels", "/atlasflow.labels.v1.LabelService/CreateLabelVersion") in names
    assert ("atlasflow-ranking", "/atlasflow.ranking.v1.RankingService/SubmitAttention") in names
    triton = [s for s in in_trace if s["name"] == "triton.infer"]
    assert triton and all(s["kind"] == 3 for s in triton)  # SPAN_KIND_CLIENT
    # every span's parent is in the trace (one connected tree, one root)
    roots = roots_of(in_trace)
    assert len(roots) == 1, [(r["service"], r["name"]) for r in roots]
    # labels told ranking about the version, in the same trace
    assert ("atlasflow-ranking", "/atlasflow.ranking.v1.RankingService/RecordLabelVersion") in names


def test_no_patient_data_in_logs_or_spans(deployment, first_case, otlp):
    receiver, _port = otlp
    sentinels = list(SENTINEL_PATIENT_DATA.values())
    assert sentinels
    logs = "".join(p.read_text(errors="replace") for p in (deployment.state_dir / "logs").glob("*.log"))
    assert "series assembled" in logs  # the logs are really there
    with receiver.lock:
        spans = json.dumps(receiver.spans)
    assert len(receiver.spans) > 10
    for value in sentinels:
        for variant in {value, value.replace("^", " ")}:
            assert variant not in logs
            assert variant not in spans


def _dataset(path: Path):
    return dcmread(path)


def _cstore(port: int, datasets) -> list[int]:
    ae = AE(ae_title="E2EBAD")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ATLASFLOW")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_bad_input_is_rejected_and_nothing_accepted_is_lost(deployment, first_case, tmp_path):
    series, _version, _item = first_case
    ingest = stubs(deployment)[0]
    before = ingest.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series.series_id)).series

    files = write_demo_series(DEMO_CT, tmp_path / "bad", seed_name="e2e-bad")[:3]
    not_ct = _dataset(files[0])
    not_ct.Modality = "MR"
    no_uid = _dataset(files[1])
    no_uid.StudyInstanceUID = ""  # (an empty SOP Instance UID cannot even be sent by an SCU)
    truncated = _dataset(files[2])
    truncated.PixelData = truncated.PixelData[:100]
    statuses = _cstore(deployment.ports["dicom"], [not_ct, no_uid, truncated])
    assert all(s != 0 for s in statuses), statuses
    assert statuses[0] == 0xA900  # NOT_CT: data set does not match SOP class
    assert statuses[1] == 0xA901
    assert statuses[2] == 0xC220

    # gRPC: two good instances, then bytes that are not DICOM -> INVALID_ARGUMENT + ErrorInfo;
    # the two good ones stay durable.
    good = write_demo_series(DEMO_CT, tmp_path / "good", seed_name="e2e-grpc")[:2]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(grpc.RpcError) as err:  # the raw stream: status + ErrorInfo
        ingest.UploadInstances(upload_requests([*good, junk]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(err.value)
    assert info is not None and info.reason == "NOT_DICOM" and info.domain == "atlasflow.ingest"
    with pytest.raises(UploadError) as uerr:  # the client library (resumable uploads)
        send_files([junk], deployment.target("ingest"), token=connector(deployment), tls=deployment.client_tls())
    assert uerr.value.reason == "NOT_DICOM"
    receipts = send_files(
        good, deployment.target("ingest"), token=connector(deployment), tls=deployment.client_tls()
    )  # retry: idempotent duplicates
    assert [r.duplicate for r in receipts] == [True, True]
    grpc_series = ingest.GetSeries(ingest_pb2.GetSeriesRequest(series_id=receipts[0].series_id)).series
    assert grpc_series.instance_count == 2

    # checksum mismatch on upload
    data = good[0].read_bytes()
    req = ingest_pb2.UploadInstancesRequest(
        client_ref="x", chunk=data, last_chunk=True, sha256=hashlib.sha256(b"other").hexdigest()
    )
    with pytest.raises(grpc.RpcError) as err2:
        ingest.UploadInstances(iter([req]))
    assert error_info_of(err2.value).reason == "CHECKSUM_MISMATCH"

    after = ingest.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series.series_id)).series
    assert (after.instance_count, after.version, after.state) == (before.instance_count, before.version, before.state)


def test_killed_services_resume_the_study_after_restart(deployment, first_case, tmp_path):
    ingest, seg, _labels, _ranking = stubs(deployment)
    files = write_demo_series(DEMO_CT, tmp_path / "crash", seed_name="e2e-crash")
    # Labels goes down before the study arrives; segmentation is killed mid-inference.
    deployment.kill("labels")
    assert storescu(files, deployment.ports["dicom"]).returncode == 0
    series_id = atlas_id("ser", dcmread(files[0]).SeriesInstanceUID)
    deadline = time.monotonic() + 30
    while not [s for s in series_of(deployment, 1) if s.series_id == series_id]:
        assert time.monotonic() < deadline, "series not received"
        time.sleep(0.3)
    case_id = atlas_id("case", dcmread(files[0]).StudyInstanceUID)
    deadline = time.monotonic() + 60
    running = False
    while time.monotonic() < deadline and not running:
        jobs = seg.ListSegmentationJobs(segmentation_pb2.ListSegmentationJobsRequest(case_id=case_id)).jobs
        running = bool(jobs) and jobs[0].progress.stage == segmentation_pb2.JOB_STAGE_INFERENCE
        time.sleep(0.3)
    assert running, "the job never reached inference"
    deployment.kill("segmentation")
    deployment.start(["segmentation", "labels"])
    deployment.wait_healthy(120, ["segmentation", "labels"])
    version, item = wait_case(deployment, case_id)
    job = seg.GetSegmentationJob(segmentation_pb2.GetSegmentationJobRequest(job_id=version.provenance.job_id)).job
    assert job.attempts == 2  # the killed attempt + the resumed one
    assert item.case_id == case_id
    # exactly one label version despite the replays
    labels = stubs(deployment)[2]
    assert len(labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case_id)).versions) == 1
