"""Organ decisions: what a human decided about an organ the attention scored, for the
`learned` strategy (`atlasflow.ranking.learned`).

One row per (case, organ, label version) a radiologist revised or accepted: the ml the revision
changed (0 = accepted as it was) and the organ's features (JSON object, from the case's
attention when the decision was recorded).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "organ_decisions",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("case_id", ID, nullable=False),
        sa.Column("organ", sa.Integer(), nullable=False),
        sa.Column("label_version_id", ID, nullable=False),
        sa.Column("changed_ml", sa.Double(), nullable=False),
        sa.Column("features", sa.Text(), nullable=False),
        sa.Column("reviewer", sa.Text(), nullable=False, server_default=""),
        sa.Column("record_time", sa.Text(), nullable=False),
        sa.UniqueConstraint("case_id", "organ", "label_version_id", name="organ_decisions_once"),
    )
