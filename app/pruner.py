"""Pruner: a loop in each gateway process that deletes aged-out runs now and then (one process at a time)."""
from __future__ import annotations

import logging
import random
from datetime import timedelta

from app.runs.models import utcnow
from app.runs.store import RunStore
from flows.loop import Loop

log = logging.getLogger(__name__)


class Pruner(Loop):
    """Every `interval_seconds` (with jitter, so processes started together spread out), ended runs older than
    `retention_days` are deleted in batches; a process that finds another pruning skips its turn."""

    def __init__(self, store: RunStore, retention_days: float, interval_seconds: float, batch_size: int = 500):
        super().__init__("pruner", every=interval_seconds)
        self.store = store
        self.retention_days = retention_days
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size

    @property
    def enabled(self) -> bool:
        """Runs kept forever (retention 0): nothing to prune."""
        return bool(self.retention_days)

    def first_delay(self) -> float:
        # Soon after start (a store that grew while no gateway ran is trimmed), not at once in every process.
        return random.uniform(0.05, 0.2) * self.interval_seconds

    def next_delay(self) -> float:
        return self.interval_seconds * random.uniform(0.8, 1.2)

    def run_once(self) -> None:
        self.prune_once()

    def prune_once(self) -> int | None:
        """One pass: how many runs were deleted, None when another process was pruning."""
        pruned = self.store.retention.prune(utcnow() - timedelta(days=self.retention_days), self.batch_size)
        if pruned:
            log.info("pruned %d run(s) that ended over %g days ago", pruned, self.retention_days)
        return pruned
