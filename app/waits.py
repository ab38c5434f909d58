"""Waiting callers (`wait`, `Prefer: wait`): each holds one of gunicorn's request threads while it waits, so a
process lets at most FLOWGATE_MAX_CONCURRENT_WAITS of them wait at once; the rest are answered at once (202,
no Preference-Applied), and /health and ordinary calls always find a thread."""
from __future__ import annotations

import threading

from flask import Flask, current_app

from app.runs.models import Run


class WaitSlots:
    """A non-blocking count of the requests waiting in this process."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None

    def try_take(self) -> bool:
        return self._slots is not None and self._slots.acquire(blocking=False)

    def give_back(self) -> None:
        if self._slots is not None:
            self._slots.release()


def init_app(app: Flask, limit: int) -> None:
    """One WaitSlots per app (that is, per gunicorn worker process)."""
    app.extensions["flowgate_waits"] = WaitSlots(limit)


def wait_for_end(run: Run, seconds: float, applied: str | None) -> tuple[Run, str | None]:
    """The run after waiting up to `seconds` for its end, and the Preference-Applied value to answer with;
    without a free wait slot the run as it is now, and no Preference-Applied (the wait was not honoured)."""
    if not seconds or run.is_terminal:
        return run, applied
    slots: WaitSlots = current_app.extensions["flowgate_waits"]
    if not slots.try_take():
        return run, None
    try:
        return current_app.extensions["flowgate"].dispatcher.wait_for_end(run.id, seconds), applied
    finally:
        slots.give_back()
