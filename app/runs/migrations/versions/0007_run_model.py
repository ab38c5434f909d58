"""The run model: a run's retry policy, its attempt number, the attempts it ended before this one and when the next
may start; the run it reruns (`rerun_of`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns; every run kept is at its first attempt, with no policy (no retry), as before."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("retry_policy", sa.JSON))
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("attempt_log", sa.JSON))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime))
        batch.add_column(sa.Column("rerun_of", sa.String(32)))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("runs") as batch:
        for column in ("rerun_of", "next_attempt_at", "attempt_log", "attempt", "retry_policy"):
            batch.drop_column(column)
