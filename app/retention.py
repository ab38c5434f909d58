"""Pruner: one thread per gateway process that deletes aged-out runs now and then (one process at a time)."""
from __future__ import annotations

import logging
import random
import threading
from datetime import timedelta

from app.runs.models import utcnow
from app.runs.store import RunStore

log = logging.getLogger(__name__)


class Pruner:
    """Every `interval_seconds` (with jitter, so processes started together spread out), ended runs older than
    `retention_days` are deleted in batches; a process that finds another pruning skips its turn."""

    def __init__(self, store: RunStore, retention_days: float, interval_seconds: float, batch_size: int = 500):
        self.store = store
        self.retention_days = retention_days
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start pruning (after gunicorn forks); does nothing when runs are kept forever (retention 0)."""
        if self._thread is not None or not self.retention_days:
            return
        self._thread = threading.Thread(target=self._loop, name="flowgate-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop at its next wake-up."""
        self._stop.set()

    @property
    def alive(self) -> bool | None:
        """Whether the pruning thread runs (None: not started here)."""
        return self._thread.is_alive() if self._thread is not None else None

    def prune_once(self) -> int | None:
        """One pass: how many runs were deleted, None when another process was pruning."""
        pruned = self.store.retention.prune(utcnow() - timedelta(days=self.retention_days), self.batch_size)
        if pruned:
            log.info("pruned %d run(s) that ended over %g days ago", pruned, self.retention_days)
        return pruned

    def _loop(self) -> None:
        # The first pass soon after start (a store that grew while no gateway ran is trimmed), then periodically.
        delay = random.uniform(0.05, 0.2) * self.interval_seconds
        while not self._stop.wait(delay):
            try:
                self.prune_once()
            except Exception:  # a database hiccup must not end the loop; the next pass does the work
                log.exception("pruning old runs failed")
            delay = self.interval_seconds * random.uniform(0.8, 1.2)
