"""Ranking's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` at start).

Revisions live in ``versions/``; the version table is ``alembic_version_ranking``. Revision
0001 is the baseline: the worklist schema as the hand-written migrations
(`atlasflow.ranking.schema.LEGACY_MIGRATIONS`, versions 1-4) left it. A database those made is
adopted: its legacy migrations are finished (`adopt_legacy`) and 0001 is stamped.

Adding a change: a new file ``versions/000N_<what>.py`` with ``revision = "000N"``,
``down_revision = "000N-1"`` and ``upgrade()`` written with `alembic.op` in SQL both SQLite and
PostgreSQL accept (``op.batch_alter_table`` for SQLite column changes); never edit a released
revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.common import sqlite as sq
from atlasflow.common.db import Migrations


def adopt_legacy(dbapi_conn: Any) -> None:
    """Finish the hand-written migrations of a legacy (SQLite-only) worklist database."""
    from atlasflow.ranking.schema import LEGACY_MIGRATIONS

    sq.migrate(dbapi_conn, LEGACY_MIGRATIONS)


MIGRATIONS = Migrations(
    service="ranking",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("worklist", "worklist_submissions"),
    adopt_legacy=adopt_legacy,
)
