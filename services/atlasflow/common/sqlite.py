"""SQLite helpers shared by the embedded stores (labels, ranking): connections, migrations, paging.

Connections
-----------
`connect(path)` opens a connection in autocommit mode (`isolation_level=None`): every write
happens inside an explicit `transaction(conn)` block, which starts with `BEGIN IMMEDIATE` so that
the write lock is taken up front. Two writers therefore never both read a stale head and then
race to commit: the second one waits (up to `busy_timeout`) until the first commits, then reads
the committed state. The database runs in WAL mode (readers never block the writer) with
`synchronous=FULL` (a committed transaction survives power loss) and foreign keys on.

Threading: a `sqlite3.Connection` must not be used by two threads at the same time. The stores
in this project hold ONE connection each and serialise every call with a `threading.RLock`; for
parallel writers open one store (one connection) per thread or per process: SQLite's file lock
plus `BEGIN IMMEDIATE` then serialises them safely.

Migrations
----------
`migrate(conn, migrations)` applies an append-only list of SQL scripts; migration *n* (1-based
position in the list) is recorded in `schema_migrations(version, applied_at)` in the same
transaction that applies it, so a crash leaves either all or nothing of it and a restart resumes
at the first missing version. Never edit or reorder a released migration: append a new one.

Paging (AIP-158)
----------------
`page_size`: 0 means the default (50), values above 1000 are clamped to 1000, negatives are
rejected. `page_token`: opaque URL-safe base64 of a small JSON cursor, bound to the list it came
from (`kind`) and to the request's filter (`scope`); anything else is INVALID_PAGE_TOKEN.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlasflow.common.errors import FailedPrecondition, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_BUSY_TIMEOUT_MS = 30_000


def connect(path: str | Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite database at `path` with the project's pragmas.

    Returns a connection in autocommit mode with `sqlite3.Row` rows; use `transaction()` for
    writes. `check_same_thread=False`: the caller serialises access (see module docstring).
    `path` may be ":memory:" for throwaway tests (WAL is then silently not used).
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    enable_wal(conn, busy_timeout_ms)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def enable_wal(conn: Any, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
    """``PRAGMA journal_mode = WAL`` on a DB-API connection or cursor, retried within the busy
    timeout: switching to WAL takes an exclusive lock and may answer "database is locked" at
    once, without the busy handler, while another connection opens or migrates the same file
    (seen with four threads opening one database under load)."""
    deadline = time.monotonic() + busy_timeout_ms / 1000.0
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` (or deferred) ... `COMMIT`, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (respects quotes and trigger bodies)."""
    statements: list[str] = []
    start = 0
    pos = script.find(";")
    while pos != -1:
        candidate = script[start : pos + 1]
        if sqlite3.complete_statement(candidate):
            if candidate.strip(" \t\r\n;"):
                statements.append(candidate.strip())
            start = pos + 1
        pos = script.find(";", pos + 1)
    rest = script[start:].strip()
    if rest:
        if not sqlite3.complete_statement(rest + ";"):
            raise ValueError("incomplete SQL statement at the end of a migration")
        statements.append(rest)
    return statements


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> int:
    """Apply the missing migrations in order, each in its own transaction; return the version.

    Idempotent: a restart with the same list applies nothing. A database whose recorded version
    is newer than `migrations` (written by newer code) raises FailedPrecondition("SCHEMA_TOO_NEW").
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ( version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for version, script in enumerate(migrations, start=1):
        with transaction(conn):
            done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone()
            if done:
                continue
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES (?, ?)",
                (version, utc_now().isoformat()),
            )
    current = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0
    if current > len(migrations):
        raise FailedPrecondition(
            "SCHEMA_TOO_NEW",
            "the database was written by a newer atlasflow version",
            domain="atlasflow",
            metadata={"db_version": str(current), "code_version": str(len(migrations))},
        )
    return int(current)


def utc_now() -> datetime:
    """Timezone-aware UTC now (stored as ISO 8601 text)."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------- paging


def clamp_page_size(
    page_size: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE, domain: str = "atlasflow"
) -> int:
    """0 -> `default`; > `maximum` -> `maximum`; < 0 -> InvalidArgument("INVALID_PAGE_SIZE")."""
    if page_size < 0:
        raise InvalidArgument(
            "INVALID_PAGE_SIZE", "page_size must not be negative", domain=domain, metadata={"page_size": str(page_size)}
        )
    if page_size == 0:
        return default
    return min(int(page_size), maximum)


def encode_page_token(kind: str, cursor: Mapping[str, Any], *, scope: str = "") -> str:
    """Opaque token for `cursor` (JSON-serialisable) of list `kind` under filter `scope`."""
    payload = json.dumps({"k": kind, "s": scope, "c": dict(cursor)}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, kind: str, *, scope: str = "", domain: str = "atlasflow") -> dict[str, Any] | None:
    """The cursor of `token`, or None for "" (first page).

    Raises InvalidArgument("INVALID_PAGE_TOKEN") for anything that is not a token this module
    made for the same `kind` and `scope` (garbage, another list's token, a changed filter).
    """
    if not token:
        return None

    def bad() -> InvalidArgument:
        return InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid for this request", domain=domain)

    if len(token) > 4096:
        raise bad()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad() from None
    if (
        not isinstance(payload, dict)
        or payload.get("k") != kind
        or payload.get("s") != scope
        or not isinstance(payload.get("c"), dict)
    ):
        raise bad()
    cursor: dict[str, Any] = payload["c"]
    return cursor
