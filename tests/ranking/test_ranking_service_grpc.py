"""The real ranking gRPC server, in-process on port 0: reviewer identity from the token, leases
raced by concurrent reviewers, expiry on an injected clock, ErrorInfo reasons, filters and
pagination, rounds, reasons/pointers round trip, the pending queue-depth gauge."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import generate_latest

from atlasflow.common.clients import sync_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ranking.v1 import ranking_pb2 as pb
from atlasflow.ranking.v1 import ranking_pb2_grpc
from atlasflow.ranking.worklist import SqliteWorklist
from atlasflow.testing import auth
from atlasflow.testing.servers import in_process_ranking_server


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture()
def served(tmp_path):
    """(port, clock, metrics) of the running server."""
    clock = FakeClock()
    store = SqliteWorklist(tmp_path / "ranking.sqlite3", clock=clock)
    metrics = Metrics("ranking")
    with in_process_ranking_server(store, metrics) as port:
        yield port, clock, metrics
    store.close()


@pytest.fixture()
def server(served):
    """(stub, clock, metrics); the stub's calls carry the session's all-roles token unless a
    call passes its own (`who`)."""
    port, clock, metrics = served
    channel = sync_channel(f"127.0.0.1:{port}")
    yield ranking_pb2_grpc.RankingServiceStub(channel), clock, metrics
    channel.close()


def who(principal: str, role: str = "reviewer") -> tuple[tuple[str, str], ...]:
    """Call metadata acting as ``principal``: a token for that subject with ``role``."""
    return auth.metadata(role, subject=principal)


# the hand-offs as the services that make them (atlasflow.common.policy.HANDOFF_CALLERS)
SEGMENTATION = auth.service_metadata("segmentation")
LABELS = auth.service_metadata("labels")


def organ(o, attention, heat=None, **kw):
    return pb.OrganAttention(
        organ=o, attention_ml=attention, heatmap_ml=attention / 2 if heat is None else heat, volume_ml=100.0, **kw
    )


def submit(stub, case_id, organs, labelled=(), job="j1"):
    return stub.SubmitAttention(
        pb.SubmitAttentionRequest(
            case_id=case_id, series_id="s-" + case_id, source_job_id=job, organs=organs, labelled_organs=list(labelled)
        ),
        metadata=SEGMENTATION,
        timeout=10,
    ).item


def seed(stub, n):
    for i in range(n):
        submit(stub, f"case-{i:03d}", [organ(5, float((i * 7) % 11)), organ(6, 1.0)])


def fails(call, code, reason):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code
    info = error_info_of(err.value)
    assert info is not None and info.reason == reason and info.domain == "atlasflow.ranking"
    return info


def test_reasons_and_pointers_round_trip(server):
    stub, _, _ = server
    pointer = pb.AttentionPointer(
        voxel_box=pb.VoxelBox(x_min=10, y_min=20, z_min=30, x_max=40, y_max=50, z_max=60),
        world_box=pb.WorldBox(x_min_mm=-12.5, y_min_mm=3, z_min_mm=-100, x_max_mm=20, y_max_mm=40.5, z_max_mm=-10),
        slices=pb.SliceRange(first=30, last=60),
    )
    item = submit(
        stub,
        "c1",
        [
            organ(3, 5.0, reasons=["kidney_left: 3 components", "std mask 12 ml"], pointer=pointer),
            organ(4, 1.0, score=0.5),
        ],
        labelled=[9],
    )
    got = stub.GetWorklistItem(pb.GetWorklistItemRequest(case_id="c1")).item
    assert got == item
    by = {o.organ: o for o in got.organs}
    assert list(by[3].reasons) == ["kidney_left: 3 components", "std mask 12 ml"]
    assert by[3].pointer == pointer and not by[3].HasField("score")
    assert by[4].HasField("score") and by[4].score == 0.5 and not by[4].HasField("pointer")
    assert got.priority == 0.5  # scored case: the sum of scores
    assert got.status == pb.WORKLIST_STATUS_PENDING and list(got.labelled_organs) == [9]
    assert not got.HasField("lease") and not got.HasField("review")


def auth_fails(call, code, reason):
    """Refused by the server's authentication / authorisation, before ranking runs."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code
    info = error_info_of(err.value)
    assert info is not None and info.reason == reason and info.domain == "atlasflow.auth"


def test_principal_required(server, served):
    """No token, no call (the principal is the token's subject); a reviewer may not start rounds."""
    stub, _, _ = server
    seed(stub, 3)
    with grpc.insecure_channel(f"127.0.0.1:{served[0]}") as bare_channel:  # no token at all
        bare = ranking_pb2_grpc.RankingServiceStub(bare_channel)
        auth_fails(
            lambda: bare.LeaseCase(pb.LeaseCaseRequest(case_id="case-000")),
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_TOKEN",
        )
        auth_fails(
            lambda: bare.StartRound(pb.StartRoundRequest(budget_fraction=0.5)),
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_TOKEN",
        )
        auth_fails(
            lambda: bare.CompleteReview(
                pb.CompleteReviewRequest(case_id="case-000", outcome=pb.REVIEW_OUTCOME_ACCEPTED)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_TOKEN",
        )
    auth_fails(
        lambda: stub.StartRound(pb.StartRoundRequest(budget_fraction=0.5), metadata=who("dr-a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )


def test_racing_reviewers_never_get_the_same_case(server):
    stub, _, _ = server
    seed(stub, 48)
    stub.StartRound(pb.StartRoundRequest(budget_fraction=0.5), metadata=who("lead", "admin"))  # 24
    reviewers = [f"dr-{i}" for i in range(8)]
    tokens = {r: who(r) for r in reviewers}  # minted before the threads start
    got: list[tuple[str, str]] = []
    for _wave in range(3):  # 8 concurrent LeaseNextCase per wave, leases kept
        barrier = threading.Barrier(len(reviewers))

        def lease(r: str) -> tuple[str, str]:
            barrier.wait()  # noqa: B023 (threads joined within this iteration)
            item = stub.LeaseNextCase(pb.LeaseNextCaseRequest(), metadata=tokens[r], timeout=20).item
            assert item.status == pb.WORKLIST_STATUS_LEASED and item.lease.reviewer == r
            stub.CompleteReview(
                pb.CompleteReviewRequest(case_id=item.case_id, outcome=pb.REVIEW_OUTCOME_ACCEPTED),
                metadata=tokens[r],
                timeout=20,
            )
            return item.case_id, r

        with ThreadPoolExecutor(len(reviewers)) as pool:
            got += list(pool.map(lease, reviewers))
    cases = [c for c, _ in got]
    assert len(cases) == 24 and len(set(cases)) == 24
    fails(
        lambda: stub.LeaseNextCase(pb.LeaseNextCaseRequest(), metadata=who("dr-0")),
        grpc.StatusCode.NOT_FOUND,
        "NO_CASE_AVAILABLE",
    )
    rnd = stub.GetRound(pb.GetRoundRequest()).round
    assert (rnd.case_count, rnd.accepted_count, rnd.unreviewed_count) == (24, 24, 0)


def test_two_reviewers_racing_for_one_case(server):
    stub, _, _ = server
    submit(stub, "only", [organ(5, 1.0)])
    stub.StartRound(pb.StartRoundRequest(budget_fraction=1.0), metadata=who("lead", "admin"))
    barrier = threading.Barrier(2)
    tokens = {r: who(r) for r in ("dr-a", "dr-b")}  # minted before the threads start

    def lease(r: str) -> str:
        barrier.wait()
        try:
            return stub.LeaseNextCase(pb.LeaseNextCaseRequest(), metadata=tokens[r], timeout=20).item.lease.reviewer
        except grpc.RpcError as e:
            return error_info_of(e).reason

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(lease, ["dr-a", "dr-b"]))
    assert results in (["NO_CASE_AVAILABLE", "dr-a"], ["NO_CASE_AVAILABLE", "dr-b"])


def test_expiry_and_non_holder(server):
    stub, clock, _ = server
    seed(stub, 2)
    item = stub.LeaseCase(pb.LeaseCaseRequest(case_id="case-001"), metadata=who("dr-a")).item
    assert item.lease.expire_time.ToDatetime(UTC) - clock.now == timedelta(minutes=15)
    info = fails(
        lambda: stub.LeaseCase(pb.LeaseCaseRequest(case_id="case-001"), metadata=who("dr-b")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_HELD_BY_OTHER",
    )
    assert info.metadata["reviewer"] == "dr-a"
    fails(
        lambda: stub.CompleteReview(
            pb.CompleteReviewRequest(case_id="case-001", outcome=pb.REVIEW_OUTCOME_ACCEPTED), metadata=who("dr-b")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "LEASE_HELD_BY_OTHER",
    )
    fails(
        lambda: stub.ReleaseLease(pb.ReleaseLeaseRequest(case_id="case-001"), metadata=who("dr-b")),
        grpc.StatusCode.PERMISSION_DENIED,
        "LEASE_HELD_BY_OTHER",
    )
    stub.RenewLease(
        pb.RenewLeaseRequest(case_id="case-001", lease_duration=duration_pb2.Duration(seconds=60)), metadata=who("dr-a")
    )
    clock.advance(61)
    assert stub.GetWorklistItem(pb.GetWorklistItemRequest(case_id="case-001")).item.status == pb.WORKLIST_STATUS_PENDING
    fails(
        lambda: stub.CompleteReview(
            pb.CompleteReviewRequest(case_id="case-001", outcome=pb.REVIEW_OUTCOME_ACCEPTED), metadata=who("dr-a")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_EXPIRED",
    )
    stub.LeaseCase(pb.LeaseCaseRequest(case_id="case-001"), metadata=who("dr-b"))
    done = stub.CompleteReview(
        pb.CompleteReviewRequest(case_id="case-001", outcome=pb.REVIEW_OUTCOME_REVISED, label_version_id="lv-9"),
        metadata=who("dr-b"),
    ).item
    assert done.status == pb.WORKLIST_STATUS_REVISED and not done.HasField("lease")
    assert (done.review.outcome, done.review.reviewer, done.review.label_version_id) == (
        pb.REVIEW_OUTCOME_REVISED,
        "dr-b",
        "lv-9",
    )
    fails(
        lambda: stub.CompleteReview(
            pb.CompleteReviewRequest(case_id="case-000", outcome=pb.REVIEW_OUTCOME_UNSPECIFIED), metadata=who("dr-b")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_OUTCOME",
    )
    fails(
        lambda: stub.LeaseCase(
            pb.LeaseCaseRequest(case_id="case-000", lease_duration=duration_pb2.Duration(seconds=9 * 3600)),
            metadata=who("dr-b"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_LEASE_DURATION",
    )


def test_filters_and_pagination_across_pages(server):
    stub, _, _ = server
    for i in range(23):
        organs = [organ(5, float(i % 4)), organ(8, float(i % 3))]
        submit(stub, f"c{i:02d}", organs, labelled=[8] if i % 5 == 0 else [])
    for i in (1, 2, 6):
        stub.LeaseCase(pb.LeaseCaseRequest(case_id=f"c{i:02d}"), metadata=who("dr-a"))
    everything = stub.ListWorklist(pb.ListWorklistRequest(page_size=100)).items
    want = [
        x.case_id
        for x in everything
        if x.status == pb.WORKLIST_STATUS_PENDING
        and any(
            o.organ == common_pb2.ORGAN_SPLEEN and o.attention_ml > 0 and o.organ not in x.labelled_organs
            for o in x.organs
        )
    ]
    assert 3 < len(want) < 20
    req = pb.ListWorklistRequest(page_size=4, organs=[common_pb2.ORGAN_SPLEEN], statuses=[pb.WORKLIST_STATUS_PENDING])
    got, pages = [], 0
    while True:
        resp = stub.ListWorklist(req)
        pages += 1
        assert resp.total_size == len(want) and len(resp.items) <= 4
        got += [x.case_id for x in resp.items]
        if not resp.next_page_token:
            break
        req.page_token = resp.next_page_token
    assert got == want and pages == math.ceil(len(want) / 4)
    first = stub.ListWorklist(pb.ListWorklistRequest(page_size=2, organs=[common_pb2.ORGAN_LIVER]))
    fails(
        lambda: stub.ListWorklist(
            pb.ListWorklistRequest(page_size=2, page_token=first.next_page_token, organs=[common_pb2.ORGAN_SPLEEN])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    fails(
        lambda: stub.ListWorklist(pb.ListWorklistRequest(statuses=[0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
    )


@pytest.mark.parametrize("n", [41, 100])
def test_round_picks_ceil_five_percent(server, n):
    stub, _, _ = server
    seed(stub, n)
    ranked = [x.case_id for x in stub.ListWorklist(pb.ListWorklistRequest(page_size=1000)).items]
    rnd = stub.StartRound(
        pb.StartRoundRequest(budget_fraction=0.05, request_id="r1"), metadata=who("lead", "admin")
    ).round
    k = math.ceil(0.05 * n - 1e-9)
    assert (rnd.round_number, rnd.case_count, rnd.candidate_count) == (1, k, n)
    assert rnd.state == pb.ROUND_STATE_OPEN and rnd.creator == "lead"
    members = stub.ListWorklist(pb.ListWorklistRequest(round_number=1)).items
    assert [x.case_id for x in members] == ranked[:k]
    assert all(x.round_number == 1 for x in members)
    again = stub.StartRound(
        pb.StartRoundRequest(budget_fraction=0.05, request_id="r1"), metadata=who("lead", "admin")
    ).round
    assert again == rnd
    stub.StartRound(pb.StartRoundRequest(budget_fraction=0.05), metadata=who("lead", "admin"))
    page1 = stub.ListRounds(pb.ListRoundsRequest(page_size=1))
    page2 = stub.ListRounds(pb.ListRoundsRequest(page_size=1, page_token=page1.next_page_token))
    assert [r.round_number for r in [*page1.rounds, *page2.rounds]] == [2, 1]
    assert page1.total_size == 2 and page2.next_page_token == ""
    assert page2.rounds[0].state == pb.ROUND_STATE_CLOSED
    fails(lambda: stub.GetRound(pb.GetRoundRequest(round_number=7)), grpc.StatusCode.NOT_FOUND, "ROUND_NOT_FOUND")
    fails(
        lambda: stub.StartRound(pb.StartRoundRequest(budget_fraction=1.5), metadata=who("lead", "admin")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_BUDGET",
    )


def _gauge(metrics: Metrics, queue: str) -> float:
    text = generate_latest(metrics.registry).decode()
    line = f'atlasflow_queue_depth{{queue="{queue}",service="ranking"}}'
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(line)))


def test_pending_queue_depth(server):
    stub, _, metrics = server
    seed(stub, 5)
    assert _gauge(metrics, "worklist_pending") == 5 and _gauge(metrics, "worklist") == 5
    stub.LeaseCase(pb.LeaseCaseRequest(case_id="case-000"), metadata=who("dr-a"))
    assert _gauge(metrics, "worklist_pending") == 4
    stub.CompleteReview(
        pb.CompleteReviewRequest(case_id="case-000", outcome=pb.REVIEW_OUTCOME_ACCEPTED), metadata=who("dr-a")
    )
    stub.ReleaseLease(pb.ReleaseLeaseRequest(case_id="case-001"), metadata=who("dr-a"))
    assert _gauge(metrics, "worklist_pending") == 4 and _gauge(metrics, "worklist") == 5


def test_record_label_version_reranks_over_grpc(server):
    stub, _, _ = server
    submit(stub, "a", [organ(5, 10.0), organ(8, 4.0)])
    submit(stub, "b", [organ(5, 7.0)])
    resp = stub.RecordLabelVersion(
        pb.RecordLabelVersionRequest(
            case_id="a",
            label_version_id="v2",
            version_number=2,
            human_decided_organs=[5],
            revised_organs=[5],
            reviewer="dr.x",
        ),
        timeout=10,
        metadata=LABELS,
    )
    assert resp.item.priority == 4.0 and resp.item.rank == 2
    assert resp.item.label_version_id == "v2" and list(resp.item.human_decided_organs) == [5]
    # unknown case: remembered, no item yet
    assert not stub.RecordLabelVersion(
        pb.RecordLabelVersionRequest(case_id="later", label_version_id="v1", version_number=1),
        timeout=10,
        metadata=LABELS,
    ).HasField("item")
    fails(
        lambda: stub.RecordLabelVersion(
            pb.RecordLabelVersionRequest(case_id="a", label_version_id="v3", version_number=0),
            metadata=LABELS,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_LABEL_VERSION",
    )


def test_population_prior_learns_from_recorded_human_labels(server):
    import json

    from atlasflow.method.prior import PopulationPrior

    stub, _, _ = server
    bundled = PopulationPrior.load()

    def n(prior, organ):
        run = prior.log_volume.get(organ)
        return 0 if run is None else run.n

    kidney_n, spleen_n = n(bundled, 3), n(bundled, 8)
    first = stub.GetPopulationPrior(pb.GetPopulationPriorRequest(), timeout=10)
    assert first.learned_cases == 0
    assert PopulationPrior.from_dict(json.loads(first.prior_json)).to_dict() == bundled.to_dict()
    for i in range(3):  # three cases whose radiologists drew a 900 ml left kidney
        stub.RecordLabelVersion(
            pb.RecordLabelVersionRequest(
                case_id=f"c{i}",
                label_version_id=f"v{i}",
                version_number=2,
                human_decided_organs=[3, 8],
                revised_organs=[3],
                human_organ_geometry=[
                    pb.OrganGeometry(organ=3, volume_ml=900.0, centroid_mm=[60.0, 10.0, 100.0]),
                    pb.OrganGeometry(organ=8, volume_ml=200.0, centroid_mm=[80.0, 30.0, 110.0], fov_cut=True),
                ],
            ),
            timeout=10,
            metadata=LABELS,
        )
    got = stub.GetPopulationPrior(pb.GetPopulationPriorRequest(), timeout=10)
    learned = PopulationPrior.from_dict(json.loads(got.prior_json))
    assert got.learned_cases == 3 and learned.cases == bundled.cases + 3
    assert n(learned, 3) == kidney_n + 3
    assert learned.log_volume[3].mean > (bundled.log_volume[3].mean if kidney_n else 0.0)
    # the spleen was cut by the field of view: its volume is not learned
    assert n(learned, 8) == spleen_n
    # a later version without geometry replaces the case's contribution
    stub.RecordLabelVersion(
        pb.RecordLabelVersionRequest(case_id="c0", label_version_id="v0b", version_number=3),
        timeout=10,
        metadata=LABELS,
    )
    assert stub.GetPopulationPrior(pb.GetPopulationPriorRequest(), timeout=10).learned_cases == 2
    # geometry must be finite, three centroid values, organs among the human-decided ones
    for bad in (
        pb.OrganGeometry(organ=5, volume_ml=1.0, centroid_mm=[0.0, 0.0]),
        pb.OrganGeometry(organ=5, volume_ml=-1.0, centroid_mm=[0.0, 0.0, 0.0]),
        pb.OrganGeometry(organ=4, volume_ml=1.0, centroid_mm=[0.0, 0.0, 0.0]),
    ):
        fails(
            lambda bad=bad: stub.RecordLabelVersion(
                pb.RecordLabelVersionRequest(
                    case_id="c9",
                    label_version_id="v9",
                    version_number=1,
                    human_decided_organs=[5],
                    human_organ_geometry=[bad],
                ),
                metadata=LABELS,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_LABEL_VERSION",
        )
