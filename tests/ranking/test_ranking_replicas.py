"""Replicas of the ranking store on one database (a store = one replica's pool): work handed
out by `lease_next` is claimed once (FOR UPDATE SKIP LOCKED on PostgreSQL), racing leases of
one case have one winner (row lock), a repeated StartRound makes one round; on SQLite and on a
real PostgreSQL 15."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest

from atlasflow.common.errors import FailedPrecondition, NotFound
from atlasflow.ranking.entries import OrganAttention, Status
from atlasflow.ranking.worklist import SqlWorklist

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
