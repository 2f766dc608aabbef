"""After a promotion: serve the new version, re-segment the undecided cases, let ranking re-rank
(no grpc; the calls go through `Peers`, `atlasflow.training.peers` over gRPC as ``svc:training``).

`SegmentationRollout` (the embedded stack, PyTriton): segmentation's ``ActivateEnsembleVersion``
makes the version servable without a restart and the default for new jobs (segmentation
verifies the weights against the model card first). In cluster mode
(`atlasflow.training.rollout.TritonRepositoryRollout`) the model is first loaded through
Triton's repository API and then activated the same way (segmentation only checks it is ready).

`reinfer_undecided`: the cases that still have an organ no human decided (the decisions the
round read: `CaseDecisions.human`; a case with no label version yet counts as undecided), in
the ranking worklist's order (highest priority first; cases not on the worklist after them,
sorted), go to segmentation's ``ReinferCases`` with the new version: one job per case, keyed by
(series, series version, ensemble version), run in that order. Each job hands its label version
to labels (AI output never replaces an organ a human decided: `atlasflow.labels.assembly`) and
its attention to ranking (``SubmitAttention``), which recomputes the case's priority. Progress
(cases queued / done / failed) is reported while the jobs run; a stop request cancels the jobs
not yet done (``CancelSegmentationJob``) and the result says so.

`FollowUp.__call__` runs both inside the training round's trace (`run_round`'s
``on_promoted``): spans ``training.rollout`` and ``training.reinfer``; segmentation's jobs carry
that trace context, so the jobs and their ranking updates appear under the round's trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from atlasflow.common.organs import ORGANS
from atlasflow.training.dataset import CaseDecisions
from atlasflow.training.versions import EnsembleVersion

_tracer = trace.get_tracer("atlasflow.training")
DONE = ("SUCCEEDED", "FAILED", "CANCELLED")
POLL_WINDOW = 64


class Peers(Protocol):
    """The calls the roll-out makes (`atlasflow.training.peers.ServicePeers`)."""

    def activate(self, version: str) -> str:
        """ActivateEnsembleVersion; returns a short description."""
        ...

    def worklist_order(self) -> list[str]:
        """Case ids of ranking's worklist, highest priority first."""
        ...

    def reinfer(self, version: str, case_ids: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """ReinferCases: ([(job id, case id)] in order, case ids segmentation has no series of)."""
        ...

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """job id -> QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED."""
        ...

    def cancel(self, job_ids: Sequence[str]) -> None: ...


@dataclass
class SegmentationRollout:
    """The embedded roll-out: segmentation's ``ActivateEnsembleVersion`` (module docstring)."""

    peers: Peers

    def __call__(self, version: EnsembleVersion) -> str:
        return self.peers.activate(version.name)


def undecided_in_order(decisions: Iterable[CaseDecisions], worklist: Sequence[str]) -> list[str]:
    """Cases with at least one organ no human decided: worklist order first, then the rest
    sorted. ``decisions``: every case with a label version (fully decided ones are dropped)."""
    decided = {d.case_id for d in decisions if set(d.human) >= set(ORGANS)}
    known = {d.case_id for d in decisions}
    ordered = [c for c in dict.fromkeys(worklist) if c not in decided]
    rest = sorted(c for c in known if c not in decided and c not in set(ordered))
    return ordered + rest


@dataclass
class ReinferProgress:
    cases_queued: int = 0
    cases_done: int = 0
    cases_failed: int = 0
    cases_cancelled: int = 0
    unknown_cases: int = 0
    cancelled: bool = False
    interrupted: bool = False
    job_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases_queued": self.cases_queued,
            "cases_done": self.cases_done,
            "cases_failed": self.cases_failed,
            "cases_cancelled": self.cases_cancelled,
            "unknown_cases": self.unknown_cases,
            "cancelled": self.cancelled,
            "interrupted": self.interrupted,
        }


def reinfer_undecided(
    peers: Peers,
    version: str,
    decisions: Iterable[CaseDecisions],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[ReinferProgress], None] = lambda _p: None,
    poll_s: float = 1.0,
    timeout_s: float = 24 * 3600.0,
    stopping: Callable[[], bool] = lambda: False,
) -> ReinferProgress:
    """Queue and follow the re-inference (module docstring); returns the final counts.
    ``should_stop``: the run was cancelled (the jobs not done are cancelled); ``stopping``: the
    training service is stopping (following ends, the jobs run on: ``interrupted``)."""
    progress = ReinferProgress()
    cases = undecided_in_order(list(decisions), peers.worklist_order())
    if not cases:
        on_progress(progress)
        return progress
    jobs, unknown = peers.reinfer(version, cases)
    progress.job_ids = [j for j, _ in jobs]
    progress.cases_queued = len(jobs)
    progress.unknown_cases = len(unknown)
    on_progress(progress)
    deadline = time.monotonic() + timeout_s
    pending = list(progress.job_ids)
    while pending:
        if stopping():
            progress.interrupted = True
            break
        if should_stop() or time.monotonic() > deadline:
            peers.cancel(pending)
            progress.cancelled = True
            states = peers.job_states(pending)
            _count(progress, states)
            progress.cases_cancelled += sum(1 for j in pending if states.get(j) not in DONE)
            break
        # jobs run in creation order: the first POLL_WINDOW pending ones are the ones moving
        states = peers.job_states(pending[:POLL_WINDOW])
        _count(progress, states)
        pending = [j for j in pending if states.get(j) not in DONE]
        on_progress(progress)
        if pending:
            time.sleep(poll_s)
    on_progress(progress)
    return progress


def _count(progress: ReinferProgress, states: Mapping[str, str]) -> None:
    for state in states.values():
        if state == "SUCCEEDED":
            progress.cases_done += 1
        elif state == "FAILED":
            progress.cases_failed += 1
        elif state == "CANCELLED":
            progress.cases_cancelled += 1


@dataclass
class FollowUp:
    """What `run_round` calls for a promoted version (``on_promoted``), inside the round's span:
    the roll-out (`rollout`: version -> description) and, with ``peers``, the re-inference of the
    undecided cases. ``decisions``: the round's decisions (read again when not given)."""

    rollout: Callable[[EnsembleVersion], str]
    peers: Peers | None = None
    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[ReinferProgress], None] = lambda _p: None
    poll_s: float = 1.0
    stopping: Callable[[], bool] = lambda: False

    def __call__(self, version: EnsembleVersion, decisions: Iterable[CaseDecisions]) -> dict[str, Any]:
        with _tracer.start_as_current_span("training.rollout") as span:
            span.set_attribute("atlasflow.version", version.name)
            description = self.rollout(version)
            span.set_attribute("atlasflow.rollout", description[:200])
        out: dict[str, Any] = {"rollout": description}
        if self.peers is None:
            return out
        with _tracer.start_as_current_span("training.reinfer") as span:
            result = reinfer_undecided(
                self.peers,
                version.name,
                decisions,
                should_stop=self.should_stop,
                on_progress=self.on_progress,
                poll_s=self.poll_s,
                stopping=self.stopping,
            )
            for k, v in result.to_dict().items():
                span.set_attribute(f"atlasflow.reinfer.{k}", v)
        out["reinfer"] = result.to_dict()
        return out
