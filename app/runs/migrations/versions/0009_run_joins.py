"""The joins made under an Idempotency-Key, so a retried join finds its run by the key and is counted once. No
join before this kept its key: the table starts empty.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create run_joins and its index by run (pruned with their run)."""
    op.create_table(
        "run_joins",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("target", sa.String(200), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_run_joins_run", "run_joins", ["run_id"])


def downgrade() -> None:
    """Drop it."""
    op.drop_index("ix_run_joins_run", table_name="run_joins")
    op.drop_table("run_joins")
