"""Workflow node states in the store: each node of a run as the engine (or Prefect's artifact) last reported it."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.runs.models import RunNode, utcnow
from flows.database import Database


class RunNodeStore:
    """Saves and reads a workflow run's nodes, in declaration order."""

    def __init__(self, database: Database):
        self.database = database

    def save(self, run_id: str, nodes: list[tuple[int, dict[str, Any]]]) -> None:
        """Record nodes' latest states, each given as (position, node document with `id` and `status`)."""

        def attempt() -> None:
            with self.database.session(write=True) as session:
                for position, data in nodes:
                    row = session.get(RunNode, (run_id, data["id"]))
                    if row is None:
                        session.add(RunNode(run_id=run_id, node_id=data["id"], position=position,
                                            status=data["status"], data=data, updated_at=utcnow()))
                    else:
                        row.status, row.data, row.updated_at = data["status"], data, utcnow()

        try:
            self.database.retry(attempt)
        except IntegrityError:  # another process inserted one first (a Prefect sync racing a GET): update it
            self.database.retry(attempt)

    def read(self, run_id: str) -> list[dict[str, Any]]:
        """A workflow run's nodes in declaration order."""
        with self.database.session() as session:
            return [row.data for row in session.scalars(
                select(RunNode).where(RunNode.run_id == run_id).order_by(RunNode.position))]
