"""Roll-out without restart on the embedded path, against a real stack: the PyTriton server
process (`atlasflow.segmentation.triton_server`, two test-only tiny ensembles' worth of work)
and in-process labels, ranking and segmentation gRPC servers with authentication on.

A promoted version (written by `atlasflow.training.versions.write_version`) is activated through
segmentation's ``ActivateEnsembleVersion`` as ``svc:training``; without a restart a new
``SegmentSeries`` runs on it (job and label version record it); the re-inference of the
undecided cases (`atlasflow.training.reinfer`, the training service's code over
`atlasflow.training.peers`) re-segments them in worklist order under the caller's trace and
never replaces the organ a human decided; unknown and corrupt versions and wrong callers are
refused with their specific errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider

from atlasflow.common.auth import TokenSource, service_subject
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import raw_channel
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.server import error_info_of
from atlasflow.common.tls import PLAINTEXT
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.app import build_app as build_labels
from atlasflow.labels.settings import LabelsSettings
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.app import build_app as build_ranking
from atlasflow.ranking.settings import RankingSettings
from atlasflow.segmentation.app import build_app as build_segmentation
from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.segmentation.models import build_member
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.segmentation.v1 import segmentation_pb2 as pb
from atlasflow.segmentation.v1 import segmentation_pb2_grpc
from atlasflow.testing import auth
from atlasflow.testing.triton import LocalTriton
from atlasflow.training.app import build_app as build_training
from atlasflow.training.dataset import collect_decisions
from atlasflow.training.labels_source import LabelsDecisionSource
from atlasflow.training.peers import ServicePeers
from atlasflow.training.reinfer import reinfer_undecided, undecided_in_order
from atlasflow.training.settings import TrainingSettings
from atlasflow.training.v1 import training_pb2, training_pb2_grpc
from atlasflow.training.versions import write_version

TINY = Path(__file__).resolve().parents[1] / "segmentation" / "tiny_ensembles" / "tiny-a-v1.json"
ADMIN = auth.metadata("admin", "dr-admin")
TRAINING = auth.service_metadata("training")
LIVER = 5
DONE = {common_pb2.OPERATION_STATE_SUCCEEDED, common_pb2.OPERATION_STATE_FAILED, common_pb2.OPERATION_STATE_CANCELLED}


def _volume(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((36, 30, 24), -1000, dtype=np.int16)
    vol[6:30, 5:25, 3:21] = 50
    vol[12 + shift : 20 + shift, 10:18, 8:14] = 200
    return vol, np.diag([-3.0, -3.0, 3.0, 1.0])


def _version(state: Path, bump: float) -> str:
    """A fine-tuned version of tiny-a-v1 (each member's weights moved by ``bump``)."""
    parent = load_ensemble(TINY)
    weights = {}
    for m in parent.members:
        net = build_member(m)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(bump)
        path = state / f"{m.name}-{bump}.pt"
        torch.save(net.state_dict(), path)
        weights[m.name] = path
    version = write_version(
        state,
        parent,
        weights,
        manifest_digest="sha256:" + f"{int(bump * 1000):064d}",
        hyperparameters={"bump": bump},
        train_cases=1,
        holdout_cases=0,
        metrics={},
    )
    return version.name


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("reinfer")
    state = root / "state"
    (state / "versions").mkdir(parents=True)
    good = _version(state, 0.01)
    corrupt = _version(state, 0.02)
    (state / "versions" / corrupt / "unet_a.pt").write_bytes(b"not the weights")
    blobs = LocalBlobStore(root / "blobs")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    triton = LocalTriton(["--ensemble", str(TINY), "--versions-dir", str(state / "versions")], env=env).start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    links: dict[str, int] = {}

    async def start():
        ranking = await build_ranking(
            RankingSettings(grpc_port=0, data_dir=str(root / "ranking"), **auth.auth_settings("ranking"))
        )
        await ranking.start()
        labels = await build_labels(
            LabelsSettings(
                grpc_port=0,
                data_dir=str(root / "labels"),
                blob_dir=str(blobs.root),
                ranking_target=f"127.0.0.1:{ranking.port}",
                **auth.auth_settings("labels"),
            )
        )
        await labels.start()
        links.update(labels=labels.port, ranking=ranking.port)
        seg = await start_segmentation(root / "seg")
        links["segmentation"] = seg.port
        return ranking, labels, seg

    async def start_training():
        app = await build_training(
            TrainingSettings(
                grpc_port=0,
                data_dir=str(root / "training"),
                blob_dir=str(blobs.root),
                state_dir=str(state),
                labels_target=f"127.0.0.1:{links['labels']}",
                segmentation_target=f"127.0.0.1:{links['segmentation']}",
                ranking_target=f"127.0.0.1:{links['ranking']}",
                rollout="segmentation",
                n_boot=50,
                **auth.auth_settings("training"),
            )
        )
        await app.start()
        return app

    async def start_segmentation(data_dir: Path):
        seg = await build_segmentation(
            SegmentationSettings(
                grpc_port=0,
                data_dir=str(data_dir),
                blob_dir=str(blobs.root),
                triton_url=triton.url,
                ensemble=str(TINY),
                labels_target=f"127.0.0.1:{links['labels']}",
                ranking_target=f"127.0.0.1:{links['ranking']}",
                versions_dir=str(state / "versions"),
                worker_poll_s=0.2,
                prior_refresh_s=0,
                **auth.auth_settings("segmentation"),
            )
        )
        await seg.start()
        return seg

    apps = asyncio.run_coroutine_threadsafe(start(), loop).result(180)
    ranking, labels, seg = apps
    seg_channel = raw_channel(f"127.0.0.1:{seg.port}", PLAINTEXT)
    labels_channel = raw_channel(f"127.0.0.1:{labels.port}", PLAINTEXT)
    token = auth.token_file("service", service_subject("training"))
    peers = ServicePeers(
        f"127.0.0.1:{seg.port}",
        f"127.0.0.1:{ranking.port}",
        TokenSource(path=token),
        PLAINTEXT,
    )
    try:
        yield SimpleNamespace(
            seg=segmentation_pb2_grpc.SegmentationServiceStub(seg_channel),
            labels=labels_pb2_grpc.LabelServiceStub(labels_channel),
            seg_app=seg,
            labels_port=labels.port,
            blobs=blobs,
            peers=peers,
            good=good,
            corrupt=corrupt,
            triton=triton,
            state=state,
            start_training=lambda: asyncio.run_coroutine_threadsafe(start_training(), loop).result(120),
            restart=lambda name: asyncio.run_coroutine_threadsafe(start_segmentation(root / name), loop).result(120),
            stop=lambda app: asyncio.run_coroutine_threadsafe(app.stop(0), loop).result(120),
        )
    finally:
        peers.close()
        seg_channel.close()
        labels_channel.close()
        for app in (seg, labels, ranking):
            asyncio.run_coroutine_threadsafe(app.stop(0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        triton.stop()
        shutil.rmtree(root, ignore_errors=True)


def _segment(stack, case_id: str, shift: int) -> pb.SegmentationJob:
    vol, aff = _volume(shift)
    blob = stack.blobs.put(to_nifti_bytes(vol, aff))
    req = pb.SegmentSeriesRequest(
        case_id=case_id,
        series_id=f"series-{case_id}",
        series_version=1,
        volume=common_pb2.BlobRef(digest=blob.digest, size_bytes=blob.size_bytes),
    )
    return stack.seg.SegmentSeries(req, metadata=ADMIN).job


def _wait_job(stack, job_id: str, timeout_s: float = 120) -> pb.SegmentationJob:
    deadline = time.monotonic() + timeout_s
    while True:
        job = stack.seg.GetSegmentationJob(pb.GetSegmentationJobRequest(job_id=job_id), metadata=ADMIN).job
        if job.state in DONE:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def _head(stack, case_id: str, job_id: str = "", timeout_s: float = 60) -> labels_pb2.LabelVersion:
    """The case's newest label version (once the one of ``job_id`` has arrived)."""
    deadline = time.monotonic() + timeout_s
    while True:
        versions = stack.labels.ListLabelVersions(
            labels_pb2.ListLabelVersionsRequest(case_id=case_id), metadata=ADMIN
        ).versions
        if versions and (not job_id or any(v.provenance.job_id == job_id for v in versions)):
            return versions[0]
        assert time.monotonic() < deadline, f"no label version of {case_id} / {job_id}"
        time.sleep(0.2)


def _error(exc: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    info = error_info_of(exc.value)
    return exc.value.code(), info.reason if info is not None else ""


@pytest.fixture(scope="module")
def before(stack) -> dict[str, str]:
    """Two cases segmented by tiny-a-v1; case-h gets a human (original) liver afterwards."""
    jobs = {case: _segment(stack, case, shift) for case, shift in (("case-h", 0), ("case-u", 2))}
    for case, job in jobs.items():
        assert _wait_job(stack, job.job_id).state == common_pb2.OPERATION_STATE_SUCCEEDED
        _head(stack, case, job.job_id)
    head = _head(stack, "case-h")
    labels, aff = from_nifti_bytes(stack.blobs.get(head.label_map.digest))
    liver = np.zeros(labels.shape, np.uint8)
    liver[10:22, 8:20, 6:16] = LIVER
    lm = stack.blobs.put(to_nifti_bytes(liver, aff))
    human = stack.labels.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id="case-h",
            label_map=common_pb2.BlobRef(digest=lm.digest, size_bytes=lm.size_bytes),
            ct=head.ct,
            provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_ORIGINAL),
            request_id=uuid.uuid4().hex,
            labelled_organs=[LIVER],
        ),
        metadata=ADMIN,
    ).version
    # the human version's liver as labels assembled it (the head's other organs may win voxels)
    return {"human_version": human.version_id, "liver_digest": human.label_map.digest}


def test_activation_serves_the_new_version_without_restart(stack, before) -> None:
    old_default = stack.seg_app.parts["registry"].state.default
    described = stack.peers.activate(stack.good)
    assert stack.good in described and old_default in described
    assert stack.seg_app.parts["registry"].state.versions[:2] == (stack.good, old_default)
    # the same segmentation process: a new series runs on the new version, recorded everywhere
    job = _segment(stack, "case-new", 1)
    assert job.ensemble_version == stack.good
    assert _wait_job(stack, job.job_id).state == common_pb2.OPERATION_STATE_SUCCEEDED
    assert _head(stack, "case-new", job.job_id).provenance.model_version == stack.good
    # idempotent
    again = stack.seg.ActivateEnsembleVersion(
        pb.ActivateEnsembleVersionRequest(ensemble_version=stack.good), metadata=TRAINING
    )
    assert again.already_active and again.ensemble_version == stack.good


def test_reinference_in_worklist_order_keeps_the_human_organ(stack, before) -> None:
    stack.peers.activate(stack.good)
    token = TokenSource(path=auth.token_file("service", service_subject("training")))
    source = LabelsDecisionSource(f"127.0.0.1:{stack.labels_port}", token, PLAINTEXT)
    decisions = collect_decisions(source)
    source.close()
    assert {d.case_id for d in decisions} >= {"case-h", "case-u"}
    assert LIVER in next(d for d in decisions if d.case_id == "case-h").human
    worklist = stack.peers.worklist_order()
    assert {"case-h", "case-u"} <= set(worklist)  # ranking got the first jobs' attention
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("training.round") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
        progress = reinfer_undecided(stack.peers, stack.good, decisions, poll_s=0.2)
    assert progress.cases_queued == progress.cases_done >= 2 and not progress.cancelled
    jobs = {j.case_id: j for j in (stack.seg_app.parts["jobs"].get(i) for i in progress.job_ids)}
    assert {"case-h", "case-u"} <= set(jobs)
    assert all(j.ensemble_version == stack.good for j in jobs.values())
    # highest priority first: the jobs were created (and run) in the worklist's order
    assert [stack.seg_app.parts["jobs"].get(i).case_id for i in progress.job_ids] == undecided_in_order(
        decisions, worklist
    )
    # the jobs carry the caller's trace: their spans and hand-offs join the round's trace
    # (case-new's job for this version exists already, created by SegmentSeries: the same key)
    assert [jobs[c].traceparent.split("-")[1] for c in ("case-h", "case-u")] == [trace_id] * 2
    head = _head(stack, "case-h", jobs["case-h"].job_id)
    prov = {op.organ: op for op in head.organ_provenance}
    assert prov[LIVER].provenance.source == labels_pb2.LABEL_SOURCE_ORIGINAL
    assert prov[LIVER].version_id == before["human_version"]
    labels, _ = from_nifti_bytes(stack.blobs.get(head.label_map.digest))
    human, _ = from_nifti_bytes(stack.blobs.get(before["liver_digest"]))
    assert np.array_equal(labels == LIVER, human == LIVER)
    assert head.provenance.model_version == stack.good
    # asking again is idempotent: the same jobs
    again, _ = stack.peers.reinfer(stack.good, ["case-h"])
    assert again[0][0] == jobs["case-h"].job_id


def test_unknown_and_corrupt_versions_are_refused(stack) -> None:
    cases = [
        ("abdomen-nope-ft-000000000000", grpc.StatusCode.NOT_FOUND, "UNKNOWN_VERSION"),
        ("../versions", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION_NAME"),
        (stack.corrupt, grpc.StatusCode.FAILED_PRECONDITION, "VERSION_DIGEST_MISMATCH"),
    ]
    for name, code, reason in cases:
        with pytest.raises(grpc.RpcError) as exc:
            stack.seg.ActivateEnsembleVersion(
                pb.ActivateEnsembleVersionRequest(ensemble_version=name), metadata=TRAINING
            )
        assert _error(exc) == (code, reason), name
    with pytest.raises(grpc.RpcError) as exc:
        stack.seg.ReinferCases(
            pb.ReinferCasesRequest(ensemble_version="tiny-b-v1", case_ids=["case-u"]), metadata=TRAINING
        )
    assert _error(exc) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_ENSEMBLE")


@pytest.mark.parametrize("rpc", ["ActivateEnsembleVersion", "ReinferCases"])
def test_wrong_or_missing_token_is_refused(stack, rpc: str) -> None:
    request = (
        pb.ActivateEnsembleVersionRequest(ensemble_version="x")
        if rpc == "ActivateEnsembleVersion"
        else pb.ReinferCasesRequest(ensemble_version="x", case_ids=["c"])
    )
    call = getattr(stack.seg, rpc)
    with pytest.raises(grpc.RpcError) as exc:
        call(request)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for metadata, reason in (
        (auth.service_metadata("ingest"), "CALLER_NOT_ALLOWED"),
        (ADMIN, "ROLE_NOT_ALLOWED"),
        (auth.metadata("reviewer", "dr-r"), "ROLE_NOT_ALLOWED"),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call(request, metadata=metadata)
        assert _error(exc) == (grpc.StatusCode.PERMISSION_DENIED, reason)


def test_a_restarted_segmentation_serves_the_promoted_version(stack) -> None:
    (stack.state / "versions" / "CURRENT").write_text(stack.good + "\n")
    app = stack.restart("seg-restarted")
    try:
        assert app.parts["current_version"].done.wait(60)
        assert app.parts["registry"].state.default == stack.good
    finally:
        stack.stop(app)


def test_a_round_through_the_training_service_rolls_out_and_reinfers(stack, before) -> None:
    """The whole loop through the API, tiny budget: StartTrainingRun (2 steps, one member of the
    promoted tiny version, margin 1 so the gate promotes) -> activation in segmentation ->
    re-inference of the undecided cases -> the run's result says so."""
    (stack.state / "versions" / "CURRENT").write_text(stack.good + "\n")
    # a second human decision, held out for the gate
    head = _head(stack, "case-u")
    labels, aff = from_nifti_bytes(stack.blobs.get(head.label_map.digest))
    mask = np.zeros(labels.shape, np.uint8)
    mask[8:20, 8:18, 6:14] = LIVER
    lm = stack.blobs.put(to_nifti_bytes(mask, aff))
    stack.labels.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id="case-u",
            label_map=common_pb2.BlobRef(digest=lm.digest, size_bytes=lm.size_bytes),
            ct=head.ct,
            provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_ORIGINAL),
            request_id=uuid.uuid4().hex,
            labelled_organs=[LIVER],
        ),
        metadata=ADMIN,
    )
    training = stack.start_training()
    channel = raw_channel(f"127.0.0.1:{training.port}", PLAINTEXT)
    try:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        hp = training_pb2.Hyperparameters(steps=2, checkpoint_every=1, crop_size=[32, 32, 32], members=["unet_a"])
        run = stub.StartTrainingRun(
            training_pb2.StartTrainingRunRequest(hyperparameters=hp, holdout_case_ids=["case-u"], margin=1.0),
            metadata=ADMIN,
        ).run
        deadline = time.monotonic() + 600
        while run.state not in DONE:
            assert time.monotonic() < deadline, run
            time.sleep(0.5)
            run = stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=run.run_id), metadata=ADMIN).run
    finally:
        channel.close()
        stack.stop(training)
    assert run.state == common_pb2.OPERATION_STATE_SUCCEEDED, run.error_reason
    assert run.promoted and run.parent_version == stack.good, run.gate.reason
    assert run.rollout.startswith(f"segmentation: activated {run.version}"), run.rollout
    assert stack.seg_app.parts["registry"].state.default == run.version
    r = run.reinfer
    assert r.cases_queued >= 2 and r.cases_done == r.cases_queued and not r.cancelled, r
    assert "rollout" in run.stage_seconds
    jobs = stack.seg_app.parts["jobs"].list(1000, "")[0]
    assert {j.case_id for j in jobs if j.ensemble_version == run.version} >= {"case-h", "case-u"}
