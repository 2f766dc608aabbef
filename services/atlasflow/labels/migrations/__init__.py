"""The labels service's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` at start).

Revisions live in ``versions/``; the version table is ``alembic_version_labels``. Revision 0001
is the baseline: the schema the hand-written migrations (`atlasflow.labels.schema`, steps 1-6,
one list per dialect) left, on SQLite and on PostgreSQL alike (each in its own types: times
are ISO 8601 text on SQLite and TIMESTAMPTZ on PostgreSQL, as they were). A database those made
(any of steps 1-6 applied, on either back-end) is adopted: its hand-written steps are finished
(`adopt_legacy`, which also backfills what steps 3 and 4 move), 0001 is stamped, then 0002
(claims of the version-event outbox and leases of export jobs, for several replicas) applies.

Adding a change: a new file ``versions/000N_<what>.py`` with ``revision = "000N"``,
``down_revision = "000N-1"`` and ``upgrade()`` written with `alembic.op` in SQL both SQLite and
PostgreSQL accept (``op.batch_alter_table`` for SQLite column changes); never edit a released
revision.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as sq
from atlasflow.common.db import Migrations


def adopt_legacy(dbapi_conn: Any) -> None:
    """Finish the hand-written migrations of a legacy labels database: an sqlite3 connection
    (`LEGACY_MIGRATIONS`) or a psycopg 3 one (`LEGACY_PG_MIGRATIONS`, run in autocommit mode
    as the hand-written code ran them; the connection's mode is restored afterwards)."""
    from atlasflow.labels.schema import LEGACY_MIGRATIONS, LEGACY_PG_MIGRATIONS, migrate_postgres

    if isinstance(dbapi_conn, sqlite3.Connection):
        sq.migrate(dbapi_conn, LEGACY_MIGRATIONS)
        return
    dbapi_conn.rollback()  # whatever the pool left open (e.g. a pre-ping)
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    try:
        migrate_postgres(dbapi_conn, LEGACY_PG_MIGRATIONS)
    finally:
        dbapi_conn.autocommit = autocommit


MIGRATIONS = Migrations(
    service="labels",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("label_versions", "case_heads"),
    adopt_legacy=adopt_legacy,
)
