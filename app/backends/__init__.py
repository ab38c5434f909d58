"""Where runs execute: one Backend interface, two implementations (local executor, Prefect).

The dispatcher (app/dispatch.py) chooses a backend for each new run and records why; after that every
question about a run (its latest state, cancelling it, its log lines, its live nodes) goes to its backend,
so no view needs to know which path a run took.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.runs.models import Run


@dataclass(frozen=True)
class LogPage:
    """A page of a run's log lines, oldest first; `next_after` is the cursor of the next page (None: no more)."""

    source: str  # "flowgate" (kept in the run store) or "prefect" (read from Prefect's logs API)
    items: list[dict[str, Any]]
    next_after: int | None


class Backend(Protocol):
    """What the gateway asks of the path a run took."""

    name: str

    def submit(self, run: Run, deployment_id: str | None = None) -> Run:
        """Start a stored, queued run on this backend (Prefect: from `deployment_id`); returns it as now recorded."""

    def refresh(self, run: Run) -> Run:
        """The run with its state brought up to date from where it executes."""

    def cancel(self, run: Run) -> Run | None:
        """Cancel: a queued run at once, a running one as soon as its executor can stop it."""

    def logs(self, run: Run, after: int, limit: int) -> LogPage:
        """The run's log lines after the cursor `after`, at most `limit`."""

    def live_nodes(self, run: Run, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A workflow run's nodes as they are right now (`nodes`: as the store has them)."""
