"""Schedules: where a run came from (source, its slot and rule), one run per slot (uq_runs_slot), and the state
every gateway shares per schedule (paused, how far its slots are dealt with, missed and skipped counts).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SCHEDULED = sa.text("scheduled_for IS NOT NULL")


def upgrade() -> None:
    """Three columns on runs (every existing run came from a caller: source 'api'), two indexes, one table."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="api"))
        batch.add_column(sa.Column("scheduled_for", sa.DateTime))
        batch.add_column(sa.Column("schedule", sa.JSON))
    op.create_index("uq_runs_slot", "runs", ["kind", "target", "scheduled_for"], unique=True,
                    sqlite_where=_SCHEDULED, postgresql_where=_SCHEDULED)
    op.create_index("ix_runs_source_created", "runs", ["source", "created_at", "id"])
    op.create_table(
        "schedules",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("target", sa.String(200), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("paused_at", sa.DateTime),
        sa.Column("paused_by", sa.String(200)),
        sa.Column("done_until", sa.DateTime, nullable=False),
        sa.Column("missed", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("last_skipped_for", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    """Drop them (scheduled runs stay, as runs of no particular source)."""
    op.drop_table("schedules")
    op.drop_index("ix_runs_source_created", table_name="runs")
    op.drop_index("uq_runs_slot", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("schedule")
        batch.drop_column("scheduled_for")
        batch.drop_column("source")
