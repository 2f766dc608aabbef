"""Training's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` when the run
store opens; ``atlasflow db upgrade --service training``).

Revisions live in ``versions/``; the version table is ``alembic_version_training``. Revision
0001 is the baseline: the ``training_runs`` table and its index exactly as the hand-written code
made them (`LEGACY_SQLITE_MIGRATIONS`, applied with `atlasflow.common.sqlite.migrate` on SQLite;
`LEGACY_PG_SCHEMA` on PostgreSQL, which kept no version table). Both are frozen here: they are
what a legacy database holds, and the baseline-equality test builds one with them.

Adoption: a database that has ``training_runs`` and no ``alembic_version_training`` was made by
the hand-written code (on PostgreSQL with no ``schema_migrations``, so ``training_runs`` alone
marks it). `adopt_legacy` re-applies the legacy DDL idempotently (rows untouched), then 0001 is
stamped.

Adding a change: a new ``versions/000N_<what>.py`` (``down_revision`` the previous one), in SQL
both SQLite and PostgreSQL accept (``op.batch_alter_table`` for SQLite column changes); never
edit a released revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.common.db import Migrations, adopt_idempotently

#: The hand-written SQLite schema (atlasflow.common.sqlite.migrate, version 1). Frozen.
LEGACY_SQLITE_MIGRATIONS = [
    """
    CREATE TABLE training_runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL UNIQUE,
        request_id TEXT UNIQUE,
        state TEXT NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        requested_by TEXT NOT NULL,
        doc TEXT NOT NULL,
        error_reason TEXT NOT NULL DEFAULT '',
        create_time TEXT NOT NULL,
        update_time TEXT NOT NULL
    );
    CREATE INDEX training_runs_state ON training_runs (state, seq);
    """
]

#: The hand-written PostgreSQL schema (applied, idempotently, by every store that opened). Frozen.
LEGACY_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_runs (
    seq BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL,
    doc TEXT NOT NULL,
    error_reason TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS training_runs_state ON training_runs (state, seq);
"""

#: The advisory lock the hand-written PostgreSQL code took around its DDL and every write (the
#: store still writes under it, so old and new replicas never interleave a claim).
LEGACY_PG_LOCK = 0x74726169_6E696E67 & 0x7FFFFFFFFFFFFFFF  # "training"


def adopt_legacy(dbapi_conn: Any) -> None:
    """Bring a legacy run database (sqlite3 or psycopg connection) to the baseline: its index,
    made again where missing; rows untouched."""
    adopt_idempotently(
        dbapi_conn,
        pg_lock=LEGACY_PG_LOCK,
        pg_script=LEGACY_PG_SCHEMA,
        sqlite_statements=["CREATE INDEX IF NOT EXISTS training_runs_state ON training_runs (state, seq)"],
    )


# The hand-written PostgreSQL code kept no version table: ``training_runs`` alone marks a legacy
# run database.
MIGRATIONS = Migrations(
    service="training",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("training_runs",),
    adopt_legacy=adopt_legacy,
    legacy_unversioned=True,
)
