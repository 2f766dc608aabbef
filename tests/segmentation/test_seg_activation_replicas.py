"""Several segmentation replicas serve one activated ensemble version (issue 17).

Real peers: one PyTriton process (`atlasflow.segmentation.triton_server --versions-dir`, the
test-only tiny ensemble) and in-process segmentation apps (`build_app`, gRPC with
authentication) sharing one real PostgreSQL database (and SQLite for the restart). Versions are
written as training writes them (`tests/training/test_training_reinfer.py` ``_version``).

- ``ActivateEnsembleVersion`` on replica A records the version in the database and replica B
  serves it within seconds (its follower verified and activated it); a job submitted through B
  gets the recorded version;
- a replica whose copy of the version is corrupt claims no job (gauge ``in_step`` 0, the job
  stays QUEUED) until its copy is repaired, then follows and runs the job on the new version;
- a restart serves the recorded version, not a stale ``versions/CURRENT``; a job created for
  another version keeps it (the replica binds that version for the job).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tests.training.test_training_reinfer import ADMIN, TINY, TRAINING, _version

from atlasflow.common.clients import raw_channel
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.tls import PLAINTEXT
from atlasflow.common.v1 import common_pb2
from atlasflow.segmentation.activation import verify_version_card
from atlasflow.segmentation.app import build_app
from atlasflow.segmentation.gauges import version_readings
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.segmentation.v1 import segmentation_pb2 as pb
from atlasflow.segmentation.v1 import segmentation_pb2_grpc
from atlasflow.testing import auth
from atlasflow.testing.postgres import PostgresCluster
from atlasflow.testing.triton import LocalTriton

Q = common_pb2.OPERATION_STATE_QUEUED


def _until(check: Callable[[], object], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` holds (fails after ``timeout_s``: a loaded machine is slow)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresCluster) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("replicas")
    state = root / "state"
    (state / "versions").mkdir(parents=True)
    good, stale = _version(state, 0.01), _version(state, 0.04)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    triton = LocalTriton(["--ensemble", str(TINY), "--versions-dir", str(state / "versions")], env=env).start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    apps: list[Any] = []

    def start(name: str, database: str, versions_dir: Path = state / "versions") -> Any:
        settings = SegmentationSettings(
            grpc_port=0,
            data_dir=str(root / name),
            blob_dir=str(root / "blobs"),
            database_url=database,
            triton_url=triton.url,
            ensemble=str(TINY),
            labels_target="127.0.0.1:9",  # hand-offs stay in the outbox: not what this tests
            ranking_target="127.0.0.1:9",
            versions_dir=str(versions_dir),
            worker_poll_s=0.2,
            version_poll_s=0.3,
            prior_refresh_s=0,
            **auth.auth_settings("segmentation"),
        )
        (root / name).mkdir(exist_ok=True)

        async def go() -> Any:
            app = await build_app(settings)
            await app.start()
            return app

        app = asyncio.run_coroutine_threadsafe(go(), loop).result(120)
        app.stub = segmentation_pb2_grpc.SegmentationServiceStub(raw_channel(f"127.0.0.1:{app.port}", PLAINTEXT))
        apps.append(app)
        return app

    def stop(app: Any) -> None:
        if app in apps:
            apps.remove(app)
            asyncio.run_coroutine_threadsafe(app.stop(0), loop).result(120)

    try:
        yield SimpleNamespace(
            root=root, state=state, good=good, stale=stale, db=postgres.create_database(), start=start, stop=stop
        )
    finally:
        for app in list(apps):
            stop(app)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        triton.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(app: Any, root: Path, case_id: str) -> pb.SegmentationJob:
    from atlasflow.common.blobstore import LocalBlobStore

    vol = np.full((24, 20, 16), -1000, dtype=np.int16)
    vol[4:20, 4:16, 2:14] = 50
    blob = LocalBlobStore(root / "blobs").put(to_nifti_bytes(vol, np.diag([-3.0, -3.0, 3.0, 1.0])))
    req = pb.SegmentSeriesRequest(
        case_id=case_id,
        series_id=f"series-{case_id}",
        series_version=1,
        volume=common_pb2.BlobRef(digest=blob.digest, size_bytes=blob.size_bytes),
    )
    return app.stub.SegmentSeries(req, metadata=ADMIN).job


def _done(app: Any, get: pb.GetSegmentationJobRequest) -> pb.SegmentationJob | None:
    """The job once it is done (None while QUEUED or RUNNING)."""
    job = app.stub.GetSegmentationJob(get, metadata=ADMIN).job
    return None if job.state in (Q, common_pb2.OPERATION_STATE_RUNNING) else job


def test_a_version_activated_on_one_replica_is_served_by_the_other(world: SimpleNamespace) -> None:
    a, b = world.start("a", world.db), world.start("b", world.db)
    try:
        base = b.parts["registry"].state.default
        assert base == "tiny-a-v1" and b.parts["current_version"].may_claim()
        answer = a.stub.ActivateEnsembleVersion(
            pb.ActivateEnsembleVersionRequest(ensemble_version=world.good), metadata=TRAINING
        )
        assert answer.ensemble_version == world.good and answer.previous_version == base
        assert a.parts["registry"].state.default == world.good  # the replica that got the call: at once
        record = b.parts["jobs"].served_version()  # the shared database
        assert (record.version, record.activated_by) == (world.good, "svc:training")
        assert record.card_digest == verify_version_card(world.state / "versions", world.good)[1]
        # a job submitted through B right away already names the activated version
        assert _submit(b, world.root, "case-b").ensemble_version == world.good
        seconds = _until(lambda: b.parts["registry"].state.default == world.good, 60, "B did not follow")
        print(f"replica B served {world.good} {seconds:.2f} s after A's activation (poll 0.3 s)")
        follower = b.parts["current_version"]
        assert follower.may_claim() and follower.in_step
        assert {(r.family, r.label, r.value) for r in version_readings(follower)} == {
            ("atlasflow_ensemble_version_served", world.good, 1.0),
            ("atlasflow_ensemble_version_in_step", "", 1.0),
        }
        # activating it again through B: already active, the record (first activation) kept
        again = b.stub.ActivateEnsembleVersion(
            pb.ActivateEnsembleVersionRequest(ensemble_version=world.good), metadata=TRAINING
        )
        assert again.already_active and b.parts["jobs"].served_version() == record
    finally:
        world.stop(a)
        world.stop(b)


def test_a_replica_that_cannot_serve_the_version_claims_nothing(world: SimpleNamespace) -> None:
    store = JobStore(world.db)
    try:
        card = verify_version_card(world.state / "versions", world.good)[1]
        store.record_served_version(world.good, card, "svc:training")
    finally:
        store.close()
    bad = world.root / "bad-versions"  # this replica's copy of the version: one member's weights corrupt
    shutil.copytree(world.state / "versions", bad)
    weights = bad / world.good / "unet_a.pt"
    weights.write_bytes(b"not the weights")
    c = world.start("c", world.db, versions_dir=bad)
    try:
        follower = c.parts["current_version"]
        _until(lambda: follower.blocked == (world.good, "VERSION_DIGEST_MISMATCH"), 60, "C did not refuse")
        assert not follower.may_claim() and c.parts["registry"].state.default == "tiny-a-v1"
        assert ("atlasflow_ensemble_version_in_step", "", 0.0) in {
            (r.family, r.label, r.value) for r in version_readings(follower)
        }
        job = _submit(c, world.root, "case-c")
        assert job.ensemble_version == world.good  # never the old default
        time.sleep(2.0)  # ten worker polls
        get = pb.GetSegmentationJobRequest(job_id=job.job_id)
        assert c.stub.GetSegmentationJob(get, metadata=ADMIN).job.state == Q  # not claimed under tiny-a-v1
        shutil.copyfile(world.state / "versions" / world.good / "unet_a.pt", weights)  # repaired
        _until(lambda: c.parts["registry"].state.default == world.good, 60, "C did not follow after the repair")
        _until(lambda: _done(c, get), 120, "the job did not run on the followed version")
        assert _done(c, get).state == common_pb2.OPERATION_STATE_SUCCEEDED, _done(c, get)
        assert follower.in_step and follower.blocked == ("", "")
    finally:
        world.stop(c)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_restart_serves_the_recorded_version_over_a_stale_current(world: SimpleNamespace, backend: str) -> None:
    (world.state / "versions" / "CURRENT").write_text(world.stale + "\n")
    database = world.db if backend == "postgresql" else str(world.root / "restart.sqlite3")
    store = JobStore(database)
    try:
        store.record_served_version(world.good, verify_version_card(world.state / "versions", world.good)[1])
    finally:
        store.close()
    d = world.start(f"d-{backend}", database)
    try:
        assert d.parts["current_version"].done.wait(60)
        state = d.parts["registry"].state
        assert state.default == world.good and world.stale not in state.versions
        if backend == "postgresql":
            # a job created for another version (on another replica, while it was activated)
            # keeps it: this replica serves it for the job, its default unchanged
            old = _submit(d, world.root, "case-d")
            job, _ = d.parts["jobs"].submit(
                case_id="case-d",
                series_id=old.series_id,
                series_version=2,
                ensemble_version=world.stale,
                volume_digest=d.parts["jobs"].get(old.job_id).volume_digest,
                volume_size=1,
                labelled_organs=[],
                traceparent="",
            )
            d.parts["worker"].wake.set()
            get = pb.GetSegmentationJobRequest(job_id=job.job_id)
            _until(lambda: _done(d, get), 120, "the job of the other version did not run")
            assert _done(d, get).state == common_pb2.OPERATION_STATE_SUCCEEDED, _done(d, get)
            state = d.parts["registry"].state
            assert state.default == world.good and world.stale in state.versions
    finally:
        world.stop(d)
        (world.state / "versions" / "CURRENT").unlink()


def test_the_record_on_both_backends(db_url: str) -> None:
    clock = iter(float(t) for t in range(100, 200))
    store = JobStore(db_url, clock=lambda: next(clock))
    try:
        assert store.served_version() is None
        first = store.record_served_version("v1", "sha256:aa", "svc:training")
        assert (first.version, first.card_digest, first.activated_by, first.activated_at) == (
            "v1",
            "sha256:aa",
            "svc:training",
            100.0,
        )
        assert store.record_served_version("v1", "sha256:aa", "svc:other") == first  # the same: kept
        second = store.record_served_version("v2", "sha256:bb", "svc:training")
        assert (second.version, second.activated_at) == ("v2", 102.0) and store.served_version() == second
    finally:
        store.close()
