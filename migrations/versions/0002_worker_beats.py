"""worker heartbeats

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 06:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_beats",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("queues", sa.String(length=1000), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_worker_beats")),
    )
    op.create_index(op.f("ix_worker_beats_heartbeat_at"), "worker_beats", ["heartbeat_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_worker_beats_heartbeat_at"), table_name="worker_beats")
    op.drop_table("worker_beats")
