"""artifact storage: artifacts.stored_bytes and artifacts.recipe (model files kept as deltas), and
jobs.artifacts_expired_at (retention deleted the job's stored files)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("stored_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("recipe", sa.JSON(), nullable=True))
    op.execute("UPDATE artifacts SET stored_bytes = size")  # every existing artifact is a full copy
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("stored_bytes", nullable=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("artifacts_expired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("artifacts_expired_at")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("recipe")
        batch.drop_column("stored_bytes")
