"""The TrainingService on a real label service: both in-process gRPC servers with
authentication on; the training service reads the decisions through labels' API as
``svc:training``. A round runs end to end through the API (progress, metrics, gate, version),
a second one is cancelled mid-training, and wrong tokens and roles are refused."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest

from atlasflow.common.clients import raw_channel
from atlasflow.common.server import error_info_of
from atlasflow.common.tls import PLAINTEXT
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.app import build_app as build_labels
from atlasflow.labels.settings import LabelsSettings
from atlasflow.testing import auth
from atlasflow.training.app import build_app as build_training
from atlasflow.training.settings import TrainingSettings
from atlasflow.training.v1 import training_pb2, training_pb2_grpc

ADMIN = auth.metadata("admin", "dr-admin")
REVIEWER = auth.metadata("reviewer", "dr-b")
HP = training_pb2.Hyperparameters(steps=2, checkpoint_every=1, crop_size=[32, 32, 32], members=["unet"], lr=1e-3)


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("svc")
    loop = asyncio.new_event_loop()

    async def start():
        labels = await build_labels(
            LabelsSettings(
                grpc_port=0,
                data_dir=str(root / "labels"),
                blob_dir=str(store.blobs.root),
                **auth.auth_settings("labels"),
            ),
            repository=store.repo,
        )
        await labels.start()
        training = await build_training(
            TrainingSettings(
                grpc_port=0,
                data_dir=str(root / "training"),
                blob_dir=str(store.blobs.root),
                labels_target=f"127.0.0.1:{labels.port}",
                n_boot=200,
                **auth.auth_settings("training"),
            )
        )
        await training.start()
        return labels, training

    labels, training = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    channel = raw_channel(f"127.0.0.1:{training.port}", PLAINTEXT)
    try:
        yield SimpleNamespace(stub=training_pb2_grpc.TrainingServiceStub(channel), training=training, root=root)
    finally:
        channel.close()
        for app in (training, labels):
            asyncio.run_coroutine_threadsafe(app.stop(0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _wait(stub, run_id: str, until, timeout_s: float = 900.0) -> training_pb2.TrainingRun:
    deadline = time.monotonic() + timeout_s
    while True:
        run = stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=run_id), metadata=ADMIN).run
        if until(run):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.5)


DONE = {common_pb2.OPERATION_STATE_SUCCEEDED, common_pb2.OPERATION_STATE_FAILED, common_pb2.OPERATION_STATE_CANCELLED}


@pytest.fixture(scope="module")
def finished(stack) -> training_pb2.TrainingRun:
    request = training_pb2.StartTrainingRunRequest(
        hyperparameters=HP, seed=5, holdout_case_ids=["case-d"], request_id="round-1"
    )
    run = stack.stub.StartTrainingRun(request, metadata=ADMIN).run
    assert run.state in (common_pb2.OPERATION_STATE_QUEUED, common_pb2.OPERATION_STATE_RUNNING)
    assert run.requested_by == "dr-admin"
    # idempotent by request id
    assert stack.stub.StartTrainingRun(request, metadata=ADMIN).run.run_id == run.run_id
    # one run at a time
    with pytest.raises(grpc.RpcError) as exc:
        stack.stub.StartTrainingRun(training_pb2.StartTrainingRunRequest(hyperparameters=HP), metadata=ADMIN)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info_of(exc.value).reason == "RUN_IN_PROGRESS"
    return _wait(stack.stub, run.run_id, lambda r: r.state in DONE)


def test_a_round_through_the_api(finished) -> None:
    run = finished
    assert run.state == common_pb2.OPERATION_STATE_SUCCEEDED, run.error_reason
    assert run.progress.stage == training_pb2.TRAINING_STAGE_DONE and run.progress.fraction == 1.0
    assert [(m.member, m.step, m.steps) for m in run.progress.members] == [("unet", 2, 2)]
    assert run.manifest_digest.startswith("sha256:") and (run.train_cases, run.holdout_cases) == (2, 1)
    assert run.parent_version == "abdomen-trio-v1" and run.version.startswith("abdomen-trio-ft-")
    assert run.version_digest.startswith("sha256:")
    assert [(x.member, x.steps) for x in run.losses] == [("unet", 2)] and run.losses[0].final_loss > 0
    assert set(run.stage_seconds) >= {"manifest", "finetune", "version", "evaluate"}
    # the gate ran on the held-out human organ (case-d's kidney_left)
    assert [o.organ for o in run.gate.organs] == [common_pb2.ORGAN_KIDNEY_LEFT]
    assert run.gate.organs[0].cases == 1 and run.gate.reason
    assert run.promoted == run.gate.accepted
    assert run.rollout == ("pointer" if run.promoted else "")
    assert run.hyperparameters.steps == 2 and run.hyperparameters.batch_size == 1  # defaults filled in


def test_list_and_reviewer_reads(stack, finished) -> None:
    runs = stack.stub.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(), metadata=REVIEWER).runs
    assert finished.run_id in [r.run_id for r in runs]
    got = stack.stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=finished.run_id), metadata=REVIEWER)
    assert got.run.version == finished.version


def test_cancel_a_running_round(stack, finished) -> None:
    hp = training_pb2.Hyperparameters()
    hp.CopyFrom(HP)
    hp.steps = 400
    run = stack.stub.StartTrainingRun(
        training_pb2.StartTrainingRunRequest(hyperparameters=hp, seed=5, holdout_case_ids=["case-d"]), metadata=ADMIN
    ).run
    _wait(stack.stub, run.run_id, lambda r: any(m.step >= 1 for m in r.progress.members) or r.state in DONE)
    stack.stub.CancelTrainingRun(training_pb2.CancelTrainingRunRequest(run_id=run.run_id), metadata=ADMIN)
    done = _wait(stack.stub, run.run_id, lambda r: r.state in DONE, timeout_s=300)
    assert (done.state, done.error_reason) == (common_pb2.OPERATION_STATE_CANCELLED, "TRAINING_CANCELLED")
    assert 1 <= done.progress.members[0].step < 400
    # a checkpoint was kept for a rerun to resume
    assert list((stack.root / "training" / "state" / "training" / "runs").glob("*/unet/checkpoint.pt"))


@pytest.mark.parametrize(
    ("rpc", "request_", "metadata", "code"),
    [
        ("StartTrainingRun", training_pb2.StartTrainingRunRequest(), (), grpc.StatusCode.UNAUTHENTICATED),
        ("StartTrainingRun", training_pb2.StartTrainingRunRequest(), REVIEWER, grpc.StatusCode.PERMISSION_DENIED),
        (
            "StartTrainingRun",
            training_pb2.StartTrainingRunRequest(),
            auth.metadata("annotator"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            "CancelTrainingRun",
            training_pb2.CancelTrainingRunRequest(run_id="tr-x"),
            REVIEWER,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            "ListTrainingRuns",
            training_pb2.ListTrainingRunsRequest(),
            (("authorization", "Bearer not.a.token"),),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "GetTrainingRun",
            training_pb2.GetTrainingRunRequest(run_id="tr-x"),
            auth.metadata("connector"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        # a service token (even training's own) is no caller of the training API
        (
            "ListTrainingRuns",
            training_pb2.ListTrainingRunsRequest(),
            auth.service_metadata("training"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ],
)
def test_refusals(stack, rpc, request_, metadata, code) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        getattr(stack.stub, rpc)(request_, metadata=metadata)
    assert exc.value.code() == code
    assert error_info_of(exc.value).domain == "atlasflow.auth"


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (
            training_pb2.StartTrainingRunRequest(hyperparameters=training_pb2.Hyperparameters(steps=10**6)),
            "INVALID_HYPERPARAMETERS",
        ),
        (
            training_pb2.StartTrainingRunRequest(hyperparameters=training_pb2.Hyperparameters(autocast="fp8")),
            "INVALID_HYPERPARAMETERS",
        ),
        (training_pb2.StartTrainingRunRequest(holdout_fraction=1.5), "INVALID_ARGUMENT"),
    ],
)
def test_bad_input_is_refused_clearly(stack, request_, reason) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stack.stub.StartTrainingRun(request_, metadata=ADMIN)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info_of(exc.value).reason == reason


def test_unknown_run_is_not_found(stack) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stack.stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id="tr-nope"), metadata=ADMIN)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info_of(exc.value).reason == "RUN_NOT_FOUND"
