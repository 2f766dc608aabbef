"""The training run store (`atlasflow.training.runs.RunStore`) on SQLite and a real PostgreSQL 15
(the ``db_url`` fixture): the same contract on both; its Alembic baseline equals the
hand-written schema, and a database that code made is adopted with its runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from atlasflow.common import db
from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.testing.postgres import make_legacy_schema
from atlasflow.training.migrations import LEGACY_PG_SCHEMA, LEGACY_SQLITE_MIGRATIONS, MIGRATIONS
from atlasflow.training.runs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, RunStore

HEAD = MIGRATIONS.script().get_current_head()


@pytest.fixture
def store(db_url: str) -> Iterator[RunStore]:
    s = RunStore(db_url)
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


# ------------------------------------------------------------------------ schema and adoption


def _make_legacy(url: str) -> None:
    """The schema as the hand-written RunStore made it."""
    make_legacy_schema(url, LEGACY_PG_SCHEMA, LEGACY_SQLITE_MIGRATIONS)


def _schema(engine: sa.Engine) -> dict:
    """Columns (type, NOT NULL, default), primary key, unique constraints and indexes of
    ``training_runs``, and (SQLite) whether seq is AUTOINCREMENT."""
    insp = sa.inspect(engine)
    pk = insp.get_pk_constraint("training_runs")["constrained_columns"]
    # seq counts as NOT NULL (SQLite's legacy INTEGER PRIMARY KEY, the rowid, never holds NULL)
    columns = [
        (c["name"], str(c["type"]), c["nullable"] and c["name"] not in pk, str(c.get("default")).strip("'\""))
        for c in insp.get_columns("training_runs")
    ]
    out = {
        "columns": columns,
        "pk": pk,
        "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints("training_runs")),
        "indexes": sorted(
            (i["name"], tuple(i["column_names"]), i["unique"]) for i in insp.get_indexes("training_runs")
        ),
    }
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'training_runs'").scalar()
        out["autoincrement"] = "AUTOINCREMENT" in ddl.upper()
    return out


def test_the_baseline_equals_the_hand_written_schema(db_url: str, tmp_path, request) -> None:
    """Revision 0001 on a fresh database == the hand-written schema on another of the same kind."""
    if db_url.startswith("postgresql://"):
        legacy_url = request.getfixturevalue("postgres").create_database()
    else:
        legacy_url = str(tmp_path / "legacy.sqlite3")
    _make_legacy(legacy_url)
    old, new = db.create_engine(legacy_url), db.create_engine(db_url)
    assert db.upgrade(new, MIGRATIONS) == HEAD
    assert _schema(new) == _schema(old)
    old.dispose()
    new.dispose()


def test_a_database_the_hand_written_code_made_is_adopted_with_its_runs(db_url: str) -> None:
    _make_legacy(db_url)
    engine = db.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO training_runs (run_id, request_id, state, requested_by, doc, create_time, update_time)"
                " VALUES ('tr-old', 'req-old', 'RUNNING', 'alice', :doc, :t, :t)"
            ),
            {"doc": '{"request": {"seed": 7}, "progress": {}, "result": {}}', "t": "2026-01-01T00:00:00+00:00"},
        )
    assert db.current_revision(engine, MIGRATIONS) is None
    with RunStore(db_url) as store:
        assert db.current_revision(engine, MIGRATIONS) == HEAD
        old = store.get("tr-old")
        assert (old.state, old.request["seed"], old.requested_by) == (RUNNING, 7, "alice")
        assert store.create({}, "bob", "req-old").run_id == "tr-old"  # the legacy request id still counts
        assert store.requeue_running() == 1 and store.claim().run_id == "tr-old"
        newer = store.create({}, "bob")
        assert [r.run_id for r in store.list()[0]] == [newer.run_id, "tr-old"]
    engine.dispose()


def test_cli_db_upgrade_training(tmp_path, capsys) -> None:
    from atlasflow.cli.main import main

    path = tmp_path / "training.sqlite3"
    assert main(["db", "upgrade", "--service", "training", "--url", str(path)]) == 0
    assert f"training: at revision {HEAD}" in capsys.readouterr().out
