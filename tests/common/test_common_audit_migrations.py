"""The audit log on the one database layer (`atlasflow.common.audit_migrations`): Alembic's
baseline makes exactly the table, indexes and append-only triggers the hand-written code made,
and a log that code wrote is adopted with its rows and chain, on SQLite and a real
PostgreSQL 15 (the ``db_url`` fixture); the audit's version table lives beside a service's."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from atlasflow.common import db
from atlasflow.common.audit import GENESIS, AuditLog, AuditQuery, AuditRecord, _values, chain_hash
from atlasflow.common.audit_migrations import LEGACY_PG_SCHEMA, LEGACY_SQLITE_MIGRATIONS, MIGRATIONS
from atlasflow.ranking.migrations import MIGRATIONS as RANKING
from atlasflow.testing.postgres import make_legacy_schema

HEAD = MIGRATIONS.script().get_current_head()


def _make_legacy(url: str) -> None:
    """The schema as the hand-written AuditLog made it (SQLite: common.sqlite.migrate)."""
    make_legacy_schema(url, LEGACY_PG_SCHEMA, LEGACY_SQLITE_MIGRATIONS)


def _schema(engine: sa.Engine) -> dict[str, Any]:
    """Everything of ``audit_log`` a caller can tell apart: columns (type, NOT NULL, default),
    primary key, unique constraints, indexes, triggers, and how seq is generated."""
    insp = sa.inspect(engine)
    pk = insp.get_pk_constraint("audit_log")["constrained_columns"]
    # seq counts as NOT NULL (SQLite's legacy INTEGER PRIMARY KEY, the rowid, never holds NULL)
    cols = insp.get_columns("audit_log")
    out: dict[str, Any] = {
        "columns": [(c["name"], str(c["type"]), c["nullable"] and c["name"] not in pk, c.get("default")) for c in cols],
        "pk": pk,
        "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints("audit_log")),
        "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in insp.get_indexes("audit_log")),
    }
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            out["triggers"] = conn.exec_driver_sql(
                "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
                " WHERE tgrelid = 'audit_log'::regclass AND NOT tgisinternal ORDER BY tgname"
            ).all()
            out["function"] = conn.exec_driver_sql(
                "SELECT prosrc FROM pg_proc WHERE proname = 'audit_log_append_only'"
            ).scalar()
        else:
            out["triggers"] = conn.exec_driver_sql(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
            ).all()
            ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'audit_log'").scalar()
            out["autoincrement"] = "AUTOINCREMENT" in ddl.upper()
    return out


def test_the_baseline_equals_the_hand_written_schema(db_url: str, postgres, tmp_path: Path) -> None:
    """Revision 0001 on a fresh database == the hand-written schema on another of the same kind."""
    legacy_url = postgres.create_database() if db_url.startswith("postgresql://") else str(tmp_path / "legacy.db")
    _make_legacy(legacy_url)
    old, new = db.create_engine(legacy_url), db.create_engine(db_url)
    assert db.upgrade(new, MIGRATIONS) == HEAD == "0001"
    want, got = _schema(old), _schema(new)
    assert got == want
    assert len(got["triggers"]) == 2 and got["indexes"]
    old.dispose()
    new.dispose()


def _legacy_rows(url: str, count: int) -> list[AuditRecord]:
    """``count`` chained records written straight into a legacy log (as the old code did)."""
    engine = db.create_engine(url)
    prev, out = GENESIS, []
    with engine.begin() as conn:
        for i in range(count):
            r = AuditRecord(service="labels", action="label-read", method="/m", principal=f"dr{i}", outcome="OK")
            r = replace(r, prev_hash=prev, hash=chain_hash(prev, r))
            cols = ", ".join(_values(r))
            conn.execute(
                sa.text(f"INSERT INTO audit_log ({cols}) VALUES ({', '.join(':' + c for c in _values(r))})"), _values(r)
            )
            out.append(r)
            prev = r.hash
    engine.dispose()
    return out


def test_a_log_the_hand_written_code_made_is_adopted_with_its_rows_and_chain(db_url: str) -> None:
    _make_legacy(db_url)
    legacy = _legacy_rows(db_url, 3)
    if not db_url.startswith("postgresql://"):  # a legacy file whose update trigger went missing
        raw = sqlite3.connect(db_url, isolation_level=None)
        raw.execute("DROP TRIGGER audit_log_no_update")
        raw.close()
    engine = db.create_engine(db_url)
    assert db.current_revision(engine, MIGRATIONS) is None
    audit = AuditLog(db_url)
    assert db.current_revision(engine, MIGRATIONS) == HEAD
    engine.dispose()
    assert [r.record_id for r in audit.list(AuditQuery())[0]] == [r.record_id for r in reversed(legacy)]
    new = audit.append(AuditRecord(service="labels", action="label-read", method="/m", principal="x", outcome="OK"))
    assert new.prev_hash == legacy[-1].hash and audit.verify_chain() is None
    audit.close()
    _assert_append_only(db_url)
    AuditLog(db_url).close()  # reopening an adopted log: nothing to do


def _assert_append_only(url: str) -> None:
    if url.startswith("postgresql://"):
        with psycopg.connect(url, autocommit=True) as raw:
            for sql in ("UPDATE audit_log SET principal = 'm'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                    raw.execute(sql)
        return
    raw = sqlite3.connect(url, isolation_level=None)
    for sql in ("UPDATE audit_log SET principal = 'm'", "DELETE FROM audit_log"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(sql)
    raw.close()


def test_the_audit_schema_shares_a_database_with_a_service(db_url: str) -> None:
    """A service's Alembic schema and the audit's live side by side, each with its own version
    table (neither mistakes the other's tables for a legacy schema)."""
    engine = db.create_engine(db_url)
    assert db.upgrade(engine, RANKING) == RANKING.script().get_current_head()
    AuditLog(db_url).close()
    assert db.current_revision(engine, MIGRATIONS) == HEAD
    assert db.upgrade(engine, RANKING) == RANKING.script().get_current_head()
    engine.dispose()


def test_replicas_appending_at_once_keep_one_linear_chain(db_url: str) -> None:
    """Two logs on one database (two replicas), four threads appending together: every record
    links to the one before it (without the serialised append, two would share a prev_hash)."""
    logs = [AuditLog(db_url), AuditLog(db_url)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def append(log: AuditLog, n: int) -> None:
        try:
            barrier.wait(60)
            for i in range(10):
                log.append(
                    AuditRecord(service="s", action="label-read", method="/m", principal=f"{n}-{i}", outcome="OK")
                )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(logs[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    records = list(logs[0].scan(AuditQuery()))
    assert len(records) == 40 and len({r.prev_hash for r in records}) == 40
    assert logs[1].verify_chain() is None
    for log in logs:
        log.close()
