"""The run model: a run's retry policy, its attempt number, the attempts it ended before this one and when the next
may start; the run it reruns (`rerun_of`), who started it (`triggered_by`) and its labels, also in run_labels,
whose index pages one label's runs newest first.

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
        batch.add_column(sa.Column("triggered_by", sa.String(100)))
        batch.add_column(sa.Column("labels", sa.JSON))
    op.create_table(
        "run_labels",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_run_labels_key_value_created", "run_labels", ["key", "value", "created_at", "run_id"])


def downgrade() -> None:
    """Drop them."""
    op.drop_table("run_labels")
    with op.batch_alter_table("runs") as batch:
        for column in ("labels", "triggered_by", "rerun_of", "next_attempt_at", "attempt_log", "attempt",
                       "retry_policy"):
            batch.drop_column(column)
