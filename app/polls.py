"""Poll hints: the Retry-After a run not ended is answered with, from its target's recent durations, so callers poll
about when the end is due instead of at a guessed rate."""
from __future__ import annotations

import math
import statistics
import threading
import time
from datetime import datetime

from flask import Flask, Response, current_app

from app.runs.models import Run, utcnow
from app.runs.store import RunStore

MIN_SECONDS, MAX_SECONDS = 1, 30
DEFAULT_SECONDS = 2  # a target with no ended run yet
CACHE_SECONDS = 10.0  # a target's typical duration is read once per this long per process (pollers ask often)


class PollHints:
    """Seconds until a run is worth asking about again: its target's median duration of the last runs, less what
    the run has run so far (plus a retry's wait), within 1-30 s."""

    def __init__(self, store: RunStore):
        self.store = store
        self._typical: dict[tuple[str, str], tuple[float, float | None]] = {}
        self._lock = threading.Lock()

    def seconds(self, run: Run) -> int | None:
        """The Retry-After for `run`; None once it has ended."""
        if run.is_terminal:
            return None
        typical = self.typical(run.kind, run.target)
        now = utcnow()
        remaining: float
        if typical is None:
            remaining = DEFAULT_SECONDS
        elif run.started_at is not None:
            remaining = typical - (now - run.started_at).total_seconds()
        else:
            remaining = typical + _until(run.next_attempt_at, now)
        return min(max(math.ceil(remaining), MIN_SECONDS), MAX_SECONDS)

    def typical(self, kind: str, target: str) -> float | None:
        """The median duration of the target's last ended runs (cached per process)."""
        key, now = (kind, target), time.monotonic()
        with self._lock:
            cached = self._typical.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        durations = self.store.recent_durations(kind, target)
        typical = statistics.median(durations) if durations else None
        with self._lock:
            if len(self._typical) > 10_000:  # targets are bounded by configuration, inline workflows are not
                self._typical.clear()
            self._typical[key] = (now, typical)
        return typical


def _until(moment: datetime | None, now: datetime) -> float:
    return max((moment - now).total_seconds(), 0.0) if moment else 0.0


def with_hint(response: Response, run: Run) -> Response:
    """`response` with Retry-After when `run` has not ended."""
    seconds = current_app.extensions["flowgate_polls"].seconds(run)
    if seconds is not None:
        response.headers["Retry-After"] = str(seconds)
    return response


def init_app(app: Flask) -> None:
    """One PollHints per app (per gunicorn worker process)."""
    app.extensions["flowgate_polls"] = PollHints(app.extensions["flowgate"].store)
