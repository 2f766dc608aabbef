"""Baseline: the segmentation job table and its outbox.

Equals the final state of the hand-written SQLite migrations
(`atlasflow.segmentation.schema.LEGACY_MIGRATIONS`), in types both SQLite and PostgreSQL accept:
times are seconds since the epoch (double precision), organ lists and results JSON text; job ids
sort bytewise.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from atlasflow.common.outbox import create_outbox_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Ids sort bytewise on both back-ends (page order ties): PostgreSQL's "C" collation = SQLite's BINARY.
ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", ID, primary_key=True),
        sa.Column("case_id", sa.Text(), nullable=False),
        sa.Column("series_id", sa.Text(), nullable=False),
        sa.Column("series_version", sa.BigInteger(), nullable=False),
        sa.Column("ensemble_version", sa.Text(), nullable=False),
        sa.Column("volume_digest", sa.Text(), nullable=False),
        sa.Column("volume_size", sa.BigInteger(), nullable=False),
        sa.Column("labelled_organs", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("state", sa.Text(), nullable=False),  # QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
        sa.Column("stage", sa.Text(), nullable=False, server_default=""),
        sa.Column("fraction", sa.Double(), nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("cancel_requested", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("result_json", sa.Text(), nullable=False, server_default=""),
        sa.Column("error_reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("traceparent", sa.Text(), nullable=False, server_default=""),
        sa.Column("create_time", sa.Double(), nullable=False),
        sa.Column("update_time", sa.Double(), nullable=False),
        sa.UniqueConstraint("series_id", "series_version", "ensemble_version"),
    )
    op.create_index("jobs_due", "jobs", ["state", "next_attempt_at"])
    create_outbox_table(op, claims=False)
