"""TrainingService gRPC servicer: converts messages, calls the run store (in a thread)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, cast

from google.protobuf import timestamp_pb2

from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.common.organs import ORGANS
from atlasflow.common.server import Context, principal_of
from atlasflow.common.v1 import common_pb2
from atlasflow.training.finetune import Hyperparameters
from atlasflow.training.runs import DOMAIN, RunRecord, RunStore
from atlasflow.training.v1 import training_pb2, training_pb2_grpc

_STATE = {
    "QUEUED": common_pb2.OPERATION_STATE_QUEUED,
    "RUNNING": common_pb2.OPERATION_STATE_RUNNING,
    "SUCCEEDED": common_pb2.OPERATION_STATE_SUCCEEDED,
    "FAILED": common_pb2.OPERATION_STATE_FAILED,
    "CANCELLED": common_pb2.OPERATION_STATE_CANCELLED,
}
_STAGE = {
    "manifest": training_pb2.TRAINING_STAGE_MANIFEST,
    "finetune": training_pb2.TRAINING_STAGE_FINETUNE,
    "version": training_pb2.TRAINING_STAGE_VERSION,
    "evaluate": training_pb2.TRAINING_STAGE_EVALUATE,
    "gate": training_pb2.TRAINING_STAGE_GATE,
    "done": training_pb2.TRAINING_STAGE_DONE,
    "rollout": training_pb2.TRAINING_STAGE_ROLLOUT,
}
_ORGAN_ID = {name: oid for oid, name in ORGANS.items()}
MAX_STEPS = 100_000


def _ts(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def _finite(v: Any) -> float:
    f = float(v or 0.0)
    return f if math.isfinite(f) else 0.0


def hyperparameters_of(msg: training_pb2.Hyperparameters) -> Hyperparameters:
    """The request's hyperparameters with defaults for unset fields (INVALID_HYPERPARAMETERS
    when out of range)."""
    d = Hyperparameters()
    if msg.steps > MAX_STEPS or msg.steps < 0 or msg.batch_size < 0 or msg.checkpoint_every < 0 or msg.lr < 0:
        raise InvalidArgument(
            "INVALID_HYPERPARAMETERS",
            f"steps must be in 1..{MAX_STEPS}; batch_size, checkpoint_every, lr must be positive",
            domain=DOMAIN,
            metadata={"name": "steps"},
        )
    if not 0.0 <= msg.pseudo_weight <= 1.0:
        raise InvalidArgument(
            "INVALID_HYPERPARAMETERS",
            "pseudo_weight must be in [0, 1]",
            domain=DOMAIN,
            metadata={"name": "pseudo_weight"},
        )
    return Hyperparameters.from_dict(
        {
            **d.to_dict(),
            "steps": msg.steps or d.steps,
            "batch_size": msg.batch_size or d.batch_size,
            "lr": msg.lr or d.lr,
            "crop_size": list(msg.crop_size),
            "checkpoint_every": msg.checkpoint_every or d.checkpoint_every,
            "autocast": msg.autocast or d.autocast,
            "members": list(msg.members),
            "pseudo_weight": msg.pseudo_weight,
        }
    )


def _hp_proto(d: Mapping[str, Any]) -> training_pb2.Hyperparameters:
    return training_pb2.Hyperparameters(
        steps=int(d.get("steps", 0)),
        batch_size=int(d.get("batch_size", 0)),
        lr=float(d.get("lr", 0.0)),
        crop_size=[int(v) for v in d.get("crop_size", [])],
        checkpoint_every=int(d.get("checkpoint_every", 0)),
        autocast=str(d.get("autocast", "")),
        members=[str(m) for m in d.get("members", [])],
        pseudo_weight=float(d.get("pseudo_weight", 0.0)),
    )


def _gate_proto(g: Mapping[str, Any]) -> training_pb2.GateResult:
    return training_pb2.GateResult(
        accepted=bool(g.get("accepted")),
        reason=str(g.get("reason", "")),
        margin=float(g.get("margin", 0.0)),
        organs=[
            training_pb2.OrganDice(
                organ=cast("common_pb2.Organ", _ORGAN_ID.get(str(o["organ"]), 0)),
                current=_finite(o["current_mean"]),
                candidate=_finite(o["candidate_mean"]),
                ci_low=_finite(o["ci_low"]),
                ci_high=_finite(o["ci_high"]),
                cases=int(o["cases"]),
                passed=bool(o["passed"]),
            )
            for o in g.get("organs", [])
        ],
    )


def _job_proto(job: Any) -> training_pb2.TrainingJob | None:
    """``progress.job`` of a run (RUNNER=kubernetes, `k8s_runner`), None when absent."""
    if not job:
        return None
    return training_pb2.TrainingJob(
        name=str(job.get("name", "")),
        state=str(job.get("state", "")),
        failed_pods=int(job.get("failed_pods", 0)),
        pods=[
            training_pb2.TrainingJobPod(name=str(p["name"]), phase=str(p["phase"]), reason=str(p["reason"]))
            for p in job.get("pods", [])
        ],
    )


def run_to_proto(r: RunRecord) -> training_pb2.TrainingRun:
    req, prog, res = r.request, r.progress, r.result
    run = training_pb2.TrainingRun(
        run_id=r.run_id,
        state=_STATE[r.state],
        progress=training_pb2.TrainingProgress(
            stage=_STAGE.get(str(prog.get("stage", "")), training_pb2.TRAINING_STAGE_UNSPECIFIED),
            fraction=_finite(prog.get("fraction", 0.0)),
            members=[
                training_pb2.MemberProgress(
                    member=str(m["member"]), step=int(m["step"]), steps=int(m["steps"]), loss=_finite(m["loss"])
                )
                for m in prog.get("members", [])
            ],
            job=_job_proto(prog.get("job")),
        ),
        hyperparameters=_hp_proto(req.get("hyperparameters", {})),
        seed=int(req.get("seed", 0)),
        parent_version=str(res.get("parent_version", "")),
        manifest_digest=str(res.get("manifest_digest", "")),
        train_cases=int(res.get("train_cases", 0)),
        holdout_cases=int(res.get("holdout_cases", 0)),
        version=str(res.get("version", "")),
        version_digest=str(res.get("version_digest", "")),
        promoted=bool(res.get("promoted", False)),
        losses=[
            training_pb2.LossSummary(
                member=str(x["member"]),
                first_loss=_finite(x["first_loss"]),
                final_loss=_finite(x["final_loss"]),
                min_loss=_finite(x["min_loss"]),
                steps=int(x["steps"]),
                seconds=_finite(x["seconds"]),
            )
            for x in res.get("losses", [])
        ],
        stage_seconds={str(k): _finite(v) for k, v in res.get("stage_seconds", {}).items()},
        error_reason=r.error_reason,
        requested_by=r.requested_by,
        create_time=_ts(r.create_time),
        update_time=_ts(r.update_time),
        rollout=str(res.get("rollout", "")),
    )
    if res.get("gate"):
        run.gate.CopyFrom(_gate_proto(res["gate"]))
    if res.get("reinfer"):
        ri = res["reinfer"]
        run.reinfer.CopyFrom(
            training_pb2.ReinferProgress(
                cases_queued=int(ri.get("cases_queued", 0)),
                cases_done=int(ri.get("cases_done", 0)),
                cases_failed=int(ri.get("cases_failed", 0)),
                cases_cancelled=int(ri.get("cases_cancelled", 0)),
                unknown_cases=int(ri.get("unknown_cases", 0)),
                cancelled=bool(ri.get("cancelled", False)),
            )
        )
    return run


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Thin transport over `RunStore`; ``wake``: tells the executor a run was queued."""

    def __init__(self, store: RunStore, wake: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.wake = wake

    async def StartTrainingRun(
        self, request: training_pb2.StartTrainingRunRequest, context: Context
    ) -> training_pb2.StartTrainingRunResponse:
        hp = hyperparameters_of(request.hyperparameters)
        for name, value in (("holdout_fraction", request.holdout_fraction), ("margin", request.margin)):
            if not 0.0 <= value <= 1.0:
                raise InvalidArgument(
                    "INVALID_ARGUMENT", f"{name} must be in [0, 1]", domain=DOMAIN, metadata={"field": name}
                )
        doc = {
            "hyperparameters": hp.to_dict(),
            "seed": int(request.seed),
            "holdout_fraction": request.holdout_fraction or 0.25,
            "holdout_case_ids": sorted(request.holdout_case_ids),
            "margin": request.margin or 0.01,
        }
        principal = principal_of(context) or "unknown"

        def start() -> RunRecord:
            if request.request_id:
                # idempotent: the run of this request id, whatever its state
                existing = self.store.find_request(request.request_id)
                if existing is not None:
                    return existing
            active = self.store.active()
            if active is not None:
                raise FailedPrecondition(
                    "RUN_IN_PROGRESS",
                    "another training run is queued or running",
                    domain=DOMAIN,
                    metadata={"run_id": active.run_id},
                )
            return self.store.create(doc, principal, request.request_id or None)

        record = await asyncio.to_thread(start)
        self.wake()
        return training_pb2.StartTrainingRunResponse(run=run_to_proto(record))

    async def GetTrainingRun(
        self, request: training_pb2.GetTrainingRunRequest, context: Context
    ) -> training_pb2.GetTrainingRunResponse:
        record = await asyncio.to_thread(self.store.get, request.run_id)
        return training_pb2.GetTrainingRunResponse(run=run_to_proto(record))

    async def ListTrainingRuns(
        self, request: training_pb2.ListTrainingRunsRequest, context: Context
    ) -> training_pb2.ListTrainingRunsResponse:
        runs, token = await asyncio.to_thread(self.store.list, request.page_size, request.page_token)
        return training_pb2.ListTrainingRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)

    async def CancelTrainingRun(
        self, request: training_pb2.CancelTrainingRunRequest, context: Context
    ) -> training_pb2.CancelTrainingRunResponse:
        record = await asyncio.to_thread(self.store.cancel, request.run_id)
        return training_pb2.CancelTrainingRunResponse(run=run_to_proto(record))
