"""Segmentation's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` at start).

Revisions live in ``versions/``; the version table is ``alembic_version_segmentation``.
Revision 0001 is the baseline: the job table and the outbox as the hand-written migrations
(`atlasflow.segmentation.schema.LEGACY_MIGRATIONS`) left them; a database those made is adopted
(its legacy migrations finished by `adopt_legacy`, 0001 stamped). 0002 adds the claim leases
(jobs and outbox rows) that let several replicas share one database; 0003 the served ensemble
version every replica follows (``served_version``).

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
    """Finish the hand-written migrations of a legacy (SQLite-only) job database."""
    from atlasflow.segmentation.schema import LEGACY_MIGRATIONS

    sq.migrate(dbapi_conn, LEGACY_MIGRATIONS)


MIGRATIONS = Migrations(
    service="segmentation",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("jobs", "outbox"),
    adopt_legacy=adopt_legacy,
)
