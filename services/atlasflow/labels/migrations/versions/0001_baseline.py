"""Baseline: label versions and case heads, export jobs and their per-case outcomes, the audit
trail, the version-event outbox to ranking.

Equals, on each back-end, the final state of the hand-written migrations 1-6 of that back-end
(`atlasflow.labels.schema.LEGACY_MIGRATIONS` on SQLite, `LEGACY_PG_MIGRATIONS` on PostgreSQL),
types included: on SQLite times are ISO 8601 text, flags and sizes INTEGER, seconds REAL, the
insertion sequences ``INTEGER PRIMARY KEY AUTOINCREMENT``; on PostgreSQL times are TIMESTAMPTZ,
sizes BIGINT, the flag BOOLEAN, seconds DOUBLE PRECISION, the sequences ``BIGINT GENERATED
ALWAYS AS IDENTITY``. The audit trail is append-only by trigger on both.

Revision ID: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME: sa.types.TypeEngine[str] = sa.Text().with_variant(sa.TIMESTAMP(timezone=True), "postgresql")
BIG: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SECONDS: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")

SQLITE_TRIGGERS = (
    "CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
)
PG_TRIGGERS = (
    "CREATE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$\n"
    "BEGIN\n    RAISE EXCEPTION 'audit records are append-only';\nEND;\n$$",
    "CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records"
    " FOR EACH ROW EXECUTE FUNCTION audit_records_append_only()",
)


def _seq() -> sa.Column[int]:
    return sa.Column("seq", BIG, sa.Identity(always=True), primary_key=True)


def _text(name: str, default: str | None = None, **kw: Any) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False, server_default=default, **kw)


def _int(name: str, default: str | None = None) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=False, server_default=None if default is None else sa.text(default))


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "label_versions",
        _seq(),
        _text("version_id", unique=True),
        _text("case_id"),
        sa.Column("parent_version_id", sa.Text(), sa.ForeignKey("label_versions.version_id")),
        _text("label_map_digest"),
        sa.Column("label_map_size", BIG, nullable=False),
        _text("ct_digest"),
        sa.Column("ct_size", BIG, nullable=False),
        _text("source"),
        _text("model_version", ""),
        _text("job_id", ""),
        _text("reviewer", ""),
        sa.Column(
            "weights_trained",
            sa.Integer().with_variant(sa.Boolean(create_constraint=False), "postgresql"),
            nullable=False,
            server_default=sa.text("FALSE" if pg else "0"),
        ),
        _text("organs"),
        _text("shape"),
        _text("affine"),
        _text("request_id", unique=True),
        _text("request_fingerprint"),
        sa.Column("create_time", TIME, nullable=False),
        _text("organ_provenance", "{}"),
        sa.Column("review_seconds", SECONDS, nullable=False, server_default=sa.text("0")),
        _text("organ_review_seconds", "{}"),
        _text("organ_changed_ml", "{}"),
        sa.CheckConstraint("source IN ('ai', 'radiologist', 'original')"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "label_versions_one_root",
        "label_versions",
        ["case_id"],
        unique=True,
        sqlite_where=sa.text("parent_version_id IS NULL"),
        postgresql_where=sa.text("parent_version_id IS NULL"),
    )
    op.create_index(
        "label_versions_one_child",
        "label_versions",
        ["parent_version_id"],
        unique=True,
        sqlite_where=sa.text("parent_version_id IS NOT NULL"),
        postgresql_where=sa.text("parent_version_id IS NOT NULL"),
    )
    op.create_index("label_versions_by_case", "label_versions", ["case_id", "seq"])
    op.create_table(
        "case_heads",
        sa.Column("case_id", sa.Text(), primary_key=True),
        sa.Column("head_version_id", sa.Text(), sa.ForeignKey("label_versions.version_id"), nullable=False),
        _int("version_count"),
    )
    op.create_table(
        "export_jobs",
        sa.Column("job_id", sa.Text(), primary_key=True),
        _text("state"),
        _text("destination_uri"),
        _text("case_ids"),
        _text("versions"),
        _int("cases_done", "0"),
        _int("cases_total"),
        _text("error_reason", ""),
        sa.Column("request_id", sa.Text(), unique=True),
        sa.Column("create_time", TIME, nullable=False),
        sa.Column("update_time", TIME, nullable=False),
        _text("options", "{}"),
        sa.CheckConstraint("state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')"),
    )
    op.create_index("export_jobs_by_state", "export_jobs", ["state", "create_time"])
    op.create_table(
        "audit_records",
        _seq(),
        _text("record_id", unique=True),
        sa.Column("time", TIME, nullable=False),
        _text("principal"),
        _text("method"),
        _text("case_id", ""),
        _text("version_ids", "[]"),
        _text("job_id", ""),
        _text("outcome"),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_records_by_case", "audit_records", ["case_id", "seq"])
    op.create_index("audit_records_by_principal", "audit_records", ["principal", "seq"])
    for statement in PG_TRIGGERS if pg else SQLITE_TRIGGERS:
        op.execute(statement)
    op.create_table(
        "version_events",
        _seq(),
        _text("version_id", unique=True),
        _text("case_id"),
        _int("version_number"),
        _text("traceparent", ""),
        _text("state", "pending"),
        _int("attempts", "0"),
        sa.Column("next_attempt_at", SECONDS, nullable=False, server_default=sa.text("0")),
        _text("last_error", ""),
        sa.ForeignKeyConstraint(["version_id"], ["label_versions.version_id"]),
        sa.CheckConstraint("state IN ('pending', 'done', 'dead')"),
        sqlite_autoincrement=True,
    )
    op.create_index("version_events_due", "version_events", ["state", "next_attempt_at", "seq"])
    op.create_table(
        "export_case_outcomes",
        sa.Column("job_id", sa.Text(), sa.ForeignKey("export_jobs.job_id"), nullable=False),
        _text("case_id"),
        _text("outcome"),
        sa.Column("time", TIME, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "case_id"),
    )


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    for table in ("export_case_outcomes", "version_events", "audit_records", "export_jobs", "case_heads"):
        op.drop_table(table)
    op.drop_table("label_versions")
    if pg:
        op.execute("DROP FUNCTION audit_records_append_only()")
