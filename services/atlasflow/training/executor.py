"""The training service's background loop: runs queued training runs one at a time (no grpc).

`RunExecutor.run` (a `ThreadLoop` target) claims the oldest QUEUED run of the `RunStore`, runs
`atlasflow.training.worker.run_round` on it with progress written to the store (stage, per
member step/steps/loss, throttled to one write per ``progress_every_s``) and a stop check that
reads the run's ``cancel_requested`` (the round stops at its next training step, after a
checkpoint, and the run becomes CANCELLED), then stores the result (manifest digest, case
counts, version, gate, loss summaries from each member's ``log.jsonl``, per-stage seconds) and,
when the gate promoted the version, runs the roll-out hook (`Rollout`). At start, RUNNING runs
a dead process left are queued again; their members resume from their checkpoints (the
manifest is the same when the decisions did not change).

Automatic mode (``auto_min_new_decisions`` > 0): while no run is queued, every
``auto_interval_s`` the executor counts human organ decisions (`decision_count`) and queues a
run (requested_by "automatic") when the count grew by at least that many since the last run.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError
from atlasflow.training.dataset import CaseDecisions, DecisionSource
from atlasflow.training.finetune import Hyperparameters, TrainingCancelled
from atlasflow.training.reinfer import FollowUp, Peers
from atlasflow.training.runs import CANCELLED, FAILED, SUCCEEDED, RunRecord, RunStore
from atlasflow.training.versions import EnsembleVersion
from atlasflow.training.worker import RoundResult, decision_count, run_round

log = logging.getLogger(__name__)


class Rollout(Protocol):
    """What happens to a promoted version besides ``versions/CURRENT`` (e.g. a Triton load);
    returns a short description stored as the run's ``rollout``."""

    def __call__(self, version: EnsembleVersion) -> str: ...


def pointer_rollout(version: EnsembleVersion) -> str:
    """The default: `run_round` already wrote ``versions/CURRENT``."""
    return "pointer"


def loss_summary(run_dir: Path, member: str, seconds: float) -> dict[str, Any]:
    """first / final / min loss and steps of ``<run_dir>/<member>/log.jsonl``."""
    losses = []
    path = run_dir / member / "log.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                losses.append(float(json.loads(line)["loss"]))
            except (ValueError, KeyError):
                continue
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "member": member,
        "first_loss": losses[0] if losses else 0.0,
        "final_loss": losses[-1] if losses else 0.0,
        "min_loss": min(finite) if finite else 0.0,
        "steps": len(losses),
        "seconds": round(seconds, 3),
    }


def request_to_round_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "seed": int(request.get("seed", 0)),
        "holdout_fraction": float(request.get("holdout_fraction", 0.25)),
        "margin": float(request.get("margin", 0.01)),
    }
    if request.get("holdout_case_ids"):
        kwargs["holdout_cases"] = set(request["holdout_case_ids"])
    return kwargs


@dataclass
class _Progress:
    stage: str = ""
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    last: float = 0.0


@dataclass
class ExecutorConfig:
    state_dir: Path
    device: str = "cpu"
    n_boot: int = 2000
    progress_every_s: float = 1.0
    poll_s: float = 1.0
    auto_min_new_decisions: int = 0
    auto_interval_s: float = 300.0


class RunExecutor:
    """See the module docstring. ``source_factory``: a fresh `DecisionSource` per round."""

    def __init__(
        self,
        store: RunStore,
        source_factory: Callable[[], DecisionSource],
        blobs: BlobStore,
        config: ExecutorConfig,
        *,
        rollout: Rollout = pointer_rollout,
        remote_finetune: Any = None,
        peers_factory: Callable[[], Peers] | None = None,
    ) -> None:
        self.store, self.source_factory, self.blobs, self.config = store, source_factory, blobs, config
        self.rollout = rollout
        # the re-inference of the undecided cases after a promotion (`reinfer.FollowUp`); None:
        # the roll-out only
        self.peers_factory = peers_factory
        # RUNNER=kubernetes: a `k8s_runner.KubernetesFinetune` (the fine-tune stage as a Job)
        self.remote_finetune = remote_finetune
        self._stop = threading.Event()
        self.wake = threading.Event()
        self._last_auto = 0.0
        self._auto_seen: int | None = None

    def request_stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def run(self) -> None:
        self._stop.clear()
        self.store.requeue_running()
        while not self._stop.is_set():
            record = self.store.claim()
            if record is not None:
                self.execute(record)
                continue
            self._maybe_auto()
            self.wake.wait(self.config.poll_s)
            self.wake.clear()

    # ------------------------------------------------------------------ automatic mode
    def _maybe_auto(self) -> None:
        n = self.config.auto_min_new_decisions
        if n <= 0 or time.monotonic() - self._last_auto < self.config.auto_interval_s:
            return
        self._last_auto = time.monotonic()
        try:
            count = decision_count(self.source_factory())
        except AtlasflowError:
            log.warning("automatic training: decisions could not be read")
            return
        if self._auto_seen is None:
            last = self.store.list(1)[0]
            self._auto_seen = int(last[0].result.get("decisions", 0)) if last else 0
        if count - self._auto_seen >= n:
            self.store.create({"hyperparameters": {}, "seed": 0}, "automatic")
            self._auto_seen = count

    # ------------------------------------------------------------------ one run
    def execute(self, record: RunRecord) -> None:
        run_id = record.run_id
        request = record.request
        progress = _Progress()
        stop_checked = {"t": 0.0, "stop": False}

        def flush(force: bool = False) -> None:
            now = time.monotonic()
            if not force and now - progress.last < self.config.progress_every_s:
                return
            progress.last = now
            total = sum(m["steps"] for m in progress.members.values()) or 1
            done = sum(m["step"] for m in progress.members.values())
            self.store.update(
                run_id,
                progress={
                    "stage": progress.stage,
                    "members": list(progress.members.values()),
                    "fraction": done / total,
                },
            )

        def on_stage(name: str) -> None:
            progress.stage = name
            flush(force=True)

        def on_progress(member: str, step: int, steps: int, loss: float) -> None:
            progress.members[member] = {"member": member, "step": step, "steps": steps, "loss": loss}
            flush()

        def should_stop() -> bool:
            if self._stop.is_set():
                return True
            now = time.monotonic()
            if now - stop_checked["t"] >= 0.5:
                stop_checked["t"] = now
                stop_checked["stop"] = self.store.cancel_requested(run_id)
            return bool(stop_checked["stop"])

        try:
            hp = Hyperparameters.from_dict(request.get("hyperparameters", {}))
            source = self.source_factory()
            decisions = decision_count(source)
            result = run_round(
                source,
                self.blobs,
                self.config.state_dir,
                hp,
                device=self.config.device,
                n_boot=self.config.n_boot,
                on_progress=on_progress,
                should_stop=should_stop,
                on_stage=on_stage,
                finetune_stage=self._remote_stage(run_id, on_progress),
                on_promoted=self._follow_up(run_id),
                **request_to_round_kwargs(request),
            )
        except TrainingCancelled:
            flush(force=True)
            if self._stop.is_set() and not self.store.cancel_requested(run_id):
                return  # the service is stopping: the run stays RUNNING and is requeued at start
            self.store.finish(run_id, CANCELLED, "TRAINING_CANCELLED")
            return
        except AtlasflowError as exc:
            flush(force=True)
            self.store.finish(run_id, FAILED, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of a round is the run's, not the loop's
            log.error("training run failed", extra={"fields": {"run_id": run_id, "error": type(exc).__name__}})
            flush(force=True)
            self.store.finish(run_id, FAILED, "TRAINING_ERROR")
            return
        flush(force=True)
        rollout = str(result.follow_up.get("rollout", ""))
        reinfer = result.follow_up.get("reinfer")
        doc = self.result_doc(result, decisions, rollout)
        if reinfer is not None:
            doc["reinfer"] = reinfer
        if reinfer is not None and reinfer.get("cancelled"):
            # cancelled during the re-inference: the version is promoted, the jobs left stopped
            self.store.finish(run_id, CANCELLED, "TRAINING_CANCELLED", result=doc)
            return
        self.store.finish(run_id, SUCCEEDED, progress={"stage": "done", "fraction": 1.0}, result=doc)

    def _follow_up(self, run_id: str) -> Callable[[EnsembleVersion, list[CaseDecisions]], dict[str, Any]]:
        """`run_round`'s on_promoted: the roll-out, then (with peers) the re-inference, its
        counts written into the run's result while it runs (`reinfer.FollowUp`)."""

        def follow_up(version: EnsembleVersion, decisions: list[CaseDecisions]) -> dict[str, Any]:
            peers = self.peers_factory() if self.peers_factory is not None else None
            try:
                return FollowUp(
                    self.rollout,
                    peers,
                    # a cancel of the run cancels the jobs; the service stopping only stops
                    # following them (they run on in segmentation)
                    should_stop=lambda: self.store.cancel_requested(run_id),
                    on_progress=lambda p: self.store.update(run_id, result={"reinfer": p.to_dict()}),
                    stopping=self._stop.is_set,
                )(version, decisions)
            except AtlasflowError as exc:
                # the version stays promoted (versions/CURRENT); serving it failed
                return {"rollout": f"failed: {exc.reason}"}
            finally:
                close = getattr(peers, "close", None)
                if close is not None:
                    close()

        return follow_up

    def _remote_stage(self, run_id: str, on_progress: Callable[[str, int, int, float], None]) -> Any:
        if self.remote_finetune is None:
            return None
        return self.remote_finetune.bind(
            run_id,
            cancel_requested=lambda: self.store.cancel_requested(run_id),
            stopping=self._stop.is_set,
            on_progress=on_progress,
            on_job=lambda job: self.store.update(run_id, progress={"job": job}),
        )

    def result_doc(self, result: RoundResult, decisions: int, rollout: str) -> dict[str, Any]:
        card = result.version.card() if result.version else {}
        run_dir = self.config.state_dir / "training" / "runs" / result.manifest_digest.split(":", 1)[1][:16]
        return {
            "manifest_digest": result.manifest_digest,
            "parent_version": card.get("parent_version", ""),
            "train_cases": int(card.get("data", {}).get("train_cases", 0)),
            "holdout_cases": int(card.get("data", {}).get("holdout_cases", 0)),
            "version": result.version.name if result.version else "",
            "version_digest": result.version.digest if result.version else "",
            "promoted": result.promoted,
            "gate": result.gate.to_dict() if result.gate else None,
            "losses": [loss_summary(run_dir, m.member, m.seconds) for m in result.members],
            "stage_seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "rollout": rollout,
            "decisions": decisions,
        }
