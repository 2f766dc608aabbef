"""Outbox claims: several replicas' dispatchers deliver the outbox (`atlasflow.common.outbox.SqlOutboxStore`).

Adds ``claimed_by``, ``claim_expires_at`` and ``create_time`` (the outbox lag) to the legacy
outbox table of the baseline (`atlasflow.common.outbox.add_outbox_claim_columns`).

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

from atlasflow.common.outbox import add_outbox_claim_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_claim_columns(op)


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        for column in ("create_time", "claim_expires_at", "claimed_by"):
            batch.drop_column(column)
