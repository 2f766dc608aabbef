"""Several replicas on one database: claims of the version-event outbox and leases of export jobs.

version_events gets ``claimed_by``, ``claim_expires_at`` and ``create_time`` (seconds since the
epoch: the outbox lag), the columns `atlasflow.common.outbox.SqlOutboxStore` claims rows with
(`add_outbox_claim_columns`); ``create_time`` of existing rows is their version's creation time.
export_jobs gets ``claimed_by`` and ``claim_expires_at``: the replica running a job and until
when (renewed by its heartbeat; another replica takes the job over once it expired), and
``claims``: how many times the job was taken.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from atlasflow.common.outbox import add_outbox_claim_columns

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    add_outbox_claim_columns(op, "version_events")
    epoch = "EXTRACT(EPOCH FROM v.create_time)" if pg else "CAST(strftime('%s', v.create_time) AS REAL)"
    op.execute(
        sa.text(
            f"UPDATE version_events SET create_time = COALESCE((SELECT {epoch} FROM label_versions v"
            " WHERE v.version_id = version_events.version_id), create_time)"
        )
    )
    op.add_column("export_jobs", sa.Column("claimed_by", sa.Text(), nullable=False, server_default=""))
    op.add_column("export_jobs", sa.Column("claim_expires_at", sa.Double(), nullable=False, server_default="0"))
    op.add_column("export_jobs", sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("export_jobs") as batch:
        for column in ("claims", "claim_expires_at", "claimed_by"):
            batch.drop_column(column)
    with op.batch_alter_table("version_events") as batch:
        for column in ("create_time", "claim_expires_at", "claimed_by"):
            batch.drop_column(column)
