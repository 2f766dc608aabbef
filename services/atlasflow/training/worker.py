"""One training round, end to end, as a library call and a polling worker (no grpc).

`run_round`: decisions -> manifest (written first) -> fine-tune each member from the current
version's weights -> a new content-addressed version (a candidate, with its model card) ->
held-out evaluation of the current and the candidate ensemble with the segmentation pipeline
-> the validation gate -> promotion (``versions/CURRENT``) when the gate passes. The round is
one trace: a ``training.round`` span with ``training.manifest``, ``training.finetune`` (one per
member), ``training.version``, ``training.evaluate`` and ``training.gate`` children. Its record
is ``<state>/training/rounds/<manifest hex>.json`` (manifest, member results, version, gate,
per-stage seconds); a round for a manifest that already has a record is not run again.

`TrainingWorker`: starts a round when at least ``min_new_decisions`` human organ decisions
exist that the last round's manifest did not hold (automatic mode); ``stop()`` cancels a
running round at its next step (the member's checkpoint is kept, a rerun resumes).

The training service (`atlasflow.training.app`) runs rounds as operations (`executor.py`,
`runs.py`, `servicer.py`); after a promotion its ``on_promoted`` follow-up (`reinfer.py`) rolls
the version out (`rollout.py`: segmentation's ActivateEnsembleVersion, or the Triton repository
load) and re-infers the undecided cases in worklist order, inside the round's span; the
Kubernetes Job runner is `jobs_k8s.py`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.organs import ORGANS
from atlasflow.segmentation.ensemble import EnsembleConfig, MemberConfig
from atlasflow.training.dataset import (
    CaseDecisions,
    DecisionSource,
    Manifest,
    atomic_write,
    build_manifest,
    collect_decisions,
    load_case,
    write_manifest,
)
from atlasflow.training.finetune import Hyperparameters, MemberResult, finetune_member, members_to_train
from atlasflow.training.gate import GateResult, dice, gate
from atlasflow.training.versions import EnsembleVersion, current_ensemble, promote, update_card, write_version

_tracer = trace.get_tracer("atlasflow.training")


@dataclass
class RoundResult:
    manifest_digest: str
    version: EnsembleVersion | None
    gate: GateResult | None
    promoted: bool
    members: list[MemberResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    holdout_dice: dict[str, list[list[float]]] = field(default_factory=dict)
    # what `run_round`'s on_promoted returned: {"rollout": ..., "reinfer": {...}}
    follow_up: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_digest": self.manifest_digest,
            "version": self.version.name if self.version else "",
            "promoted": self.promoted,
            "gate": self.gate.to_dict() if self.gate else None,
            "members": [
                {"member": m.member, "digest": m.digest, "final_loss": m.final_loss, "seconds": round(m.seconds, 2)}
                for m in self.members
            ],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "holdout_dice": self.holdout_dice,
            "follow_up": self.follow_up,
        }


def evaluate(ensemble: EnsembleConfig, manifest: Manifest, blobs: BlobStore) -> np.ndarray:
    """Dice ``(holdout cases, 9)`` of ``ensemble`` against the held-out cases' human organs
    (NaN where the organ is undecided), on the native grid, with the segmentation pipeline."""
    from atlasflow.segmentation.pipeline import EnsemblePipeline

    pipeline = EnsemblePipeline(str(ensemble.source))
    out = np.full((len(manifest.holdout), len(ORGANS)), np.nan)
    for i, case in enumerate(manifest.holdout):
        arrays = load_case(blobs, case)
        labels = pipeline(arrays.hu.astype(np.int16), arrays.affine).labels
        for organ in case.human_organs:
            out[i, organ - 1] = dice(labels == organ, arrays.organs[organ - 1].astype(bool))
    return out


def run_round(
    source: DecisionSource,
    blobs: BlobStore,
    state_dir: Path,
    hyperparameters: Hyperparameters,
    *,
    seed: int = 0,
    holdout_cases: set[str] | None = None,
    holdout_fraction: float = 0.25,
    margin: float = 0.01,
    n_boot: int = 2000,
    device: str = "cpu",
    parent: EnsembleConfig | None = None,
    on_progress: Callable[[str, int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    finetune_stage: Callable[[EnsembleConfig, list[MemberConfig], Manifest, str, Path], list[MemberResult]]
    | None = None,
    on_promoted: Callable[[EnsembleVersion, list[CaseDecisions]], dict[str, Any]] | None = None,
) -> RoundResult:
    """Run one round (module docstring). ``parent``: the version to fine-tune (default: the
    promoted one, `current_ensemble`). ``on_stage``: called with "manifest", "finetune",
    "version", "evaluate", "gate" as each stage begins (the training service's progress).
    ``finetune_stage(parent, members, manifest, digest, run_dir)``: trains the members elsewhere
    and returns their results (the Kubernetes runner, `atlasflow.training.k8s_runner`); default:
    in this process. ``on_promoted(version, decisions)``: run inside the round's span after a
    promotion (stage "rollout": the roll-out and the re-inference of the undecided cases,
    `atlasflow.training.reinfer.FollowUp`); its dict is the result's ``follow_up``."""
    state_dir = Path(state_dir)
    parent = parent or current_ensemble(state_dir)
    seconds: dict[str, float] = {}
    stage = on_stage or (lambda _name: None)
    with _tracer.start_as_current_span("training.round") as round_span:
        t = time.perf_counter()
        stage("manifest")
        with _tracer.start_as_current_span("training.manifest") as span:
            decisions = collect_decisions(source)
            manifest = build_manifest(
                decisions,
                parent_version=parent.version,
                seed=seed,
                hyperparameters=hyperparameters.to_dict(),
                holdout_cases=holdout_cases,
                holdout_fraction=holdout_fraction,
                pseudo_weight=hyperparameters.pseudo_weight,
            )
            path, digest = write_manifest(manifest, state_dir / "training" / "manifests")
            span.set_attribute("atlasflow.manifest_digest", digest)
            span.set_attribute("atlasflow.train_cases", len(manifest.train))
            span.set_attribute("atlasflow.holdout_cases", len(manifest.holdout))
        round_span.set_attribute("atlasflow.manifest_digest", digest)
        seconds["manifest"] = time.perf_counter() - t
        run_dir = state_dir / "training" / "runs" / digest.split(":", 1)[1][:16]
        results = []
        t = time.perf_counter()
        stage("finetune")
        if finetune_stage is not None:
            results = finetune_stage(parent, members_to_train(parent, hyperparameters), manifest, digest, run_dir)
        for member in members_to_train(parent, hyperparameters) if finetune_stage is None else []:
            results.append(
                finetune_member(
                    member,
                    manifest,
                    digest,
                    blobs,
                    run_dir,
                    device=device,
                    on_progress=on_progress,
                    should_stop=should_stop,
                )
            )
        seconds["finetune"] = time.perf_counter() - t
        t = time.perf_counter()
        stage("version")
        with _tracer.start_as_current_span("training.version") as span:
            version = write_version(
                state_dir,
                parent,
                {r.member: r.weights for r in results},
                manifest_digest=digest,
                hyperparameters=manifest.hyperparameters,
                train_cases=len(manifest.train),
                holdout_cases=len(manifest.holdout),
                metrics={r.member: {"final_loss": r.final_loss, "steps": r.steps} for r in results},
            )
            span.set_attribute("atlasflow.version", version.name)
        seconds["version"] = time.perf_counter() - t
        t = time.perf_counter()
        stage("evaluate")
        with _tracer.start_as_current_span("training.evaluate"):
            from atlasflow.segmentation.ensemble import load_ensemble

            current_dice = evaluate(parent, manifest, blobs)
            candidate_dice = evaluate(load_ensemble(version.ensemble_path), manifest, blobs)
        seconds["evaluate"] = time.perf_counter() - t
        stage("gate")
        with _tracer.start_as_current_span("training.gate") as span:
            decided = ~np.isnan(current_dice)
            result = gate(
                np.nan_to_num(current_dice),
                np.nan_to_num(candidate_dice),
                decided,
                margin=margin,
                n_boot=n_boot,
                seed=seed,
            )
            span.set_attribute("atlasflow.gate.accepted", result.accepted)
            span.set_attribute("atlasflow.gate.reason", result.reason[:200])
        update_card(
            version,
            gate=result.to_dict(),
            status="current" if result.accepted else "candidate",
            metrics={
                **version.card()["metrics"],
                "holdout_dice_current": _organ_means(current_dice),
                "holdout_dice_candidate": _organ_means(candidate_dice),
            },
        )
        follow_up: dict[str, Any] = {}
        if result.accepted:
            promote(state_dir, version)
            if on_promoted is not None:
                t = time.perf_counter()
                stage("rollout")
                follow_up = on_promoted(version, decisions)
                seconds["rollout"] = time.perf_counter() - t
        round_span.set_attribute("atlasflow.version", version.name)
        round_span.set_attribute("atlasflow.promoted", result.accepted)
        out = RoundResult(
            digest,
            version,
            result,
            result.accepted,
            results,
            seconds,
            {"current": _rows(current_dice), "candidate": _rows(candidate_dice)},
            follow_up,
        )
        record = state_dir / "training" / "rounds" / f"{digest.split(':', 1)[1]}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record, (json.dumps(out.to_dict(), indent=2) + "\n").encode())
        return out


def _organ_means(d: np.ndarray) -> dict[str, float]:
    out = {}
    for k, name in ORGANS.items():
        col = d[:, k - 1]
        if np.any(~np.isnan(col)):
            out[name] = round(float(np.nanmean(col)), 4)
    return out


def _rows(d: np.ndarray) -> list[list[float]]:
    return [[-1.0 if np.isnan(v) else round(float(v), 4) for v in row] for row in d]


def decision_count(source: DecisionSource) -> int:
    """Human organ decisions over all cases' heads."""
    return sum(len(d.human) for d in collect_decisions(source))


class TrainingWorker:
    """Automatic mode: poll every ``interval_s``; start a round when the number of human organ
    decisions grew by ``min_new_decisions`` since the last round this worker ran."""

    def __init__(
        self,
        source: DecisionSource,
        blobs: BlobStore,
        state_dir: Path,
        hyperparameters: Hyperparameters,
        *,
        min_new_decisions: int = 10,
        interval_s: float = 60.0,
        round_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.source, self.blobs, self.state_dir, self.hp = source, blobs, Path(state_dir), hyperparameters
        self.min_new = min_new_decisions
        self.interval_s = interval_s
        self.round_kwargs = dict(round_kwargs or {})
        self._stop = threading.Event()
        self._seen = 0
        self.rounds: list[RoundResult] = []

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> RoundResult | None:
        count = decision_count(self.source)
        if count - self._seen < self.min_new:
            return None
        result = run_round(
            self.source, self.blobs, self.state_dir, self.hp, should_stop=self._stop.is_set, **self.round_kwargs
        )
        self._seen = count
        self.rounds.append(result)
        return result

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)
