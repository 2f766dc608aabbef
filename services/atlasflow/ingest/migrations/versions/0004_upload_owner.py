"""Upload owner: the replica holding a resumable upload's partial bytes.

A resumable upload's committed bytes are a file in the data directory of the replica that
received them (`atlasflow.ingest.uploads`); the row, shared in the database, now names that
replica (``owner_replica``, the id of its data directory:
`atlasflow.ingest.uploads.volume_replica_id`), so that a chunk that
reaches another replica is refused with UPLOAD_ON_OTHER_REPLICA instead of being written after a
hole. '' (rows of older versions): any replica (the behaviour before).

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("uploads", sa.Column("owner_replica", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("owner_replica")
