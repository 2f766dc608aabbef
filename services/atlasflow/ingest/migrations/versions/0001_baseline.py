"""Baseline: series versions, instances, conflicts, the outbox, resumable uploads, deletions.

Equals the final state of the hand-written SQLite migrations 1-8
(`atlasflow.ingest.schema.LEGACY_MIGRATIONS`), in types both SQLite and PostgreSQL accept:
times are seconds since the epoch (double precision), sizes BIGINT, outbox payloads bytes;
series, case and SOP keys sort bytewise.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Ids sort bytewise on both back-ends (list order, instance order): PostgreSQL's "C" collation =
# SQLite's default BINARY, whatever the cluster's locale.
ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _text(name: str, default: str | None = None) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False, server_default=default)


def _int(name: str, default: str | None = None, kind: type[sa.types.TypeEngine[int]] = sa.Integer) -> sa.Column[int]:
    return sa.Column(name, kind(), nullable=False, server_default=default)


def _time(name: str, default: str | None = None) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=False, server_default=default)


def upgrade() -> None:
    op.create_table(
        "series_versions",
        sa.Column("series_id", ID, nullable=False),
        _int("version"),
        sa.Column("case_id", ID, nullable=False),
        _text("state"),  # RECEIVING | ASSEMBLED | DISPATCHED | FAILED
        _int("instance_count", "0"),
        _time("last_instance_at"),
        _text("volume_digest", ""),
        _int("volume_size", "0", sa.BigInteger),
        _text("geometry_json", ""),
        _text("failure_reason", ""),
        _text("traceparent", ""),
        _time("create_time"),
        _time("update_time"),
        _int("duplicate_count", "0"),
        _int("conflict_count", "0"),
        _int("assembly_attempts", "0"),
        sa.PrimaryKeyConstraint("series_id", "version"),
    )
    op.create_index("series_state", "series_versions", ["state", "last_instance_at"])
    op.create_index("series_by_volume", "series_versions", ["volume_digest", "update_time"])
    op.create_table(
        "instances",
        sa.Column("series_id", ID, nullable=False),
        sa.Column("sop_key", ID, nullable=False),  # sha256 of the SOP Instance UID
        _int("version_added"),
        _text("digest"),
        _int("size_bytes", kind=sa.BigInteger),
        _time("received_at"),
        _text("content_key", ""),
        sa.PrimaryKeyConstraint("series_id", "sop_key"),
    )
    op.create_table(
        "instance_conflicts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("series_id", ID, nullable=False),
        sa.Column("sop_key", ID, nullable=False),
        _text("digest"),
        _int("size_bytes", kind=sa.BigInteger),
        _time("received_at"),
        _text("content_key", ""),
        sqlite_autoincrement=True,
    )
    op.create_index("instance_conflicts_key", "instance_conflicts", ["series_id", "sop_key", "digest"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _text("topic"),
        sa.Column("dedupe_key", sa.Text(), nullable=False, unique=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        _text("traceparent", ""),
        _int("attempts", "0"),
        _time("next_attempt_at"),
        _text("last_error", ""),
        _text("state", "pending"),  # pending | done | dead
        sqlite_autoincrement=True,
    )
    op.create_index("outbox_due", "outbox", ["state", "next_attempt_at"])
    op.create_table(
        "uploads",
        sa.Column("upload_id", sa.Text(), primary_key=True),
        _int("committed_offset", kind=sa.BigInteger),
        _int("complete", "0"),
        _text("sha256", ""),
        _text("receipt_json", ""),
        _time("create_time"),
        _time("update_time"),
    )
    op.create_table(
        "deletions",
        sa.Column("deletion_id", sa.Text(), primary_key=True),
        sa.Column("case_id", ID, nullable=False),
        _text("reason"),
        _text("requested_by"),
        _text("state"),  # RUNNING | SUCCEEDED
        _time("create_time"),
        _time("update_time"),
    )
    op.create_index("deletions_by_case", "deletions", ["case_id", "create_time"])
    op.create_table(
        "deletion_steps",
        sa.Column("deletion_id", sa.Text(), sa.ForeignKey("deletions.deletion_id"), nullable=False),
        _text("service"),
        _int("position"),
        _text("state"),  # QUEUED | SUCCEEDED
        _text("counts_json", "{}"),
        _text("released_json", "[]"),
        _text("last_error", ""),
        _time("done_time", "0"),
        sa.PrimaryKeyConstraint("deletion_id", "service"),
    )


def downgrade() -> None:
    for table in (
        "deletion_steps",
        "deletions",
        "uploads",
        "outbox",
        "instance_conflicts",
        "instances",
        "series_versions",
    ):
        op.drop_table(table)
