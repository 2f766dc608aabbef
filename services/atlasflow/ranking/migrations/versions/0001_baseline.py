"""Baseline: the worklist, its submissions, review rounds and recorded label versions.

Equals the final state of the hand-written SQLite migrations 1-4
(`atlasflow.ranking.schema.LEGACY_MIGRATIONS`), in types both SQLite and PostgreSQL accept:
times are µs since the epoch (BIGINT) or ISO 8601 text, organ lists are JSON text, priorities
double precision; case ids sort bytewise.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


# Ids sort bytewise on both back-ends (rank ties, page cursors): PostgreSQL's "C" collation =
# SQLite's default BINARY, whatever the cluster's locale.
ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _text(name: str, default: str | None = None) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False, server_default=default)


def _int(name: str, default: str = "0", kind: type[sa.types.TypeEngine[int]] = sa.BigInteger) -> sa.Column[int]:
    return sa.Column(name, kind(), nullable=False, server_default=default)


def upgrade() -> None:
    op.create_table(
        "worklist",
        sa.Column("case_id", ID, primary_key=True),
        _text("series_id"),
        _text("source_job_id"),
        sa.Column("priority", sa.Double(), nullable=False),
        _text("organs"),
        _text("labelled_organs"),
        _text("heatmap_digest", ""),
        _int("heatmap_size"),
        _text("update_time"),
        _int("attention_mask"),
        _int("round_number", kind=sa.Integer),
        _text("lease_holder", ""),
        _int("lease_start_us"),
        _int("lease_expire_us"),
        _int("outcome", kind=sa.Integer),
        _text("reviewer", ""),
        _text("label_version_id", ""),
        _int("review_us"),
        _int("review_round", kind=sa.Integer),
        _text("latest_label_version_id", ""),
        _text("human_organs", "[]"),
    )
    op.create_index("worklist_by_rank", "worklist", [sa.text("priority DESC"), "case_id"])
    op.create_index("worklist_by_round", "worklist", ["round_number", "outcome", sa.text("priority DESC"), "case_id"])
    op.create_table(
        "worklist_submissions",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("case_id", ID, nullable=False),
        _text("source_job_id"),
        _text("submit_time"),
        sa.UniqueConstraint("case_id", "source_job_id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "rounds",
        sa.Column("round_number", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("budget_fraction", sa.Double(), nullable=False),
        sa.Column("candidate_count", sa.Integer(), nullable=False),
        _text("creator"),
        sa.Column("request_id", sa.Text(), unique=True),
        sa.Column("create_us", sa.BigInteger(), nullable=False),
        sa.Column("close_us", sa.BigInteger()),
    )
    op.create_table(
        "round_cases",
        sa.Column("round_number", sa.Integer(), sa.ForeignKey("rounds.round_number"), nullable=False),
        sa.Column("case_id", ID, sa.ForeignKey("worklist.case_id"), nullable=False),
        sa.Column("selection_rank", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("round_number", "case_id"),
    )
    op.create_index("round_cases_by_case", "round_cases", ["case_id"])
    op.create_table(
        "case_labels",
        sa.Column("case_id", ID, primary_key=True),
        _text("label_version_id"),
        sa.Column("version_number", sa.Integer(), nullable=False),
        _text("human_organs"),
        _text("revised_organs"),
        _text("reviewer", ""),
        _text("record_time"),
        _text("geometry", "{}"),
    )


def downgrade() -> None:
    for table in ("case_labels", "round_cases", "rounds", "worklist_submissions", "worklist"):
        op.drop_table(table)
