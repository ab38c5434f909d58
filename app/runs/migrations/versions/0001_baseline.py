"""Baseline: the schema create_all made before migrations (runs, callbacks, nodes, log lines, executors, node cache).

Creates only what is missing, so a database made by that create_all (or one where a Prefect flow made the node
cache first) is adopted as it is, and an empty one gets everything.

Revision ID: 0001
Revises:
Create Date: 2025-06-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ACTIVE = sa.text("status IN ('running', 'cancelling') AND backend = 'local'")


def baseline_metadata() -> sa.MetaData:
    """The tables and indexes as they were, frozen here: later model changes belong in later revisions."""
    metadata = sa.MetaData()
    sa.Table(
        "runs", metadata,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(200), nullable=False, index=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("fallback_reason", sa.Text),
        sa.Column("prefect_flow_run_id", sa.String(64)),
        sa.Column("prefect_state", sa.String(32)),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("concurrency_key", sa.String(512), nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Index("ix_runs_created", "created_at", "id"),
        sa.Index("ix_runs_queue", "status", "backend", "created_at"),
        sa.Index("ix_runs_target_status", "target", "kind", "status"),
        sa.Index("uq_runs_idempotency", "kind", "target", "idempotency_key", unique=True),
        sa.Index("uq_runs_one_active_per_key", "concurrency_key", unique=True,
                 sqlite_where=_ACTIVE, postgresql_where=_ACTIVE),
    )
    sa.Table(
        "executors", metadata,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("busy", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "run_nodes", metadata,
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(100), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "run_callbacks", metadata,
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.JSON, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("claimed_until", sa.DateTime),
    )
    sa.Table(
        "run_logs", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("logger", sa.String(200), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    sa.Table(
        "node_cache", metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("node_type", sa.String(50), nullable=False),
        sa.Column("output", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
    )
    return metadata


def upgrade() -> None:
    """Create the baseline tables and indexes that do not exist yet."""
    bind = op.get_bind()
    metadata = baseline_metadata()
    metadata.create_all(bind, checkfirst=True)
    for table in metadata.sorted_tables:  # a table made by an older create_all may miss a later index
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    """Drop every table of the run store (its history with them)."""
    baseline_metadata().drop_all(op.get_bind(), checkfirst=True)
