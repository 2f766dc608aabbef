"""Assembly claims: the replica assembling a series version and until when its claim holds.

`IngestStore.begin_assembly` claims a quiet RECEIVING version (``claim_holder``, the replica's
id; ``claim_expire_at``, seconds since the epoch on the database's clock); the assembler renews
it while it works (heartbeat); a claim whose holder died expires and another replica takes the
version over (the killed attempt stays counted in ``assembly_attempts``).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("series_versions", sa.Column("claim_holder", sa.Text(), nullable=False, server_default=""))
    op.add_column("series_versions", sa.Column("claim_expire_at", sa.Double(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("series_versions") as batch:
        batch.drop_column("claim_expire_at")
        batch.drop_column("claim_holder")
