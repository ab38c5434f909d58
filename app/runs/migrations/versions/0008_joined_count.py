"""How many triggers joined a run through their conflict policy (`join`, or `queue_one` finding it queued): every
run kept was joined by none, as far as anyone knows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column, 0 for every run kept."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("joined_count", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("joined_count")
