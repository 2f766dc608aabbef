"""Ingest's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` at start).

Revisions live in ``versions/``; the version table is ``alembic_version_ingest``. Revision 0001
is the baseline: the schema the hand-written SQLite migrations
(`atlasflow.ingest.schema.LEGACY_MIGRATIONS`, steps 1-8) left. A database those made is adopted:
its legacy migrations are finished (`adopt_legacy`) and 0001 is stamped, then 0002 (assembly
claims), 0003 (outbox claims) and 0004 (the replica holding an upload's partial bytes) apply.

Adding a change: a new file ``versions/000N_<what>.py`` with ``revision = "000N"``,
``down_revision = "000N-1"`` and ``upgrade()`` written with `alembic.op` in SQL both SQLite and
PostgreSQL accept; never edit a released revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as sq
from atlasflow.common.db import Migrations


def adopt_legacy(dbapi_conn: Any) -> None:
    """Finish the hand-written migrations of a legacy (SQLite-only) ingest database."""
    from atlasflow.ingest.schema import LEGACY_MIGRATIONS

    sq.migrate(dbapi_conn, list(LEGACY_MIGRATIONS))


MIGRATIONS = Migrations(
    service="ingest",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("series_versions", "instances"),
    adopt_legacy=adopt_legacy,
)
