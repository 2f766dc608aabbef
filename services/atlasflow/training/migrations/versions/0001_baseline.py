"""Baseline: the training runs table as the hand-written code made it
(`atlasflow.training.migrations.LEGACY_SQLITE_MIGRATIONS` / ``LEGACY_PG_SCHEMA``).

``seq`` is ``INTEGER PRIMARY KEY AUTOINCREMENT`` on SQLite and ``BIGSERIAL`` on PostgreSQL (the
list's newest-first order and page cursor); ``doc`` is the run's JSON document (request,
progress, result); times are ISO 8601 text with the UTC offset; ``request_id`` is unique when
given (NULL otherwise).

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text(), nullable=False, unique=True),
        sa.Column("request_id", sa.Text(), unique=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("cancel_requested", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("error_reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("create_time", sa.Text(), nullable=False),
        sa.Column("update_time", sa.Text(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("training_runs_state", "training_runs", ["state", "seq"])


def downgrade() -> None:
    op.drop_table("training_runs")
