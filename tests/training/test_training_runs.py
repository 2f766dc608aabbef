"""The training run store (`atlasflow.training.runs.RunStore`) on SQLite and PostgreSQL: the
same contract on both."""

from __future__ import annotations

import pytest

from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.training.runs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, RunStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = RunStore(tmp_path / "training.sqlite3")
    else:
        s = RunStore(request.getfixturevalue("pg_database")())
    yield s
    s.close()


def test_run_life_cycle(store: RunStore) -> None:
    run = store.create({"seed": 3, "hyperparameters": {"steps": 2}}, "alice", "req-1")
    assert (run.state, run.requested_by, run.request["seed"]) == (QUEUED, "alice", 3)
    assert store.create({"seed": 4}, "bob", "req-1").run_id == run.run_id  # idempotent by request id
    assert store.find_request("req-1").run_id == run.run_id and store.find_request("other") is None
    assert store.active().run_id == run.run_id
    claimed = store.claim()
    assert claimed is not None and (claimed.run_id, claimed.state) == (run.run_id, RUNNING)
    assert store.claim() is None
    store.update(run.run_id, progress={"stage": "finetune", "members": [{"member": "unet", "step": 1, "steps": 2}]})
    store.update(run.run_id, progress={"fraction": 0.5})
    got = store.get(run.run_id)
    assert got.progress == {
        "stage": "finetune",
        "members": [{"member": "unet", "step": 1, "steps": 2}],
        "fraction": 0.5,
    }
    store.finish(run.run_id, SUCCEEDED, result={"version": "v-ft-1", "promoted": True})
    done = store.get(run.run_id)
    assert (done.state, done.result["version"]) == (SUCCEEDED, "v-ft-1")
    # terminal runs do not change any more
    store.update(run.run_id, result={"version": "other"})
    store.finish(run.run_id, FAILED, "X")
    assert store.cancel(run.run_id).state == SUCCEEDED
    assert store.get(run.run_id).result["version"] == "v-ft-1"
    assert store.active() is None


def test_cancel_queued_at_once_running_by_flag(store: RunStore) -> None:
    a = store.create({}, "alice")
    assert store.cancel(a.run_id).state == CANCELLED
    assert store.claim() is None  # a cancelled run is never claimed
    b = store.create({}, "alice")
    store.claim()
    after = store.cancel(b.run_id)
    assert (after.state, after.cancel_requested) == (RUNNING, True)
    assert store.cancel_requested(b.run_id)
    store.finish(b.run_id, CANCELLED, "TRAINING_CANCELLED")
    assert store.get(b.run_id).error_reason == "TRAINING_CANCELLED"


def test_requeue_after_a_dead_process(store: RunStore) -> None:
    run = store.create({}, "alice")
    store.claim()
    assert store.requeue_running() == 1
    assert store.get(run.run_id).state == QUEUED


def test_list_pages_newest_first(store: RunStore) -> None:
    ids = [store.create({}, "alice").run_id for _ in range(5)]
    page, token = store.list(2)
    seen = [r.run_id for r in page]
    while token:
        page, token = store.list(2, token)
        seen += [r.run_id for r in page]
    assert seen == ids[::-1]
    with pytest.raises(InvalidArgument):
        store.list(2, "garbage")


def test_unknown_run(store: RunStore) -> None:
    with pytest.raises(NotFound) as exc:
        store.get("tr-nope")
    assert exc.value.reason == "RUN_NOT_FOUND"
