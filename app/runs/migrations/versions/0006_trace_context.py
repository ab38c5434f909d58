"""runs.trace_id and runs.trace_context: the W3C trace a run belongs to, so every process that works on it (an
executor, a connector's child process, a Prefect flow run, the callback sender) continues the caller's trace.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Two nullable columns: runs stored before them belong to no trace."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("trace_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("trace_context", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trace_context")
        batch.drop_column("trace_id")
