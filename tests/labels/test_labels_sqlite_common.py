"""atlasflow.common.sqlite: migrations, transactions, page tokens and page sizes."""

from __future__ import annotations

import sqlite3

import pytest

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import FailedPrecondition, InvalidArgument

MIGRATIONS = (
    "CREATE TABLE a (x INTEGER PRIMARY KEY, note TEXT DEFAULT 'semi;colon');CREATE INDEX a_note ON a(note);",
    "ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT '';",
)


def test_pragmas(tmp_path):
    conn = sq.connect(tmp_path / "db.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == sq.DEFAULT_BUSY_TIMEOUT_MS


def test_migrations_apply_in_order_and_are_idempotent(tmp_path):
    path = tmp_path / "db.sqlite"
    assert sq.migrate(sq.connect(path), MIGRATIONS[:1]) == 1
    conn = sq.connect(path)  # "restart" with one more migration
    assert sq.migrate(conn, MIGRATIONS) == 2
    assert sq.migrate(conn, MIGRATIONS) == 2
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [1, 2]
    conn.execute("INSERT INTO a(x, y) VALUES (1, 'b')")
    assert conn.execute("SELECT note, y FROM a").fetchone()[:] == ("semi;colon", "b")


def test_failed_migration_leaves_nothing(tmp_path):
    conn = sq.connect(tmp_path / "db.sqlite")
    bad = (MIGRATIONS[0], "CREATE TABLE b (z INTEGER); INSERT INTO nope VALUES (1);")
    with pytest.raises(sqlite3.OperationalError):
        sq.migrate(conn, bad)
    assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "b" not in tables
    assert sq.migrate(conn, MIGRATIONS) == 2  # fixed code resumes at version 2


def test_schema_too_new(tmp_path):
    path = tmp_path / "db.sqlite"
    sq.migrate(sq.connect(path), MIGRATIONS)
    with pytest.raises(FailedPrecondition) as e:
        sq.migrate(sq.connect(path), MIGRATIONS[:1])
    assert e.value.reason == "SCHEMA_TOO_NEW"


def test_transaction_rolls_back(tmp_path):
    conn = sq.connect(tmp_path / "db.sqlite")
    sq.migrate(conn, MIGRATIONS)
    with pytest.raises(RuntimeError):
        with sq.transaction(conn):
            conn.execute("INSERT INTO a(x) VALUES (1)")
            raise RuntimeError("boom")
    assert conn.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 0


@pytest.mark.parametrize(
    "given,expected", [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (1001, 1000), (10**9, 1000)]
)
def test_page_size_clamp(given, expected):
    assert sq.clamp_page_size(given) == expected


@pytest.mark.parametrize("given", [-1, -1000])
def test_negative_page_size(given):
    with pytest.raises(InvalidArgument) as e:
        sq.clamp_page_size(given)
    assert e.value.reason == "INVALID_PAGE_SIZE"


def test_page_token_round_trip():
    tok = sq.encode_page_token("things", {"p": 1.25, "c": "case-7"}, scope="x")
    assert "=" not in tok and "+" not in tok and "/" not in tok
    assert sq.decode_page_token(tok, "things", scope="x") == {"p": 1.25, "c": "case-7"}
    assert sq.decode_page_token("", "things") is None


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!",
        "e30",
        "bnVsbA",
        "a" * 5000,
        sq.encode_page_token("other_list", {"p": 1}),  # another list's token
        sq.encode_page_token("things", {"p": 1}, scope="y"),  # the filter changed
    ],
)
def test_garbage_page_token(token):
    with pytest.raises(InvalidArgument) as e:
        sq.decode_page_token(token, "things", scope="x")
    assert e.value.reason == "INVALID_PAGE_TOKEN"
