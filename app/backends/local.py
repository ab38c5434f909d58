"""The local backend: runs wait in the run store until an executor of any gateway process claims them."""
from __future__ import annotations

from typing import Any

from app.backends import LogPage
from app.backends.executor import LocalExecutor
from app.runs.models import Run
from app.runs.store import RunStore


class LocalBackend:
    """Runs in this gateway's executors (app/backends/executor.py); the store is the whole truth about them."""

    name = "local"

    def __init__(self, store: RunStore, executor: LocalExecutor):
        self.store = store
        self.executor = executor

    def submit(self, run: Run, deployment_id: str | None = None) -> Run:
        """The run is already queued in the store: wake this process's executor to claim it now."""
        self.executor.wake(run.kind, scheduled=run.scheduled_for is not None)
        return run

    def refresh(self, run: Run) -> Run:
        """Executors write every change to the store as it happens: nothing to fetch."""
        return run

    def cancel(self, run: Run) -> Run | None:
        """A queued run ends at once; a running one turns `cancelling` and its executor stops it."""
        return self.store.cancel(run.id)

    def logs(self, run: Run, after: int, limit: int) -> LogPage:
        """The lines the run's threads logged, kept in the store."""
        lines = self.store.logs.read(run.id, after=after, limit=limit)
        return LogPage("flowgate", [{k: v for k, v in line.items() if k != "id"} for line in lines],
                       lines[-1]["id"] if len(lines) == limit else None)

    def live_nodes(self, run: Run, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The executor writes node states to the store as they change."""
        return nodes
