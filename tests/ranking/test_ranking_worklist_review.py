"""The worklist store's review workflow: status transitions, leases (expiry on an injected
clock, never two holders), completion, filters with pagination, rounds, schema migration."""

from __future__ import annotations

import json
import math
import random
import threading
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import (
    AtlasflowError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from atlasflow.ranking.entries import AttentionPointer, OrganAttention, Status, WorklistFilter
from atlasflow.ranking.priority import attention_mask, case_priority
from atlasflow.ranking.schema import MIGRATIONS
from atlasflow.ranking.worklist import SqliteWorklist


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def oa(organ, attention, heat=None, vol=100.0, **kw):
    return OrganAttention(organ, attention, attention / 2 if heat is None else heat, vol, **kw)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def wl(db_url, clock):
    """The store contract runs on SQLite and on PostgreSQL (tests/conftest.py `db_url`)."""
    w = SqliteWorklist(db_url, clock=clock)
    yield w
    w.close()


# ------------------------------------------------------------------ lease state machine

A, B = "dr-a", "dr-b"
ACC, REV = Status.ACCEPTED, Status.REVISED
FP, PD, UA, IA, NF = (FailedPrecondition, PermissionDenied, Unauthenticated, InvalidArgument, NotFound)

# Each step: (operation, principal, argument) -> expected status of case "c" afterwards, or
# (error class, reason). "advance" moves the clock by `argument` seconds (default lease: 900 s).
SCENARIOS = {
    "lease": [(("lease", A, None), Status.LEASED)],
    "second_reviewer_refused": [(("lease", A, None), Status.LEASED), (("lease", B, None), (FP, "LEASE_HELD_BY_OTHER"))],
    "holder_leasing_again_renews": [
        (("lease", A, None), Status.LEASED),
        (("advance", None, 800), Status.LEASED),
        (("lease", A, None), Status.LEASED),
        (("advance", None, 800), Status.LEASED),
    ],
    "expiry_boundary": [
        (("lease", A, None), Status.LEASED),
        (("advance", None, 899.999), Status.LEASED),
        (("advance", None, 0.001), Status.PENDING),
    ],
    "expired_lease_free_for_other": [
        (("lease", A, None), Status.LEASED),
        (("advance", None, 901), Status.PENDING),
        (("lease", B, None), Status.LEASED),
        (("complete", A, ACC), (PD, "LEASE_HELD_BY_OTHER")),
        (("complete", B, REV), Status.REVISED),
    ],
    "complete_after_expiry": [
        (("lease", A, None), Status.LEASED),
        (("advance", None, 901), Status.PENDING),
        (("complete", A, ACC), (FP, "LEASE_EXPIRED")),
        (("renew", A, None), (FP, "LEASE_EXPIRED")),
    ],
    "complete_without_lease": [
        (("complete", A, ACC), (FP, "LEASE_REQUIRED")),
        (("renew", A, None), (FP, "LEASE_REQUIRED")),
    ],
    "complete_by_non_holder": [
        (("lease", A, None), Status.LEASED),
        (("complete", B, ACC), (PD, "LEASE_HELD_BY_OTHER")),
        (("renew", B, None), (PD, "LEASE_HELD_BY_OTHER")),
        (("complete", A, ACC), Status.ACCEPTED),
    ],
    "completion_is_terminal": [
        (("lease", A, None), Status.LEASED),
        (("complete", A, ACC), Status.ACCEPTED),
        (("complete", A, ACC), Status.ACCEPTED),  # idempotent repeat
        (("complete", A, REV), (FP, "CASE_ALREADY_REVIEWED")),
        (("complete", B, ACC), (FP, "CASE_ALREADY_REVIEWED")),
        (("lease", B, None), (FP, "CASE_ALREADY_REVIEWED")),
        (("renew", A, None), (FP, "CASE_ALREADY_REVIEWED")),
        (("release", A, None), Status.ACCEPTED),
    ],
    "release": [
        (("lease", A, None), Status.LEASED),
        (("release", B, None), (PD, "LEASE_HELD_BY_OTHER")),
        (("release", A, None), Status.PENDING),
        (("release", A, None), Status.PENDING),
        (("lease", B, None), Status.LEASED),
    ],
    "renew_custom_length": [
        (("lease", A, 60), Status.LEASED),
        (("advance", None, 50), Status.LEASED),
        (("renew", A, 60), Status.LEASED),
        (("advance", None, 59), Status.LEASED),
        (("advance", None, 2), Status.PENDING),
    ],
    "principal_required": [
        (("lease", "", None), (UA, "PRINCIPAL_REQUIRED")),
        (("complete", "", ACC), (UA, "PRINCIPAL_REQUIRED")),
        (("release", "", None), (UA, "PRINCIPAL_REQUIRED")),
    ],
    "bad_lease_length": [
        (("lease", A, 0.5), (IA, "INVALID_LEASE_DURATION")),
        (("lease", A, 9 * 3600), (IA, "INVALID_LEASE_DURATION")),
        (("lease", A, -5), (IA, "INVALID_LEASE_DURATION")),
    ],
    "bad_outcome": [
        (("lease", A, None), Status.LEASED),
        (("complete", A, Status.PENDING), (IA, "INVALID_OUTCOME")),
        (("complete", A, Status.LEASED), (IA, "INVALID_OUTCOME")),
    ],
}


def _do(w, clock, op, who, arg, case_id="c"):
    if op == "advance":
        clock.advance(arg)
    elif op == "lease":
        w.lease(case_id, who, arg)
    elif op == "renew":
        w.renew(case_id, who, arg)
    elif op == "release":
        w.release(case_id, who)
    elif op == "complete":
        w.complete(case_id, who, arg, "lv-1" if arg == REV else "")
    else:
        raise AssertionError(op)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lease_state_machine(wl, clock, name):
    wl.submit("c", "s", "j", [oa(5, 3.0)])
    for (op, who, arg), want in SCENARIOS[name]:
        if isinstance(want, tuple):
            cls, reason = want
            with pytest.raises(AtlasflowError) as err:
                _do(wl, clock, op, who, arg)
            assert type(err.value) is cls and err.value.reason == reason, (op, who, arg)
        else:
            _do(wl, clock, op, who, arg)
            entry, _ = wl.get("c")
            assert entry.status == want, (op, who, arg)
            assert (entry.lease is not None) == (want == Status.LEASED)
            assert (entry.review is not None) == (want in (ACC, REV))


def test_lease_and_review_fields(wl, clock):
    wl.submit("c", "s", "j", [oa(5, 3.0)])
    t0 = clock.now
    entry, rank = wl.lease("c", A, 120)
    assert rank == 1 and entry.lease is not None
    assert (entry.lease.reviewer, entry.lease.start_time) == (A, t0)
    assert entry.lease.expire_time == t0 + timedelta(seconds=120)
    clock.advance(30)
    entry, _ = wl.complete("c", A, Status.REVISED, "lv-7")
    assert entry.lease is None and entry.review is not None
    assert (entry.review.outcome, entry.review.reviewer, entry.review.label_version_id, entry.review.complete_time) == (
        Status.REVISED,
        A,
        "lv-7",
        t0 + timedelta(seconds=30),
    )


def test_lease_errors_name_the_holder_not_the_patient(wl):
    wl.submit("c", "s", "j", [oa(5, 3.0)])
    wl.lease("c", A)
    with pytest.raises(FailedPrecondition) as err:
        wl.lease("c", B)
    assert err.value.metadata["reviewer"] == A and "expire_time" in err.value.metadata
    with pytest.raises(NotFound) as err2:
        wl.lease("nope", A)
    assert err2.value.reason == "CASE_NOT_FOUND"


def test_default_lease_length_is_settable(tmp_path, clock):
    with SqliteWorklist(tmp_path / "r.sqlite", clock=clock, default_lease_s=60) as w:
        w.submit("c", "s", "j", [oa(5, 1.0)])
        e, _ = w.lease("c", A)
        assert e.lease is not None and e.lease.expire_time - clock.now == timedelta(seconds=60)
    with pytest.raises(InvalidArgument):
        SqliteWorklist(tmp_path / "r2.sqlite", default_lease_s=0.1)


# ---------------------------------------------------------------- reasons, pointers, scores

PTR = AttentionPointer((10, 20, 30), (40, 50, 60), (-12.5, 3.0, -100.0), (20.0, 40.5, -10.0), (30, 60))


def test_reasons_pointer_and_score_round_trip(tmp_path, clock):
    organs = [oa(3, 5.0, reasons=("kidney_left: 3 components", "std mask 12 ml"), pointer=PTR), oa(4, 1.0, score=0.0)]
    with SqliteWorklist(tmp_path / "r.sqlite", clock=clock) as w:
        w.submit("c", "s", "j", organs)
    with SqliteWorklist(tmp_path / "r.sqlite", clock=clock) as w:  # after a restart
        e, _ = w.get("c")
    by = {o.organ: o for o in e.organs}
    assert by[3].reasons == ("kidney_left: 3 components", "std mask 12 ml")
    assert by[3].pointer == PTR and by[3].score is None
    assert by[4].score == 0.0 and by[4].pointer is None and by[4].reasons == ()


@pytest.mark.parametrize(
    "organs,labelled,priority,mask_organs",
    [
        ([oa(5, 4.0), oa(6, 2.0)], [], 6.0, {5, 6}),
        ([oa(5, 4.0), oa(6, 0.0)], [], 4.0, {5}),
        ([oa(5, 4.0), oa(6, 2.0)], [6], 4.0, {5}),
        # Scores, when given on any organ, replace attention_ml (unset score = 0).
        ([oa(5, 4.0, score=1.5), oa(6, 2.0)], [], 1.5, {5}),
        ([oa(5, 0.0, score=3.0), oa(6, 2.0, score=0.0), oa(7, 9.0, score=2.0)], [7], 3.0, {5}),
        ([], [], 0.0, set()),
    ],
)
def test_priority_and_organ_mask(organs, labelled, priority, mask_organs):
    assert case_priority(organs, labelled) == pytest.approx(priority)
    assert attention_mask(organs, labelled) == sum(1 << o for o in mask_organs)


@pytest.mark.parametrize(
    "organ",
    [
        oa(5, 1.0, reasons=("",)),
        oa(5, 1.0, reasons=("x",) * 33),
        oa(5, 1.0, reasons=("a" * 257,)),
        oa(5, 1.0, reasons=("line\nbreak",)),
        oa(5, 1.0, score=float("nan")),
        oa(5, 1.0, score=-1.0),
        oa(5, 1.0, pointer=AttentionPointer((5, 0, 0), (4, 1, 1), (0, 0, 0), (1, 1, 1), (0, 1))),
        oa(5, 1.0, pointer=AttentionPointer((-1, 0, 0), (4, 1, 1), (0, 0, 0), (1, 1, 1), (0, 1))),
        oa(5, 1.0, pointer=AttentionPointer((0, 0, 0), (4, 1, 1), (0, 0, 2), (1, 1, 1), (0, 1))),
        oa(5, 1.0, pointer=AttentionPointer((0, 0, 0), (4, 1, 1), (0, 0, 0), (1, 1, 1), (3, 1))),
    ],
)
def test_invalid_reasons_pointers_scores(wl, organ):
    with pytest.raises(InvalidArgument) as e:
        wl.submit("c", "s", "j", [organ])
    assert e.value.reason == "INVALID_ATTENTION"


# ------------------------------------------------------------------------------ filters


def _filter_fixture(w):
    w.submit("a", "s", "j", [oa(5, 10.0), oa(8, 0.0)])  # p 10, organs {5}
    w.submit("b", "s", "j", [oa(5, 2.0), oa(6, 3.0)], labelled_organs=[6])  # p 2, {5}
    w.submit("c", "s", "j", [oa(6, 4.0)])  # p 4, {6}
    w.submit("d", "s", "j", [oa(3, 1.0, score=0.0), oa(9, 0.0, score=2.0)])  # p 2, {9}
    w.submit("e", "s", "j", [])  # p 0, {}
    w.lease("c", A)
    w.lease("d", A)
    w.complete("d", A, Status.ACCEPTED)


@pytest.mark.parametrize(
    "flt,expected",
    [
        (WorklistFilter(), ["a", "c", "b", "d", "e"]),
        (WorklistFilter(organs=frozenset({5})), ["a", "b"]),
        (WorklistFilter(organs=frozenset({6})), ["c"]),  # b's pancreas is labelled
        (WorklistFilter(organs=frozenset({6, 9})), ["c", "d"]),
        (WorklistFilter(organs=frozenset({8})), []),  # 0 ml of attention
        (WorklistFilter(organs=frozenset({3})), []),  # scored case: score 0
        (WorklistFilter(statuses=frozenset({Status.LEASED})), ["c"]),
        (WorklistFilter(statuses=frozenset({Status.ACCEPTED, Status.REVISED})), ["d"]),
        (WorklistFilter(statuses=frozenset({Status.PENDING})), ["a", "b", "e"]),
        (WorklistFilter(organs=frozenset({5, 6}), statuses=frozenset({Status.PENDING})), ["a", "b"]),
    ],
)
def test_filters(wl, flt, expected):
    _filter_fixture(wl)
    items, token, total = wl.list(100, "", flt)
    assert [e.case_id for e, _ in items] == expected and total == len(expected) and token == ""
    everything = [e.case_id for e, _ in wl.list(100)[0]]
    assert [r for _, r in items] == [everything.index(c) + 1 for c in expected]  # global rank


def test_status_filter_follows_the_clock(wl, clock):
    _filter_fixture(wl)
    leased = WorklistFilter(statuses=frozenset({Status.LEASED}))
    assert wl.list(10, "", leased)[2] == 1
    clock.advance(901)
    assert wl.list(10, "", leased)[2] == 0
    assert wl.count_by_status() == {Status.PENDING: 4, Status.LEASED: 0, Status.ACCEPTED: 1, Status.REVISED: 0}


@pytest.mark.parametrize(
    "flt,reason",
    [
        (WorklistFilter(organs=frozenset({0})), "INVALID_FILTER"),
        (WorklistFilter(organs=frozenset({10})), "INVALID_FILTER"),
        (WorklistFilter(round_number=-1), "INVALID_FILTER"),
        (WorklistFilter(statuses=frozenset({0})), "INVALID_FILTER"),
    ],
)
def test_invalid_filters(wl, flt, reason):
    with pytest.raises(InvalidArgument) as e:
        wl.list(10, "", flt)
    assert e.value.reason == reason


@pytest.mark.parametrize("seed,page_size", [(0, 1), (1, 3), (2, 7), (3, 50)])
def test_filtered_pagination_matches_brute_force(wl, seed, page_size):
    rng = random.Random(seed)
    for i in range(40):
        organs = [oa(o, float(rng.choice([0, 0.5, 1, 3]))) for o in rng.sample(range(1, 10), 3)]
        wl.submit(f"case-{i:02d}", "s", "j", organs, rng.sample(range(1, 10), rng.randint(0, 2)))
    wl.start_round(0.25, "lead")
    for i in rng.sample(range(40), 12):
        wl.lease(f"case-{i:02d}", A)
        if i % 3 == 0:
            wl.complete(f"case-{i:02d}", A, Status.REVISED)
    flt = WorklistFilter(
        organs=frozenset(rng.sample(range(1, 10), 2)), statuses=frozenset({Status.PENDING, Status.LEASED})
    )
    everything = [e for e, _ in wl.list(1000)[0]]
    want = [
        e.case_id
        for e in everything
        if e.status in flt.statuses
        and any(o.organ in flt.organs and o.attention_ml > 0 and o.organ not in e.labelled_organs for o in e.organs)
    ]
    for f in (flt, WorklistFilter(round_number=1, statuses=flt.statuses)):
        if f.round_number:
            want = [e.case_id for e in everything if e.round_number == 1 and e.status in f.statuses]
        got, token = [], ""
        while True:
            items, token, total = wl.list(page_size, token, f)
            assert total == len(want) and len(items) <= page_size
            got += [e.case_id for e, _ in items]
            if not token:
                break
        assert got == want


def test_page_token_is_bound_to_the_filter(wl):
    for i in range(5):
        wl.submit(f"c{i}", "s", "j", [oa(5, float(i)), oa(6, 1.0)])
    f1 = WorklistFilter(organs=frozenset({5}))
    _, token, _ = wl.list(2, "", f1)
    assert token
    assert len(wl.list(2, token, f1)[0]) == 2
    for other in (
        WorklistFilter(),
        WorklistFilter(organs=frozenset({6})),
        WorklistFilter(organs=frozenset({5}), statuses=frozenset({Status.PENDING})),
    ):
        with pytest.raises(InvalidArgument) as e:
            wl.list(2, token, other)
        assert e.value.reason == "INVALID_PAGE_TOKEN"


# ------------------------------------------------------------------------------- rounds


def _seed(w, n, rng=None):
    rng = rng or random.Random(n)
    for i in range(n):
        w.submit(f"case-{i:03d}", "s", "j", [oa(5, float(rng.choice([0, 1, 2, 5, 9])))])


@pytest.mark.parametrize(
    "n,fraction", [(1, 0.05), (19, 0.05), (20, 0.05), (21, 0.05), (100, 0.07), (137, 0.05), (30, 1.0), (10, 0.333)]
)
def test_round_selects_ceil_of_budget(wl, n, fraction):
    _seed(wl, n)
    ranked = [e.case_id for e, _ in wl.list(1000)[0]]
    r = wl.start_round(fraction, "lead")
    want = math.ceil(Fraction(repr(fraction)) * n)
    assert (r.round_number, r.candidate_count, r.case_count) == (1, n, want)
    assert (r.unreviewed_count, r.accepted_count, r.revised_count) == (want, 0, 0)
    assert r.is_open and r.creator == "lead" and r.budget_fraction == fraction
    members = [e.case_id for e, _ in wl.list(1000, "", WorklistFilter(round_number=1))[0]]
    assert members == ranked[:want]
    assert all(wl.get(c)[0].round_number == 1 for c in members)


def test_rounds_skip_reviewed_cases_and_close_the_previous(wl, clock):
    _seed(wl, 40)
    ranked = [e.case_id for e, _ in wl.list(1000)[0]]
    r1 = wl.start_round(0.1, "lead")  # 4 cases
    assert r1.case_count == 4
    for _ in range(3):  # review 3 of them
        e, _ = wl.lease_next(A)
        wl.complete(e.case_id, A, Status.ACCEPTED if e.case_id != ranked[1] else Status.REVISED)
    assert [x for x in ranked[:4] if wl.get(x)[0].status in REVIEWED_ALL] == ranked[:3]
    clock.advance(60)
    r2 = wl.start_round(0.1, "lead")  # ceil(0.1 * 37) = 4
    assert (r2.round_number, r2.candidate_count, r2.case_count) == (2, 37, 4)
    members = [e.case_id for e, _ in wl.list(1000, "", WorklistFilter(round_number=2))[0]]
    assert members == ranked[3:7]  # unreviewed round-1 case first
    old = wl.get_round(1)
    assert not old.is_open and old.close_time == clock.now
    assert (old.accepted_count, old.revised_count, old.unreviewed_count) == (2, 1, 1)  # carried
    assert wl.get_round(0) == wl.get_round(2) and wl.get_round(2).is_open
    assert wl.get(ranked[3])[0].round_number == 2
    with pytest.raises(NotFound) as e:
        wl.get_round(9)
    assert e.value.reason == "ROUND_NOT_FOUND"


REVIEWED_ALL = (Status.ACCEPTED, Status.REVISED)


def test_round_request_id_is_idempotent(wl):
    _seed(wl, 10)
    r = wl.start_round(0.2, "lead", request_id="req-1")
    again = wl.start_round(0.5, "lead", request_id="req-1")
    assert again == r
    assert wl.list_rounds()[2] == 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_invalid_budget(wl, fraction):
    _seed(wl, 3)
    with pytest.raises(InvalidArgument) as e:
        wl.start_round(fraction, "lead")
    assert e.value.reason == "INVALID_BUDGET"


def test_round_needs_unreviewed_cases_and_principal(wl):
    with pytest.raises(FailedPrecondition) as e:
        wl.start_round(0.05, "lead")
    assert e.value.reason == "NO_UNREVIEWED_CASES"
    _seed(wl, 3)
    with pytest.raises(Unauthenticated):
        wl.start_round(0.05, "")


def test_list_rounds_pages_newest_first(wl):
    _seed(wl, 50)
    for _ in range(5):
        wl.start_round(0.02, "lead")
    got, token = [], ""
    while True:
        rounds, token, total = wl.list_rounds(2, token)
        assert total == 5
        got += [r.round_number for r in rounds]
        if not token:
            break
    assert got == [5, 4, 3, 2, 1]
    assert [r.is_open for r in wl.list_rounds()[0]] == [True, False, False, False, False]


def test_lease_next_walks_the_round_by_priority(wl, clock):
    with pytest.raises(FailedPrecondition) as e:
        wl.lease_next(A)
    assert e.value.reason == "NO_OPEN_ROUND"
    _seed(wl, 20)
    ranked = [e.case_id for e, _ in wl.list(1000)[0]]
    wl.start_round(0.2, "lead")  # 4 cases
    first, _ = wl.lease_next(A)
    assert first.case_id == ranked[0] and first.status == Status.LEASED
    again, _ = wl.lease_next(A)  # a retry returns the held case
    assert again.case_id == ranked[0]
    second, _ = wl.lease_next(B)
    assert second.case_id == ranked[1]
    clock.advance(901)  # both leases expire
    third, _ = wl.lease_next(B)
    assert third.case_id == ranked[0]
    wl.complete(third.case_id, B, Status.ACCEPTED)
    seen = []
    for _ in range(3):
        e, _ = wl.lease_next(A)
        seen.append(e.case_id)
        wl.complete(e.case_id, A, Status.ACCEPTED)
    assert seen == ranked[1:4]
    with pytest.raises(NotFound) as e2:
        wl.lease_next(A)
    assert e2.value.reason == "NO_CASE_AVAILABLE"


def test_new_attention_reranks_but_done_stays_done(wl):
    wl.submit("x", "s", "j1", [oa(5, 5.0)])
    wl.submit("y", "s", "j1", [oa(5, 4.0)])
    wl.submit("z", "s", "j1", [oa(5, 3.0)])
    wl.start_round(1.0, "lead")
    e, _ = wl.lease_next(A)
    assert e.case_id == "x"
    wl.complete("x", A, Status.REVISED, "lv-x")
    # New segmentation after the revision (fine-tuned models): priority changes, review stays.
    x, rank = wl.submit("x", "s", "j2", [oa(5, 50.0)])
    assert (x.priority, rank, x.status, x.source_job_id) == (50.0, 1, Status.REVISED, "j2")
    assert x.review is not None and x.review.label_version_id == "lv-x"
    assert x.round_number == 1
    # A pending case's new attention changes the order LeaseNextCase hands out.
    wl.submit("z", "s", "j2", [oa(5, 9.0)])
    assert wl.lease_next(B)[0].case_id == "z"
    r = wl.get_round(1)
    assert (r.revised_count, r.unreviewed_count) == (1, 2)


# --------------------------------------------------------------------------- concurrency


def test_racing_reviewers_on_separate_connections_never_share_a_case(tmp_path):
    """Threads with their own store (connection) on one file lease in waves (all leases of a
    wave are held at once): each case is leased to exactly one reviewer, completed once."""
    path = tmp_path / "r.sqlite"
    with SqliteWorklist(path) as w:
        _seed(w, 56)
        w.start_round(0.5, "lead")  # 28 cases = 7 waves of 4
    leased: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def review(who: str) -> None:
        w = SqliteWorklist(path)
        try:
            for _wave in range(7):
                barrier.wait(30)
                e, _ = w.lease_next(who)
                leased.setdefault(e.case_id, []).append(who)
                barrier.wait(30)
                w.complete(e.case_id, who, Status.ACCEPTED)
            barrier.wait(30)
            with pytest.raises(NotFound):
                w.lease_next(who)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()
        finally:
            w.close()

    threads = [threading.Thread(target=review, args=(f"dr-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(leased) == 28 and all(len(v) == 1 for v in leased.values())
    with SqliteWorklist(path) as w:
        r = w.get_round(1)
        assert (r.accepted_count, r.unreviewed_count) == (28, 0)
        done = w.list(1000, "", WorklistFilter(statuses=frozenset({Status.ACCEPTED})))[0]
        assert {e.case_id: e.review.reviewer for e, _ in done} == {c: v[0] for c, v in leased.items()}


# ---------------------------------------------------------------------------- migration


def test_schema_v1_database_is_migrated(tmp_path, clock):
    path = tmp_path / "old.sqlite"
    conn = sq.connect(path)
    sq.migrate(conn, MIGRATIONS[:1])
    with sq.transaction(conn):
        conn.execute(
            "INSERT INTO worklist(case_id, series_id, source_job_id, priority, organs,"
            " labelled_organs, update_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                "old",
                "s",
                "j",
                7.0,
                json.dumps([[5, 4.0, 2.0, 100.0], [6, 3.0, 1.0, 50.0], [8, 0.0, 0.0, 80.0]]),
                json.dumps([6]),
                clock.now.isoformat(),
            ),
        )
    conn.close()
    with SqliteWorklist(path, clock=clock) as w:
        e, rank = w.get("old")
        assert (e.status, e.round_number, e.lease, e.review, rank) == (Status.PENDING, 0, None, None, 1)
        assert [o.reasons for o in e.organs] == [(), (), ()]
        for organs, want in (({5}, 1), ({6}, 0), ({8}, 0)):
            assert w.list(10, "", WorklistFilter(organs=frozenset(organs)))[2] == want
        w.lease("old", A)
        assert w.get("old")[0].status == Status.LEASED
