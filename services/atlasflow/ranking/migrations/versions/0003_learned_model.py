"""The learned model every replica scores with: which organ decisions it was fitted on and its
generation, and per case the generation its organs were scored with
(`atlasflow.ranking.learned`).

``learned_model`` has one row (id 1): ``fitted_seq`` (the model in force was fitted on the
organ decisions with ``seq <= fitted_seq``, in ``seq`` order), ``generation`` (bumped whenever
scores may change: a fitted model replaces another, or the first one is published) and
``fitted``. ``worklist.scored_generation``: the generation of the model the case's organs were
last scored with (a case below the current generation is rescored by whichever replica refits
or starts next).

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
    table = op.create_table(
        "learned_model",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("fitted_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("fitted", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("update_time", sa.Text(), nullable=False, server_default=""),
        sa.CheckConstraint("id = 1", name="learned_model_one_row"),
    )
    op.bulk_insert(table, [{"id": 1, "fitted_seq": 0, "generation": 0, "fitted": 0, "update_time": ""}])
    op.add_column("worklist", sa.Column("scored_generation", sa.BigInteger(), nullable=False, server_default="0"))
