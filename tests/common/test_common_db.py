"""atlasflow.common.db: URLs, the SQLite pragmas, transactions, and per-service Alembic
migrations (fresh upgrade, replicas upgrading at once, adoption of a database the hand-written
schema code made, refusal of a newer schema), on SQLite and a real PostgreSQL 15."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa

from atlasflow.common import db
from atlasflow.common import sqlite as sq
from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.ranking.migrations import MIGRATIONS
from atlasflow.ranking.schema import LEGACY_MIGRATIONS
from atlasflow.ranking.worklist import SqlWorklist

#: the newest ranking revision (what a start upgrades to)
HEAD = MIGRATIONS.script().get_current_head()


@pytest.mark.parametrize(
    ("value", "driver"),
    [
        ("/tmp/x/ranking.sqlite3", "sqlite"),
        ("sqlite:////tmp/x.db", "sqlite"),
        ("postgresql://u:secret@db:5432/atlas", "postgresql+psycopg"),
        ("postgres://u@db/atlas", "postgresql+psycopg"),
        ("postgresql+psycopg://u@db/atlas", "postgresql+psycopg"),
    ],
)
def test_database_url(value, driver):
    assert db.database_url(value).drivername == driver


def test_unsupported_url_is_refused_without_echoing_it():
    with pytest.raises(InvalidArgument) as e:
        db.database_url("mysql://root:hunter2@db/x")
    assert e.value.reason == "UNSUPPORTED_DATABASE_URL" and "hunter2" not in str(e.value)


def test_sqlite_engine_sets_the_pragmas_of_the_hand_written_stores(tmp_path):
    engine = db.create_engine(tmp_path / "sub" / "x.sqlite3")
    with engine.connect() as conn:
        got = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous", "foreign_keys")]
        assert got == ["wal", 2, 1]
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


def test_transaction_commits_or_rolls_back(db_url):
    database = db.Database(db.create_engine(db_url))
    with database.transaction() as conn:
        conn.exec_driver_sql("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    with pytest.raises(RuntimeError), database.transaction() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    with database.transaction(isolation="SERIALIZABLE") as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    with database.read() as conn:
        assert conn.exec_driver_sql("SELECT k FROM t").scalars().all() == [2]
    database.close()


def _columns(engine: sa.Engine) -> dict[str, set[tuple[str, bool]]]:
    """{table: {(column, nullable)}}; primary-key columns count as NOT NULL (SQLite lets a
    legacy ``TEXT PRIMARY KEY`` hold NULL; the baseline says NOT NULL)."""
    insp = sa.inspect(engine)
    out = {}
    for t in insp.get_table_names():
        if t.startswith(("alembic_version", "schema_migrations", "sqlite_")):
            continue
        pk = set(insp.get_pk_constraint(t)["constrained_columns"])
        out[t] = {(c["name"], bool(c["nullable"]) and c["name"] not in pk) for c in insp.get_columns(t)}
    return out


def test_fresh_upgrade_equals_the_legacy_schema(tmp_path, db_url):
    """Revision 0001 (the baseline) makes the tables and columns the hand-written migrations
    1-4 made (same names, same NOT NULL), on either back-end."""
    legacy = sq.connect(tmp_path / "legacy.sqlite3")
    sq.migrate(legacy, LEGACY_MIGRATIONS)
    legacy.close()
    old = db.create_engine(tmp_path / "legacy.sqlite3")
    new = db.create_engine(db_url)
    assert db.upgrade(new, MIGRATIONS, "0001") == "0001"
    assert _columns(new) == _columns(old)
    assert db.upgrade(new, MIGRATIONS, "0001") == "0001"  # idempotent
    old.dispose()
    new.dispose()


def test_a_database_made_by_the_hand_written_code_is_adopted(tmp_path):
    """A worklist database of the hand-written schema (SQLite, version 4, with rows) is stamped
    with the baseline and keeps every row; one of version 1 is finished first."""
    path = tmp_path / "ranking.sqlite3"
    conn = sq.connect(path)
    sq.migrate(conn, LEGACY_MIGRATIONS)
    with sq.transaction(conn):
        conn.execute(
            "INSERT INTO worklist(case_id, series_id, source_job_id, priority, organs, labelled_organs,"
            " update_time, attention_mask) VALUES ('c1', 's', 'j', 4.0, ?, '[]', '2025-01-01T00:00:00+00:00', 32)",
            (json.dumps([[5, 4.0, 2.0, 100.0]]),),
        )
        conn.execute("INSERT INTO worklist_submissions(case_id, source_job_id, submit_time) VALUES ('c1', 'j', 'x')")
    conn.close()
    engine = db.create_engine(path)
    assert db.current_revision(engine, MIGRATIONS) is None
    engine.dispose()
    with SqlWorklist(path) as w:
        entry, rank = w.get("c1")
        assert (entry.priority, rank) == (4.0, 1)
        assert w.submit("c1", "s", "j", [])[0] == entry  # the legacy submission key still counts
    engine = db.create_engine(path)
    assert db.current_revision(engine, MIGRATIONS) == HEAD
    with engine.connect() as c:  # the legacy version table stays as it was (version 4)
        assert c.exec_driver_sql("SELECT MAX(version) FROM schema_migrations").scalar() == len(LEGACY_MIGRATIONS)
    engine.dispose()


def test_a_newer_schema_is_refused(db_url):
    engine = db.create_engine(db_url)
    db.upgrade(engine, MIGRATIONS)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {MIGRATIONS.version_table} SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(FailedPrecondition) as e:
        SqlWorklist(db_url)
    assert e.value.reason == "SCHEMA_TOO_NEW"


def test_replicas_upgrading_at_once_apply_each_revision_once(db_url):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(30)
            SqlWorklist(db_url).close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    engine = db.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {MIGRATIONS.version_table}")).scalars().all() == [HEAD]
    engine.dispose()


def test_cli_db_upgrade(tmp_path, capsys):
    from atlasflow.cli.main import main

    path = tmp_path / "ranking.sqlite3"
    assert main(["db", "upgrade", "--service", "ranking", "--url", str(path)]) == 0
    assert f"at revision {HEAD}" in capsys.readouterr().out
    engine = db.create_engine(path)
    assert db.current_revision(engine, MIGRATIONS) == HEAD
    engine.dispose()


def test_another_services_legacy_schema_is_not_adopted(db_url):
    """A shared database holding labels' hand-written ``schema_migrations`` (no worklist) gets
    ranking's schema fresh instead of an adoption."""
    engine = db.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"))
        conn.execute(sa.text("INSERT INTO schema_migrations VALUES (7, 'x')"))
    assert db.upgrade(engine, MIGRATIONS) == HEAD
    engine.dispose()
    with SqlWorklist(db_url) as w:
        assert w.list()[2] == 0
