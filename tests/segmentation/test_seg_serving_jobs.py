"""Segmentation service job path against a real Triton (wheel-bundled tritonserver serving an
`atlasflow triton-repo` repository of two test-only tiny ensembles).

The segmentation service runs in-process (real gRPC server on port 0, real worker thread,
durable SQLite work table); Triton is started only part-way through, on a port fixed up front,
so the first attempts find it down. Label and ranking services are not running: hand-offs stay
in the outbox, which is what the cancellation test inspects.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from atlasflow.common.app import ServiceApp
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import sync_channel
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.ports import free_ports
from atlasflow.common.v1 import common_pb2
from atlasflow.segmentation.app import build_app
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.segmentation.v1 import segmentation_pb2 as pb
from atlasflow.segmentation.v1 import segmentation_pb2_grpc
from atlasflow.testing import auth
from atlasflow.testing.triton import BundledTriton

TINY = Path(__file__).parent / "tiny_ensembles"
A, B = "tiny-a-v1", "tiny-b-v1"
S = common_pb2


def _volume() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((36, 30, 24), -1000, dtype=np.int16)
    vol[6:30, 5:25, 3:21] = 50
    vol[12:20, 10:18, 8:14] = 200
    return vol, np.diag([-3.0, -3.0, 3.0, 1.0])


class Gated:
    """Real TritonSegmenter behind a gate (open by default) that lets a test hold a job in
    the RUNNING/INFERENCE state."""

    def __init__(self, real: TritonSegmenter) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def segment(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(60)
        return self.real.segment(*args, **kwargs)

    def close(self) -> None:
        self.real.close()


class AppThread:
    """The segmentation ServiceApp on its own event loop in a thread, plus a sync gRPC stub."""

    def __init__(self, settings: SegmentationSettings, segmenters: dict | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app: ServiceApp = self._run(self._build(settings, segmenters))
        # all-roles token from ATLASFLOW_TOKEN_FILE (atlasflow.testing.auth.install)
        self.channel = sync_channel(f"127.0.0.1:{self.app.port}")
        self.stub = segmentation_pb2_grpc.SegmentationServiceStub(self.channel)

    async def _build(self, settings: SegmentationSettings, segmenters: dict | None) -> ServiceApp:
        app = await build_app(settings, segmenters=segmenters)
        await app.start()
        return app

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def get(self, job_id: str) -> pb.SegmentationJob:
        return self.stub.GetSegmentationJob(pb.GetSegmentationJobRequest(job_id=job_id)).job

    def wait(self, job_id: str, pred: Callable[[pb.SegmentationJob], bool], timeout: float = 60) -> pb.SegmentationJob:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if pred(job):
                return job
            assert time.monotonic() < deadline, f"timed out; job is {job}"
            time.sleep(0.05)

    def outbox_keys(self, job_id: str) -> list[str]:
        jobs = self.app.parts["jobs"]
        with jobs.db.read() as conn:
            rows = conn.execute(
                sa.text("SELECT dedupe_key FROM outbox WHERE dedupe_key LIKE :p"), {"p": f"{job_id}:%"}
            ).all()
        return sorted(r[0] for r in rows)

    def close(self) -> None:
        self.channel.close()
        self._run(self.app.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _settings(tmp: Path, triton_port: int, **kw) -> SegmentationSettings:
    dead = free_ports(2)
    base = dict(
        grpc_port=0,
        data_dir=str(tmp / "data"),
        blob_dir=str(tmp / "blobs"),
        triton_url=f"127.0.0.1:{triton_port}",
        ensemble=f"{TINY / (A + '.json')},{TINY / (B + '.json')}",
        labels_target=f"127.0.0.1:{dead[0]}",
        ranking_target=f"127.0.0.1:{dead[1]}",
        retry_base_s=0.3,
        max_backoff_s=1.0,
        max_attempts=100,
        worker_poll_s=0.05,
        triton_connect_retries=1,
        triton_timeout_s=60.0,
        **auth.auth_settings("segmentation"),
    )
    base.update(kw)
    return SegmentationSettings(**base)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("segjobs")
    for name in (A, B):
        write_repository(tmp / "models", TINY / f"{name}.json", kind="cpu")
    (port,) = free_ports(1)
    triton = BundledTriton(tmp / "models", tmp, ["tiny_a_v1", "tiny_b_v1"], grpc_port=port)
    settings = _settings(tmp, port)
    gated = {
        v: Gated(
            TritonSegmenter(
                settings.triton_url, v.replace("-", "_"), connect_retries=1, retry_backoff_s=0.1, timeout_s=60
            )
        )
        for v in (A, B)
    }
    app = AppThread(settings, gated)
    vol, aff = _volume()
    blob = LocalBlobStore(settings.blob_dir).put(to_nifti_bytes(vol, aff))
    ns = SimpleNamespace(
        app=app,
        triton=triton,
        gated=gated,
        blob=blob,
        tmp=tmp,
        vol=vol,
        aff=aff,
        blobs=LocalBlobStore(settings.blob_dir),
    )

    def ensure_triton() -> None:
        if triton.proc is None:
            triton.start()

    ns.ensure_triton = ensure_triton
    yield ns
    app.close()
    triton.stop()


def _request(ns: SimpleNamespace, series: str, version: int = 1, ensemble: str = "") -> pb.SegmentSeriesRequest:
    return pb.SegmentSeriesRequest(
        case_id="case-1",
        series_id=series,
        series_version=version,
        ensemble_version=ensemble,
        volume=S.BlobRef(digest=ns.blob.digest, size_bytes=ns.blob.size_bytes),
    )


def test_triton_down_job_stays_queued_then_succeeds_when_triton_starts(stack: SimpleNamespace) -> None:
    assert stack.triton.proc is None
    job = stack.app.stub.SegmentSeries(_request(stack, "ser-down")).job
    queued = stack.app.wait(job.job_id, lambda j: j.attempts >= 2 and j.state == S.OPERATION_STATE_QUEUED)
    assert queued.error_reason == "TRITON_UNAVAILABLE"
    assert queued.HasField("next_attempt_time") and not queued.HasField("result")
    assert stack.app.outbox_keys(job.job_id) == []
    stack.ensure_triton()
    done = stack.app.wait(job.job_id, lambda j: j.state == S.OPERATION_STATE_SUCCEEDED, timeout=60)
    assert done.attempts >= 3 and done.error_reason == ""
    assert list(done.result.members) == ["unet_a", "unet_b"]
    labels, affine = from_nifti_bytes(stack.blobs.get(done.result.label_map.digest))
    local = EnsemblePipeline(str(TINY / f"{A}.json"))(stack.vol, stack.aff)
    np.testing.assert_array_equal(labels, local.labels)
    np.testing.assert_allclose(affine, stack.aff)
    assert stack.app.outbox_keys(job.job_id) == [f"{job.job_id}:labels", f"{job.job_id}:ranking"]


def test_triton_down_too_long_fails_clearly(tmp_path: Path, stack: SimpleNamespace) -> None:
    (dead,) = free_ports(1)
    settings = _settings(tmp_path, dead, max_attempts=2, retry_base_s=0.1)
    app = AppThread(settings)
    try:
        blob = LocalBlobStore(settings.blob_dir).put(to_nifti_bytes(stack.vol, stack.aff))
        job = app.stub.SegmentSeries(
            pb.SegmentSeriesRequest(
                case_id="c",
                series_id="s",
                series_version=1,
                volume=S.BlobRef(digest=blob.digest, size_bytes=blob.size_bytes),
            )
        ).job
        failed = app.wait(job.job_id, lambda j: j.state == S.OPERATION_STATE_FAILED, timeout=30)
        assert failed.error_reason == "TRITON_UNAVAILABLE" and failed.attempts == 2
        assert app.outbox_keys(job.job_id) == []
    finally:
        app.close()


def test_idempotent_by_series_version_and_ensemble(stack: SimpleNamespace) -> None:
    stack.ensure_triton()
    first = stack.app.stub.SegmentSeries(_request(stack, "ser-idem")).job
    again = stack.app.stub.SegmentSeries(_request(stack, "ser-idem", ensemble=A)).job
    assert again.job_id == first.job_id and again.ensemble_version == A
    done = stack.app.wait(first.job_id, lambda j: j.state == S.OPERATION_STATE_SUCCEEDED)
    replay = stack.app.stub.SegmentSeries(_request(stack, "ser-idem")).job
    assert replay.job_id == first.job_id and replay.state == S.OPERATION_STATE_SUCCEEDED
    assert replay.attempts == done.attempts == 1
    v2 = stack.app.stub.SegmentSeries(_request(stack, "ser-idem", version=2)).job
    other = stack.app.stub.SegmentSeries(_request(stack, "ser-idem", ensemble=B)).job
    assert len({first.job_id, v2.job_id, other.job_id}) == 3
    other_done = stack.app.wait(other.job_id, lambda j: j.state == S.OPERATION_STATE_SUCCEEDED)
    assert other_done.ensemble_version == B and list(other_done.result.members) == ["unet_a", "unet_b"]
    # tiny-b has other seeds than tiny-a: its label map comes from its own Triton model
    b_labels, _ = from_nifti_bytes(stack.blobs.get(other_done.result.label_map.digest))
    np.testing.assert_array_equal(b_labels, EnsemblePipeline(str(TINY / f"{B}.json"))(stack.vol, stack.aff).labels)
    stack.app.wait(v2.job_id, lambda j: j.state == S.OPERATION_STATE_SUCCEEDED)
    listed = stack.app.stub.ListSegmentationJobs(pb.ListSegmentationJobsRequest(case_id="case-1", page_size=100)).jobs
    assert sum(1 for j in listed if j.series_id == "ser-idem") == 3


def test_cancel_queued_and_running(stack: SimpleNamespace) -> None:
    stack.ensure_triton()
    gated = stack.gated[A]
    gated.gate.clear()
    gated.entered.clear()
    try:
        running = stack.app.stub.SegmentSeries(_request(stack, "ser-cancel-running")).job
        assert gated.entered.wait(30)
        assert stack.app.get(running.job_id).state == S.OPERATION_STATE_RUNNING
        queued = stack.app.stub.SegmentSeries(_request(stack, "ser-cancel-queued")).job
        assert queued.state == S.OPERATION_STATE_QUEUED
        cancelled = stack.app.stub.CancelSegmentationJob(pb.CancelSegmentationJobRequest(job_id=queued.job_id)).job
        assert cancelled.state == S.OPERATION_STATE_CANCELLED
        still = stack.app.stub.CancelSegmentationJob(pb.CancelSegmentationJobRequest(job_id=running.job_id)).job
        assert still.state == S.OPERATION_STATE_RUNNING  # takes effect at the next step boundary
    finally:
        gated.gate.set()
    final = stack.app.wait(
        running.job_id, lambda j: j.state not in (S.OPERATION_STATE_RUNNING, S.OPERATION_STATE_QUEUED)
    )
    assert final.state == S.OPERATION_STATE_CANCELLED and not final.HasField("result")
    assert stack.app.outbox_keys(running.job_id) == []
    time.sleep(0.3)
    q = stack.app.get(queued.job_id)
    assert q.state == S.OPERATION_STATE_CANCELLED and q.attempts == 0
    terminal = stack.app.stub.CancelSegmentationJob(pb.CancelSegmentationJobRequest(job_id=running.job_id)).job
    assert terminal.state == S.OPERATION_STATE_CANCELLED


def test_wait_returns_when_the_job_is_done_not_before(stack: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """WaitSegmentationJob: a short timeout returns the still-running job; a long one returns
    as soon as the job succeeds, woken by the job store (the periodic re-check is pushed out to
    60 s here, so only the wake-up can end the wait in time)."""
    from google.protobuf import duration_pb2

    import atlasflow.segmentation.servicer as servicer

    monkeypatch.setattr(servicer, "WAIT_RECHECK_S", 60.0)
    stack.ensure_triton()
    gated = stack.gated[A]
    gated.gate.clear()
    gated.entered.clear()
    try:
        job = stack.app.stub.SegmentSeries(_request(stack, "ser-wait")).job
        assert gated.entered.wait(30)
        t0 = time.monotonic()
        early = stack.app.stub.WaitSegmentationJob(
            pb.WaitSegmentationJobRequest(job_id=job.job_id, timeout=duration_pb2.Duration(nanos=300_000_000))
        ).job
        assert early.state == S.OPERATION_STATE_RUNNING and 0.25 < time.monotonic() - t0 < 5
        opener = threading.Timer(0.5, gated.gate.set)
        opener.start()
        t0 = time.monotonic()
        done = stack.app.stub.WaitSegmentationJob(
            pb.WaitSegmentationJobRequest(job_id=job.job_id, timeout=duration_pb2.Duration(seconds=60))
        ).job
        waited = time.monotonic() - t0
    finally:
        gated.gate.set()
    assert done.state == S.OPERATION_STATE_SUCCEEDED and done.HasField("result")
    assert waited < 20
    # a done job returns at once; an unknown one is NOT_FOUND
    t0 = time.monotonic()
    again = stack.app.stub.WaitSegmentationJob(pb.WaitSegmentationJobRequest(job_id=job.job_id)).job
    assert again.state == S.OPERATION_STATE_SUCCEEDED and time.monotonic() - t0 < 1
    with pytest.raises(grpc.RpcError) as err:
        stack.app.stub.WaitSegmentationJob(pb.WaitSegmentationJobRequest(job_id="seg-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
