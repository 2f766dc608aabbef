"""`atlasflow train`: training rounds on the TrainingService (start and cancel: role admin;
follow and list: admin or reviewer).

    atlasflow train start --steps 20 --member unet --follow     queue a round, follow its progress
    atlasflow train show RUN_ID [--follow] [--json]             one run
    atlasflow train list [--json]                               runs, newest first
    atlasflow train cancel RUN_ID                               stop it at its next step

``--follow`` draws a progress bar of the fine-tuning steps (stderr, when it is a terminal) and
returns when the run is done: exit 0 when it SUCCEEDED, 1 when it FAILED or was CANCELLED,
8 (timeout) when ``--timeout`` passed first (the run goes on).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf.json_format import MessageToDict

from atlasflow.cli.exitcodes import CliError, ExitCode, rpc_error
from atlasflow.cli.stack import Stack, emit_json, poll, progress, progress_enabled, state_dir_option, token_file_option
from atlasflow.common.v1 import common_pb2
from atlasflow.training.v1 import training_pb2, training_pb2_grpc

_DONE = {common_pb2.OPERATION_STATE_SUCCEEDED, common_pb2.OPERATION_STATE_FAILED, common_pb2.OPERATION_STATE_CANCELLED}


def _stub(stack: Stack) -> Any:
    return training_pb2_grpc.TrainingServiceStub(stack.channel("training"))


def run_dict(run: training_pb2.TrainingRun) -> dict[str, Any]:
    return MessageToDict(run, preserving_proto_field_name=True)


def _state(run: training_pb2.TrainingRun) -> str:
    return common_pb2.OperationState.Name(run.state).removeprefix("OPERATION_STATE_")


def _summary(run: training_pb2.TrainingRun) -> str:
    stage = training_pb2.TrainingStage.Name(run.progress.stage).removeprefix("TRAINING_STAGE_").lower()
    lines = [f"{run.run_id}  {_state(run)}  stage={stage}  requested_by={run.requested_by}"]
    if run.manifest_digest:
        lines.append(f"  manifest {run.manifest_digest}  train={run.train_cases} holdout={run.holdout_cases}")
    if run.progress.HasField("job"):  # RUNNER=kubernetes: the fine-tune Job
        j = run.progress.job
        pods = "".join(f"  {p.name}: {p.phase} {p.reason}".rstrip() for p in j.pods)
        lines.append(f"  job {j.name}  {j.state}  failed_pods={j.failed_pods}{pods}")
    for m in run.losses:
        lines.append(
            f"  {m.member}: loss {m.first_loss:.4f} -> {m.final_loss:.4f} (min {m.min_loss:.4f}, {m.steps} steps)"
        )
    if run.version:
        lines.append(f"  version {run.version}  promoted={run.promoted}  rollout={run.rollout or '-'}")
    if run.HasField("gate"):
        lines.append(f"  gate: {'accepted' if run.gate.accepted else 'rejected'}: {run.gate.reason}")
    if run.HasField("reinfer"):
        r = run.reinfer
        lines.append(
            f"  re-inference: {r.cases_done}/{r.cases_queued} cases done, {r.cases_failed} failed, "
            f"{r.cases_cancelled} cancelled{' (run cancelled)' if r.cancelled else ''}"
        )
    if run.error_reason:
        lines.append(f"  error: {run.error_reason}")
    return "\n".join(lines)


def _follow(stub: Any, run: training_pb2.TrainingRun, timeout_s: float, as_json: bool) -> training_pb2.TrainingRun:
    with progress("training", 1, progress_enabled(as_json)) as bar:

        def fetch() -> training_pb2.TrainingRun:
            return stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=run.run_id), timeout=30).run

        def update(r: training_pb2.TrainingRun) -> None:
            total = sum(m.steps for m in r.progress.members)
            bar.set(sum(m.step for m in r.progress.members), total or None)

        return poll(fetch, lambda r: r.state in _DONE, timeout_s=timeout_s, interval_s=1.0, on_update=update)


def _finish(run: training_pb2.TrainingRun, as_json: bool) -> int:
    if as_json:
        emit_json(run_dict(run))
    else:
        click.echo(_summary(run))
    if run.state in _DONE and run.state != common_pb2.OPERATION_STATE_SUCCEEDED:
        return int(ExitCode.FAILURE)
    return 0


@click.group(epilog="\b\nExamples:\n  atlasflow train start --follow\n  atlasflow train list --json\n")
def train() -> None:
    """Training rounds of the loop: fine-tune on the radiologists' decisions, gate, promote."""


@train.command("start")
@state_dir_option()
@token_file_option("file holding an admin's bearer token (`atlasflow token --role admin ...`)")
@click.option("--steps", type=int, default=0, help="optimiser steps per member (default 20)")
@click.option("--lr", type=float, default=0.0, help="peak learning rate (default 1e-4)")
@click.option("--crop", default="", help="crop size X,Y,Z in voxels (default: the member's patch size)")
@click.option("--member", "members", multiple=True, help="train only this member (repeatable; default all)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout-case", "holdout", multiple=True, help="hold this case out for the gate (repeatable)")
@click.option("--holdout-fraction", type=float, default=0.0, help="fraction of decided cases held out (default 0.25)")
@click.option("--margin", type=float, default=0.0, help="allowed mean Dice drop per organ (default 0.01)")
@click.option("--pseudo-weight", type=float, default=0.0, help="loss weight of AI labels of undecided organs (0..1)")
@click.option("--follow", is_flag=True, help="wait for the run and show its progress")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True, help="--follow gives up after, s")
@click.option("--json", "as_json", is_flag=True, help="print the run as JSON")
def start(
    state_dir: Path,
    token_file: Path | None,
    steps: int,
    lr: float,
    crop: str,
    members: tuple[str, ...],
    seed: int,
    holdout: tuple[str, ...],
    holdout_fraction: float,
    margin: float,
    pseudo_weight: float,
    follow: bool,
    timeout: float,
    as_json: bool,
) -> int:
    """Queue a training round (role admin)."""
    try:
        crop_size = [int(v) for v in crop.split(",") if v.strip()] if crop else []
    except ValueError:
        raise CliError(f"--crop: not X,Y,Z integers: {crop!r}", ExitCode.INVALID) from None
    stack = Stack.open(state_dir, token_file)
    stub = _stub(stack)
    request = training_pb2.StartTrainingRunRequest(
        hyperparameters=training_pb2.Hyperparameters(
            steps=steps, lr=lr, crop_size=crop_size, members=list(members), pseudo_weight=pseudo_weight
        ),
        seed=seed,
        holdout_fraction=holdout_fraction,
        holdout_case_ids=list(holdout),
        margin=margin,
        request_id=uuid.uuid4().hex,
    )
    try:
        run = stub.StartTrainingRun(request, timeout=60).run
        if follow:
            run = _follow(stub, run, timeout, as_json)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    return _finish(run, as_json)


@train.command("show")
@state_dir_option()
@token_file_option("file holding an admin's or reviewer's bearer token")
@click.argument("run_id")
@click.option("--follow", is_flag=True, help="wait until the run is done, with a progress bar")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def show(state_dir: Path, token_file: Path | None, run_id: str, follow: bool, timeout: float, as_json: bool) -> int:
    """Show one run."""
    stub = _stub(Stack.open(state_dir, token_file))
    try:
        run = stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=run_id), timeout=30).run
        if follow:
            run = _follow(stub, run, timeout, as_json)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    return _finish(run, as_json)


@train.command("list")
@state_dir_option()
@token_file_option("file holding an admin's or reviewer's bearer token")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_runs(state_dir: Path, token_file: Path | None, limit: int, as_json: bool) -> int:
    """List runs, newest first."""
    stub = _stub(Stack.open(state_dir, token_file))
    try:
        runs = stub.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(page_size=limit), timeout=30).runs
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    if as_json:
        emit_json([run_dict(r) for r in runs])
    else:
        for r in runs:
            click.echo(f"{r.run_id}  {_state(r):9}  {r.version or '-':32}  promoted={r.promoted}  {r.requested_by}")
    return 0


@train.command("cancel")
@state_dir_option()
@token_file_option("file holding an admin's bearer token")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(state_dir: Path, token_file: Path | None, run_id: str, as_json: bool) -> int:
    """Cancel a run (a running one stops at its next training step, checkpoint kept)."""
    stub = _stub(Stack.open(state_dir, token_file))
    try:
        run = stub.CancelTrainingRun(training_pb2.CancelTrainingRunRequest(run_id=run_id), timeout=30).run
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    if as_json:
        emit_json(run_dict(run))
    else:
        click.echo(_summary(run))
    return 0
