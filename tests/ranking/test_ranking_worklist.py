"""The worklist store: priority, ranking, idempotency, replacement, restart, pagination."""

from __future__ import annotations

import random
import threading

import pytest

from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.ranking.entries import OrganAttention
from atlasflow.ranking.priority import case_priority
from atlasflow.ranking.worklist import SqliteWorklist


def oa(organ, attention, heat=None, vol=100.0):
    return OrganAttention(organ, attention, attention / 2 if heat is None else heat, vol)


@pytest.fixture
def wl(db_url):
    """The store contract runs on SQLite and on PostgreSQL (tests/conftest.py `db_url`)."""
    w = SqliteWorklist(db_url)
    yield w
    w.close()


@pytest.mark.parametrize(
    "organs,labelled,expected",
    [
        ([], [], 0.0),
        ([oa(5, 12.5), oa(8, 2.0)], [], 14.5),
        ([oa(5, 12.5), oa(8, 2.0)], [5], 2.0),
        ([oa(5, 12.5), oa(8, 2.0)], [5, 8], 0.0),
        ([oa(5, 12.5), oa(8, 2.0)], [1, 2, 3], 14.5),  # labelled organs without attention
        ([oa(i, 0.1) for i in range(1, 10)], [9], 0.8),
    ],
)
def test_case_priority(organs, labelled, expected):
    assert case_priority(organs, labelled) == pytest.approx(expected)


def test_submit_get_rank_and_organ_order(wl):
    e, rank = wl.submit(
        "c1",
        "s1",
        "j1",
        [oa(5, 1.0, heat=0.5), oa(9, 3.0, heat=2.0), oa(1, 2.0, heat=2.0)],
        [9],
        "sha256:" + "a" * 64,
        99,
    )
    assert rank == 1 and e.priority == pytest.approx(3.0)
    assert [o.organ for o in e.organs] == [1, 9, 5]  # heatmap_ml desc, ties by organ id
    assert e.heatmap_digest == "sha256:" + "a" * 64 and e.heatmap_size == 99
    assert e.labelled_organs == (9,) and e.update_time.tzinfo is not None
    wl.submit("c0", "s0", "j0", [oa(5, 10.0)])
    got, rank = wl.get("c1")
    assert got == e and rank == 2
    with pytest.raises(NotFound) as err:
        wl.get("nope")
    assert err.value.reason == "CASE_NOT_FOUND"


def test_ties_ranked_by_case_id(wl):
    for cid in ["b", "c", "a"]:
        wl.submit(cid, "s", "j", [oa(5, 1.0)])
    items, token, total = wl.list()
    assert [(e.case_id, r) for e, r in items] == [("a", 1), ("b", 2), ("c", 3)]
    assert token == "" and total == 3


@pytest.mark.parametrize("scenario", ["repeat", "repeat_after_restart", "replay_old_job"])
def test_idempotent_by_case_and_job(tmp_path, scenario):
    w = SqliteWorklist(tmp_path / "r.sqlite")
    first, _ = w.submit("c1", "s1", "j1", [oa(5, 4.0)])
    if scenario == "replay_old_job":
        newer, _ = w.submit("c1", "s1", "j2", [oa(5, 1.0)])
        again, rank = w.submit("c1", "s1", "j1", [oa(5, 4.0)])
        assert again == newer and again.source_job_id == "j2"
    else:
        if scenario == "repeat_after_restart":
            w.close()
            w = SqliteWorklist(tmp_path / "r.sqlite")
        # Same key, even with different numbers: the first write wins.
        again, rank = w.submit("c1", "s1", "j1", [oa(5, 9.0)])
        assert again == first
    assert rank == 1 and w.list()[2] == 1
    w.close()


def test_newer_job_replaces_and_reranks(wl):
    wl.submit("a", "s", "j1", [oa(5, 5.0)])
    wl.submit("b", "s", "j1", [oa(5, 3.0)])
    e, rank = wl.submit("b", "s2", "j2", [oa(5, 8.0), oa(6, 1.0)], heatmap_digest="d2")
    assert (e.series_id, e.source_job_id, e.priority, rank) == ("s2", "j2", 9.0, 1)
    assert e.heatmap_digest == "d2"
    assert wl.get("a")[1] == 2
    items, _, total = wl.list()
    assert total == 2 and [x.case_id for x, _ in items] == ["b", "a"]


def test_restart_keeps_entries(tmp_path):
    w = SqliteWorklist(tmp_path / "r.sqlite")
    entries = [w.submit(f"c{i}", "s", "j", [oa(3, float(i))])[0] for i in range(5)]
    w.close()
    w = SqliteWorklist(tmp_path / "r.sqlite")
    items, _, total = w.list()
    assert total == 5
    assert [e for e, _ in items] == sorted(entries, key=lambda e: (-e.priority, e.case_id))
    w.close()


@pytest.mark.parametrize("n,page_size", [(0, 3), (1, 1), (10, 3), (25, 5), (60, 0), (7, 1000)])
def test_pagination_without_loss_or_duplicates(wl, n, page_size):
    rng = random.Random(n)
    for i in range(n):  # many ties on purpose: priorities from a small set
        wl.submit(f"case-{i:03d}", "s", "j", [oa(5, float(rng.choice([0, 1, 2.5, 7])))])
    want = sorted(
        ((wl.get(f"case-{i:03d}")[0].priority, f"case-{i:03d}") for i in range(n)), key=lambda t: (-t[0], t[1])
    )
    got, ranks, token = [], [], ""
    while True:
        items, token, total = wl.list(page_size, token)
        assert total == n and len(items) <= (page_size or 50)
        got += [(e.priority, e.case_id) for e, _ in items]
        ranks += [r for _, r in items]
        if not token:
            break
    assert got == want
    assert ranks == list(range(1, n + 1))


def test_cursor_stable_when_new_cases_arrive(wl):
    for i in range(6):
        wl.submit(f"c{i}", "s", "j", [oa(5, float(10 - i))])
    page1, token, _ = wl.list(3)
    wl.submit("zz-top", "s", "j", [oa(5, 100.0)])  # lands before the cursor
    wl.submit("zz-low", "s", "j", [oa(5, 0.5)])  # lands after the cursor
    page2, token, _ = wl.list(3, token)
    page3, token, _ = wl.list(3, token)
    seen = [e.case_id for e, _ in page1 + page2 + page3]
    assert seen == ["c0", "c1", "c2", "c3", "c4", "c5", "zz-low"] and token == ""
    assert [r for _, r in page2] == [5, 6, 7]  # ranks are read-time ranks


@pytest.mark.parametrize(
    "token", ["garbage", "e30", "eyJrIjoid29ya2xpc3QifQ", "eyJrIjoid29ya2xpc3QiLCJzIjoiIiwiYyI6eyJwIjoieCJ9fQ"]
)
def test_garbage_page_token(wl, token):
    wl.submit("c", "s", "j", [oa(5, 1.0)])
    with pytest.raises(InvalidArgument) as e:
        wl.list(10, token)
    assert e.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(organs=[oa(0, 1.0)]), "INVALID_ATTENTION"),
        (dict(organs=[oa(10, 1.0)]), "INVALID_ATTENTION"),
        (dict(organs=[oa(5, 1.0), oa(5, 2.0)]), "INVALID_ATTENTION"),
        (dict(organs=[oa(5, -1.0)]), "INVALID_ATTENTION"),
        (dict(organs=[OrganAttention(5, float("nan"), 0.0, 0.0)]), "INVALID_ATTENTION"),
        (dict(organs=[OrganAttention(5, 1.0, float("inf"), 0.0)]), "INVALID_ATTENTION"),
        (dict(labelled_organs=[12]), "INVALID_ATTENTION"),
        (dict(case_id=""), "INVALID_ARGUMENT"),
        (dict(source_job_id=""), "INVALID_ARGUMENT"),
    ],
)
def test_invalid_submissions(wl, kwargs, reason):
    args = dict(case_id="c", series_id="s", source_job_id="j", organs=[oa(5, 1.0)])
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as e:
        wl.submit(**args)
    assert e.value.reason == reason
    assert wl.list()[2] == 0


def test_negative_page_size(wl):
    with pytest.raises(InvalidArgument) as e:
        wl.list(-5)
    assert e.value.reason == "INVALID_PAGE_SIZE"


def test_concurrent_submitters(tmp_path):
    """Threads with their own store on one file: every case lands exactly once."""
    errors = []

    def run(t):
        w = SqliteWorklist(tmp_path / "r.sqlite")
        try:
            for i in range(10):
                w.submit(f"c{i}", "s", f"job-{t}", [oa(5, float(t + i))])
        except BaseException as e:
            errors.append(e)
        finally:
            w.close()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    w = SqliteWorklist(tmp_path / "r.sqlite")
    items, _, total = w.list(100)
    assert total == 10 and sorted(e.case_id for e, _ in items) == sorted(f"c{i}" for i in range(10))
    for e, _ in items:  # each entry is whole: one job's numbers, not a mix
        t = int(e.source_job_id.split("-")[1])
        assert e.priority == float(t + int(e.case_id[1:]))
    w.close()
