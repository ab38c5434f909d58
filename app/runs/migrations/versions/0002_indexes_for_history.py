"""Indexes that keep a store with years of history fast: pruning by end time, a target's or a status's runs newest
first, a target's last ended run; the queue's index ends with the id, so the claim's ORDER BY created_at, id is
read from it; the single-column target and status indexes were prefixes of others.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-02
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the history indexes; drop the two that others cover."""
    op.create_index("ix_runs_finished", "runs", ["finished_at"])
    op.create_index("ix_runs_target_created", "runs", ["target", "created_at", "id"])
    op.create_index("ix_runs_status_created", "runs", ["status", "created_at", "id"])
    op.create_index("ix_runs_target_finished", "runs", ["target", "kind", "finished_at"])
    op.drop_index("ix_runs_queue", table_name="runs")
    op.create_index("ix_runs_queue", "runs", ["status", "backend", "created_at", "id"])
    op.drop_index("ix_runs_target", table_name="runs")  # ix_runs_target_status starts with target
    op.drop_index("ix_runs_status", table_name="runs")  # ix_runs_queue starts with status


def downgrade() -> None:
    """Back to the baseline's indexes."""
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_target", "runs", ["target"])
    op.drop_index("ix_runs_queue", table_name="runs")
    op.create_index("ix_runs_queue", "runs", ["status", "backend", "created_at"])
    for name in ("ix_runs_target_finished", "ix_runs_status_created", "ix_runs_target_created", "ix_runs_finished"):
        op.drop_index(name, table_name="runs")
