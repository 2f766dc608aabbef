"""The re-inference's own logic (`atlasflow.training.reinfer`): which cases, in which order, and
what a stop request does. The peers here are a scripted recorder of the calls (the services
themselves are exercised in test_training_reinfer.py)."""

from __future__ import annotations

from collections.abc import Sequence

from atlasflow.common.organs import ORGANS
from atlasflow.training.dataset import CaseDecisions
from atlasflow.training.reinfer import reinfer_undecided, undecided_in_order


def _case(case_id: str, human: Sequence[int]) -> CaseDecisions:
    return CaseDecisions(case_id, "v", "sha256:ct", "sha256:lm", {o: "v" for o in human}, {})


class Scripted:
    """Records calls; jobs finish after ``rounds`` polls unless cancelled."""

    def __init__(self, worklist: list[str], rounds: int = 2) -> None:
        self.worklist, self.rounds = worklist, rounds
        self.polls = 0
        self.cancelled: list[str] = []
        self.asked: list[str] = []

    def activate(self, version: str) -> str:
        return version

    def worklist_order(self) -> list[str]:
        return list(self.worklist)

    def reinfer(self, version: str, case_ids: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
        self.asked = list(case_ids)
        known = [c for c in case_ids if c != "case-gone"]
        return [(f"job-{c}", c) for c in known], [c for c in case_ids if c == "case-gone"]

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        self.polls += 1
        if self.cancelled:
            return {j: "CANCELLED" for j in job_ids}
        return {j: "SUCCEEDED" if self.polls >= self.rounds else "RUNNING" for j in job_ids}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled = list(job_ids)


DECISIONS = [
    _case("case-a", []),
    _case("case-b", [5]),
    _case("case-full", list(ORGANS)),  # every organ decided: never re-inferred
    _case("case-z", [1, 2]),
    _case("case-gone", []),
]


def test_undecided_cases_in_worklist_order_then_the_rest() -> None:
    order = undecided_in_order(DECISIONS, ["case-z", "case-full", "case-b"])
    assert order == ["case-z", "case-b", "case-a", "case-gone"]


def test_progress_counts_and_unknown_cases() -> None:
    peers = Scripted(["case-b"])
    seen = []
    result = reinfer_undecided(peers, "v2", DECISIONS, poll_s=0, on_progress=lambda p: seen.append(p.to_dict()))
    assert peers.asked[0] == "case-b" and "case-full" not in peers.asked
    assert (result.cases_queued, result.cases_done, result.unknown_cases, result.cancelled) == (3, 3, 1, False)
    assert seen[0]["cases_done"] == 0 and seen[-1]["cases_done"] == 3


def test_a_stop_request_cancels_the_jobs_not_done() -> None:
    peers = Scripted([], rounds=10**6)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    result = reinfer_undecided(peers, "v2", DECISIONS, poll_s=0, should_stop=stop)
    assert result.cancelled and sorted(peers.cancelled) == ["job-case-a", "job-case-b", "job-case-z"]
    assert (result.cases_done, result.cases_cancelled) == (0, 3)


def test_the_service_stopping_stops_following_but_cancels_nothing() -> None:
    peers = Scripted([], rounds=10**6)
    result = reinfer_undecided(peers, "v2", DECISIONS, poll_s=0, stopping=lambda: True)
    assert result.interrupted and not result.cancelled and not peers.cancelled
    assert result.cases_queued == 3
