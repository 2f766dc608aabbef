"""Claim leases, so several segmentation replicas share one database without double work.

jobs: ``lease_holder`` (the replica running a RUNNING job), ``lease_expires_at`` (after it
another replica may take the job over), ``heartbeat_at`` (the holder's last sign of life); a job
left RUNNING by code before this revision has an expired lease (0) and is taken over at once.
outbox: ``claimed_by``, ``claim_expires_at``, ``create_time`` (`atlasflow.common.outbox`).
An index of the jobs by case (PurgeStudy, re-inference look-ups).

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
    op.add_column("jobs", sa.Column("lease_holder", sa.Text(), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("lease_expires_at", sa.Double(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("heartbeat_at", sa.Double(), nullable=False, server_default="0"))
    op.create_index("jobs_by_case", "jobs", ["case_id", "create_time"])
    add_outbox_claim_columns(op)
