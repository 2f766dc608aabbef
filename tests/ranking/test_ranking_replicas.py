"""Replicas of the ranking store on one database (a store = one replica's pool): work handed
out by `lease_next` is claimed once (FOR UPDATE SKIP LOCKED on PostgreSQL), racing leases of
one case have one winner (row lock), a repeated StartRound makes one round; on SQLite and on a
real PostgreSQL 15. Then two real ranking gRPC servers (each its own store, servicer and learned
model) on one PostgreSQL: rounds, leases and reviews through both, and label-version events
delivered to both at once make one set of decisions and one model every replica scores with."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc.error_details_pb2 import ErrorInfo

from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import FailedPrecondition, NotFound
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import error_info_of
from atlasflow.method.learned import FEATURES, MIN_DECISIONS
from atlasflow.ranking.entries import OrganAttention, Status
from atlasflow.ranking.v1 import ranking_pb2 as pb
from atlasflow.ranking.v1 import ranking_pb2_grpc
from atlasflow.ranking.worklist import SqlWorklist
from atlasflow.testing import auth
from atlasflow.testing.servers import in_process_ranking_server

REPLICAS = 4


def _together(n: int, work: Callable[[int, SqlWorklist], None], url: str) -> list[BaseException]:
    """Run `work(i, store)` in n threads, each with its own store on `url`, started together."""
    errors: list[BaseException] = []
    stores = [SqlWorklist(url) for _ in range(n)]
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(60)
            work(i, stores[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for s in stores:
        s.close()
    return errors


@pytest.fixture
def seeded(db_url) -> str:
    with SqlWorklist(db_url) as w:
        for i in range(30):
            w.submit(f"case-{i:02d}", "s", "j", [OrganAttention(5, float(i % 7) + 1, 1.0, 100.0)])
        w.start_round(1.0, "lead")
    return db_url


def test_lease_next_hands_each_case_to_one_replica(seeded):
    leased: list[tuple[str, str]] = []
    lock = threading.Lock()

    def review(i: int, w: SqlWorklist) -> None:
        who = f"dr-{i}"
        while True:
            try:
                e, _ = w.lease_next(who)
            except NotFound:
                return
            with lock:
                leased.append((e.case_id, who))
            w.complete(e.case_id, who, Status.ACCEPTED)

    assert not _together(REPLICAS, review, seeded)
    counts = Counter(c for c, _ in leased)
    assert len(counts) == 30 and set(counts.values()) == {1}
    with SqlWorklist(seeded) as w:
        r = w.get_round(1)
        assert (r.accepted_count, r.unreviewed_count) == (30, 0)
        done = w.list(100)[0]
        assert {e.case_id: e.review.reviewer for e, _ in done} == dict(leased)


def test_racing_leases_of_one_case_have_one_winner(seeded):
    won: list[str] = []
    refused: list[str] = []

    def take(i: int, w: SqlWorklist) -> None:
        try:
            w.lease("case-03", f"dr-{i}")
            won.append(f"dr-{i}")
        except FailedPrecondition as exc:
            assert exc.reason == "LEASE_HELD_BY_OTHER"
            refused.append(f"dr-{i}")

    assert not _together(REPLICAS, take, seeded)
    assert len(won) == 1 and len(refused) == REPLICAS - 1
    with SqlWorklist(seeded) as w:
        e, _ = w.get("case-03")
        assert e.status == Status.LEASED and e.lease.reviewer == won[0]


def test_a_repeated_start_round_makes_one_round(seeded):
    numbers: list[int] = []

    def start(i: int, w: SqlWorklist) -> None:
        numbers.append(w.start_round(0.5, "lead", request_id="req-2").round_number)

    assert not _together(REPLICAS, start, seeded)
    assert numbers == [2] * REPLICAS
    with SqlWorklist(seeded) as w:
        assert w.list_rounds()[2] == 2
        assert w.get_round(0).case_count == 15


# ------------------------------------------------- two real ranking servers on one PostgreSQL

LIVER = 5
REVIEWER_A = auth.metadata("reviewer", "dr-a")
REVIEWER_B = auth.metadata("reviewer", "dr-b")
ADMIN = auth.metadata("admin", "lead")
SEGMENTATION = auth.service_metadata("segmentation")
LABELS = auth.service_metadata("labels")


def _features(suspicious: float) -> dict[str, float]:
    """Organ features where the std-mask term predicts a revision and the reference heatmap
    (segmentation's own score) says the opposite (as in test_ranking_learned)."""
    f = dict.fromkeys(FEATURES, 0.0)
    f["ref_std_ml"] = math.log1p(suspicious)
    f["ref_heatmap_ml"] = f["ref_attention_ml"] = math.log1p(10.0 - min(suspicious, 9.0))
    return f


def _submit(stub: Any, case: str, suspicious: float) -> pb.WorklistItem:
    f = _features(suspicious)
    heat = math.expm1(f["ref_heatmap_ml"])
    organ = pb.OrganAttention(organ=LIVER, attention_ml=heat, heatmap_ml=heat, volume_ml=100.0, score=heat, features=f)
    request = pb.SubmitAttentionRequest(
        case_id=case, series_id="s-" + case, source_job_id="job-" + case, organs=[organ]
    )
    return stub.SubmitAttention(request, metadata=SEGMENTATION).item


def _decision(case: str, revised: bool) -> pb.RecordLabelVersionRequest:
    return pb.RecordLabelVersionRequest(
        case_id=case,
        label_version_id="v-" + case,
        version_number=2,
        human_decided_organs=[LIVER],
        revised_organs=[LIVER],
        reviewer="dr-a",
        organ_changes=[pb.OrganChange(organ=LIVER, changed_ml=20.0 if revised else 0.0)],
    )


@contextlib.contextmanager
def _replica(url: str) -> Iterator[Any]:
    """One ranking replica: its own store (pool), servicer (learned model) and gRPC server."""
    store = SqlWorklist(url)
    try:
        with in_process_ranking_server(store, Metrics("ranking")) as port, sync_channel(f"127.0.0.1:{port}") as ch:
            yield ranking_pb2_grpc.RankingServiceStub(ch)
    finally:
        store.close()


@pytest.fixture(scope="module")
def replicas(postgres) -> Iterator[tuple[str, Any, Any]]:
    """Two ranking servers on one fresh PostgreSQL database: (url, stub A, stub B)."""
    url = postgres.create_database()
    with _replica(url) as a, _replica(url) as b:
        yield url, a, b


def _both(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once (threads released together); results, or the exceptions raised."""
    out: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait(60)
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_two_servers_share_rounds_and_leases(replicas) -> None:
    url, a, b = replicas
    for i in range(10):
        _submit((a, b)[i % 2], f"r-{i:02d}", float(i))
    # the same StartRound (one request id) on both replicas at once: one round
    same = _both(
        [
            lambda s=s: s.StartRound(pb.StartRoundRequest(budget_fraction=1.0, request_id="rq-1"), metadata=ADMIN)
            for s in (a, b)
        ]
    )
    assert [r.round.round_number for r in same] == [1, 1]
    # two different StartRounds at once: serialised, numbered once each, one open round left
    two = _both([lambda s=s: s.StartRound(pb.StartRoundRequest(budget_fraction=1.0), metadata=ADMIN) for s in (a, b)])
    assert sorted(r.round.round_number for r in two) == [2, 3]
    rounds = a.ListRounds(pb.ListRoundsRequest(), metadata=ADMIN).rounds
    assert [(r.round_number, r.state == pb.ROUND_STATE_OPEN) for r in rounds] == [(3, True), (2, False), (1, False)]

    # a lease taken on A is held on B; renewed and released on B, seen on A
    held = a.LeaseCase(pb.LeaseCaseRequest(case_id="r-00"), metadata=REVIEWER_A).item
    with pytest.raises(grpc.RpcError) as other:
        b.LeaseCase(pb.LeaseCaseRequest(case_id="r-00"), metadata=REVIEWER_B)
    assert (error_info_of(other.value) or ErrorInfo()).reason == "LEASE_HELD_BY_OTHER"
    longer = duration_pb2.Duration(seconds=3600)
    renewed = b.RenewLease(pb.RenewLeaseRequest(case_id="r-00", lease_duration=longer), metadata=REVIEWER_A).item
    assert renewed.lease.expire_time.ToDatetime() > held.lease.expire_time.ToDatetime()
    seen = a.GetWorklistItem(pb.GetWorklistItemRequest(case_id="r-00"), metadata=REVIEWER_B).item
    assert seen.lease.expire_time == renewed.lease.expire_time
    b.ReleaseLease(pb.ReleaseLeaseRequest(case_id="r-00"), metadata=REVIEWER_A)
    assert a.LeaseCase(pb.LeaseCaseRequest(case_id="r-00"), metadata=REVIEWER_B).item.lease.reviewer == "dr-b"
    b.ReleaseLease(pb.ReleaseLeaseRequest(case_id="r-00"), metadata=REVIEWER_B)

    # two reviewers take cases through both replicas at once (lease on one, complete on the other)
    def review(who: Any, first: Any, second: Any) -> list[str]:
        mine = []
        while True:
            try:
                item = first.LeaseNextCase(pb.LeaseNextCaseRequest(), metadata=who).item
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return mine
            mine.append(item.case_id)
            done = pb.CompleteReviewRequest(case_id=item.case_id, outcome=pb.REVIEW_OUTCOME_ACCEPTED)
            second.CompleteReview(done, metadata=who)

    got = _both([lambda: review(REVIEWER_A, a, b), lambda: review(REVIEWER_B, b, a)])
    assert not [g for g in got if isinstance(g, BaseException)]
    assert sorted(got[0] + got[1]) == [f"r-{i:02d}" for i in range(10)]  # each case once
    assert a.GetRound(pb.GetRoundRequest(round_number=3), metadata=ADMIN).round.accepted_count == 10


def test_two_servers_learn_one_model_from_events_delivered_to_both(replicas) -> None:
    url, a, b = replicas
    # decisions enough for a fit minus a few, recorded directly in the shared database
    with SqlWorklist(url) as seed:
        for i in range(MIN_DECISIONS - 4):
            revised = i % 2 == 0
            organ = OrganAttention(LIVER, 1.0, 1.0, 100.0, score=1.0, features=_features(8.0 if revised else 1.0))
            seed.submit(f"d-{i:03d}", "s", f"job-{i}", [organ])
            seed.record_label_version(
                f"d-{i:03d}", f"v-{i}", 2, [LIVER], [LIVER], "dr-a", (), {LIVER: 20.0 if revised else 0.0}
            )
    _submit(a, "open-calm", 0.5)
    _submit(b, "open-suspicious", 8.5)
    # the labels outbox may deliver an event to either replica, and again: each event to both at once
    for i in range(12):
        case = f"e-{i:02d}"
        _submit((a, b)[i % 2], case, 8.0 if i % 2 == 0 else 1.0)
        event = _decision(case, i % 2 == 0)
        answers = _both([functools.partial(s.RecordLabelVersion, event, metadata=LABELS) for s in (a, b)])
        assert not [x for x in answers if isinstance(x, BaseException)]
    b.StartRound(pb.StartRoundRequest(budget_fraction=1.0, request_id="rq-learned"), metadata=ADMIN)  # forces a refit

    with SqlWorklist(url) as w:
        state = w.model_state()
        decisions = w.organ_decisions()
        assert len(decisions) == MIN_DECISIONS - 4 + 12  # nothing counted twice
        assert state.fitted and state.generation >= 1
        assert w.decision_horizon() == (state.fitted_seq, 0)  # fitted on every decision
        stale = w.rescore(lambda organs: organs, state.generation)  # nothing left to rescore
        assert stale == 0

    # every replica, even a fresh one, scores a new case with the model in force
    with _replica(url) as c:
        scored = [_submit(s, f"new-{n}", 8.5) for n, s in (("a", a), ("b", b), ("c", c))]
    assert [round(x.priority, 9) for x in scored] == [round(scored[0].priority, 9)] * 3
    assert 0.5 < scored[0].priority <= 1.0 and scored[0].organs[0].reasons[0].startswith("liver: revision chance")
    items = a.ListWorklist(pb.ListWorklistRequest(page_size=200), metadata=REVIEWER_A).items
    order = [i.case_id for i in items if i.case_id.startswith("open-")]
    assert order == ["open-suspicious", "open-calm"]  # rescored by the model, whichever replica fitted it
