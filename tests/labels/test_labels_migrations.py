"""The labels schema under Alembic (atlasflow.labels.migrations): the baseline equals what the
hand-written migrations made, on SQLite and on a real PostgreSQL 15; a database the hand-written
code made (any of its steps 1-6 applied) is adopted with its rows; `atlasflow db upgrade
--service labels` does the same from the command line."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from atlasflow.common import sqlite as sq
from atlasflow.common.blobstore import BlobInfo, digest_of
from atlasflow.common.db import create_engine, current_revision, upgrade
from atlasflow.labels.migrations import MIGRATIONS
from atlasflow.labels.repository import AuditEvent, Provenance
from atlasflow.labels.schema import LEGACY_MIGRATIONS, LEGACY_PG_MIGRATIONS, migrate_postgres
from atlasflow.labels.sql import SqlLabelRepository

HEAD = MIGRATIONS.script().get_current_head()
AI = Provenance("ai", model_version="trio-v1", job_id="job-1")


def blob(tag: str) -> BlobInfo:
    return BlobInfo(digest_of(tag.encode()), len(tag))


def _norm(text: Any) -> str:
    """SQL text with quotes, casts and spacing differences taken out."""
    s = re.sub(r"::[a-z ]+", "", "" if text is None else str(text)).replace('"', "").replace("(", "").replace(")", "")
    return re.sub(r"\s+", " ", s).strip().lower()


def schema(engine: sa.Engine) -> dict[str, Any]:
    """Tables (columns with type, NOT NULL, default, identity; primary key, foreign keys,
    unique constraints, checks, indexes with their WHERE) and triggers (and functions) of a
    database, without the version tables."""
    insp = sa.inspect(engine)
    out: dict[str, Any] = {}
    for t in sorted(insp.get_table_names()):
        if t.startswith(("alembic_version", "schema_migrations", "sqlite_")):
            continue
        pk = insp.get_pk_constraint(t)["constrained_columns"]
        out[t] = {
            "columns": [
                (
                    c["name"],
                    str(c["type"]).split("(")[0],
                    bool(c["nullable"]) and c["name"] not in pk,
                    _norm(c.get("default")),
                    bool(c.get("identity")) or c.get("autoincrement") is True,
                )
                for c in insp.get_columns(t)
            ],
            "pk": pk,
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in insp.get_foreign_keys(t)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t)),
            "checks": sorted(_norm(c["sqltext"]) for c in insp.get_check_constraints(t)),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    _norm(i.get("dialect_options", {}).get(f"{engine.dialect.name}_where")),
                )
                for i in insp.get_indexes(t)
            ),
        }
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            out["triggers"] = [
                (r[0], r[1], " ".join(r[2].split()))
                for r in conn.exec_driver_sql(
                    "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
                )
            ]
            out["autoincrement"] = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '%AUTOINCREMENT%' ORDER BY name"
                )
            ]
        else:
            out["triggers"] = [
                tuple(r)
                for r in conn.exec_driver_sql(
                    "SELECT t.tgname, c.relname, p.proname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    " JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT t.tgisinternal ORDER BY t.tgname"
                )
            ]
            out["functions"] = [
                (r[0], _norm(r[1]))
                for r in conn.exec_driver_sql(
                    "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                    " WHERE n.nspname = 'public' ORDER BY p.proname"
                )
            ]
    return out


def _legacy(url: str, steps: int) -> None:
    """A database made by the hand-written code with its first `steps` migrations."""
    if url.startswith("postgresql://"):
        with psycopg.connect(url, autocommit=True) as conn:
            migrate_postgres(conn, LEGACY_PG_MIGRATIONS[:steps])
    else:
        conn = sq.connect(url)
        sq.migrate(conn, LEGACY_MIGRATIONS[:steps])
        conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_database")())
    return str(tmp_path / "labels.sqlite3")


def test_baseline_equals_the_hand_written_schema(url, tmp_path, request):
    """Revision 0001 makes the tables, columns (types, NOT NULL, defaults), keys, checks,
    indexes and triggers the hand-written migrations 1-6 made, on either back-end."""
    legacy_url = request.getfixturevalue("pg_database")() if url.startswith("postgresql") else str(tmp_path / "l.db")
    _legacy(legacy_url, 6)
    old, new = create_engine(legacy_url), create_engine(url)
    try:
        assert upgrade(new, MIGRATIONS, "0001") == "0001"
        got, want = schema(new), schema(old)
        assert set(got) == set(want)
        for key in want:
            assert got[key] == want[key], key
        assert want["triggers"]  # the comparison saw the append-only triggers
        assert upgrade(new, MIGRATIONS) == HEAD
    finally:
        old.dispose()
        new.dispose()


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_a_database_made_by_the_hand_written_code_is_adopted(url, steps):
    """Rows written by the old code (after `steps` of its migrations) survive adoption: the
    missing steps are finished (step 3 queues the old versions for ranking), 0001 is stamped,
    the newer revisions apply, and the repository carries on the chain."""
    _legacy(url, steps)
    pg = url.startswith("postgresql")
    now = "2024-01-01T00:00:00+00:00"
    insert = (
        "INSERT INTO label_versions(version_id, case_id, parent_version_id, label_map_digest,"
        " label_map_size, ct_digest, ct_size, source, organs, shape, affine, request_id,"
        " request_fingerprint, create_time) VALUES ('v1', 'c', NULL, ?, 4, ?, 4, 'ai', '[5]',"
        " '[1, 1, 1]', '[]', 'r1', 'f', ?)"
    )
    args = (blob("a").digest, blob("b").digest, now)
    if pg:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(insert.replace("?", "%s"), args)
            conn.execute("INSERT INTO case_heads VALUES ('c', 'v1', 1)")
    else:
        conn = sq.connect(url)
        conn.execute(insert, args)
        conn.execute("INSERT INTO case_heads VALUES ('c', 'v1', 1)")
        conn.close()
    repo = SqlLabelRepository(url)
    try:
        engine = create_engine(url)
        assert current_revision(engine, MIGRATIONS) == HEAD
        with engine.connect() as c:  # the legacy version table: all six steps now
            assert c.exec_driver_sql("SELECT MAX(version) FROM schema_migrations").scalar() == 6
        engine.dispose()
        v1 = repo.get_version("v1")
        assert v1.provenance.source == "ai" and repo.head("c") == v1
        events = repo.due_version_events(1e12)
        assert [(e.version_id, e.version_number) for e in events] == ([("v1", 1)] if steps < 3 else [])
        v2 = repo.create_version(
            "c", blob("lm-2"), blob("b"), AI, "r2", "v1", organs=(5,), shape=(1, 1, 1), affine=[0.0] * 16,
            audit=AuditEvent("dr-a", "ReviseLabels"),
        )  # fmt: skip
        assert [v.version_id for v in repo.history("c")] == ["v1", v2.version_id]
        assert [r.principal for r in repo.list_audit_records()[0]] == ["dr-a"]
    finally:
        repo.close()


def test_db_upgrade_command_adopts_a_labels_database(tmp_path):
    """`atlasflow db upgrade --service labels` adopts a hand-written SQLite database."""
    from atlasflow.cli.main import cli

    path = tmp_path / "labels.sqlite3"
    _legacy(str(path), 4)
    result = CliRunner().invoke(cli, ["db", "upgrade", "--service", "labels", "--url", str(path)])
    assert result.exit_code == 0, result.output
    assert f"labels: at revision {HEAD}" in result.output
