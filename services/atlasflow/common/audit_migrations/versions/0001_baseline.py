"""Baseline: the append-only, hash-chained ``audit_log`` as the hand-written code made it
(`atlasflow.common.audit_migrations.LEGACY_SQLITE_MIGRATIONS` / ``LEGACY_PG_SCHEMA``).

``seq`` is ``INTEGER PRIMARY KEY AUTOINCREMENT`` on SQLite (never reused, even after the last
row went) and ``BIGSERIAL`` on PostgreSQL; times are UTC ISO 8601 text with microseconds and
"Z" (sorts as text on both); roles are comma-joined, targets JSON text. UPDATE and DELETE raise
(SQLite: two ``RAISE(ABORT)`` triggers; PostgreSQL: one row trigger and a TRUNCATE trigger on
the function ``audit_log_append_only``).

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_REFUSE = "audit records are append-only"


def _text(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.Text(), nullable=False, unique=True),
        *(_text(c) for c in ("time", "service", "action", "method", "principal", "roles", "peer")),
        *(_text(c) for c in ("client_identity", "targets", "outcome", "reason", "cause")),
        sa.Column("suppressed", sa.Integer(), nullable=False),
        _text("prev_hash"),
        _text("hash"),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_log_by_time", "audit_log", ["time"])
    op.create_index("audit_log_by_principal", "audit_log", ["principal", "seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n    RAISE EXCEPTION '{_REFUSE}';\nEND;\n$$"
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log"
            " FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )
    else:
        for verb in ("update", "delete"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{verb} BEFORE {verb.upper()} ON audit_log"
                f" BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END"
            )


def downgrade() -> None:
    op.drop_table("audit_log")  # its triggers go with it
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
