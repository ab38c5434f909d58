"""connector_locks: the key a Prefect flow run holds while it runs a connector (flows/connector_lock.py), so a
local run of the same connector never starts beside it, nor it beside a local run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table unless a Prefect flow run created it first (it creates it on a database it finds bare)."""
    if not sa.inspect(op.get_bind()).has_table("connector_locks"):
        op.create_table(
            "connector_locks",
            sa.Column("key", sa.String(512), primary_key=True),
            sa.Column("holder", sa.String(200), nullable=False),
            sa.Column("expires_at", sa.DateTime(), nullable=False),
        )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("connector_locks")
