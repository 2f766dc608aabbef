"""The served ensemble version, shared by every replica of one database.

``served_version``: at most one row (``slot`` = 1): the ensemble version the last
ActivateEnsembleVersion made the default (``version``), the SHA-256 of its ``model_card.json``
as the activating replica verified it (``card_digest``; a follower refuses a copy whose card
differs), when (``activated_at``, seconds since the epoch), by whom (``activated_by``: the
caller's identity, e.g. ``svc:training``) and on which replica (``replica``). Every replica
follows it (`atlasflow.segmentation.activation.ServedVersionFollower`); no row = no activation
yet (each replica serves its configured ensemble, or ``versions/CURRENT``).

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_version",
        sa.Column("slot", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("card_digest", sa.Text(), nullable=False),
        sa.Column("activated_at", sa.Double(), nullable=False),
        sa.Column("activated_by", sa.Text(), nullable=False, server_default=""),
        sa.Column("replica", sa.Text(), nullable=False, server_default=""),
        sa.CheckConstraint("slot = 1", name="served_version_one_row"),
    )
