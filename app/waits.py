"""Requests that hold one of gunicorn's request threads for long, counted per process so that /health and ordinary
calls always find a thread:

* waiting callers (`wait`, `Prefer: wait`): at most FLOWGATE_MAX_CONCURRENT_WAITS wait at once; the rest are
  answered at once (202, no Preference-Applied);
* work done inside the request (execute-node, preview): at most FLOWGATE_MAX_CONCURRENT_INLINE at once; the rest
  are a 429 with Retry-After, as they cannot be answered without doing the work.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app

from app.errors import TooManyRequests
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


def init_app(app: Flask, limit: int, inline_limit: int) -> None:
    """One WaitSlots for waits and one for inline work per app (that is, per gunicorn worker process)."""
    app.extensions["flowgate_waits"] = WaitSlots(limit)
    app.extensions["flowgate_inline"] = WaitSlots(inline_limit)


@contextmanager
def inline_slot(what: str) -> Iterator[None]:
    """Hold one of this process's inline-work slots while `what` runs in the request; a 429 when none is free."""
    slots: WaitSlots = current_app.extensions["flowgate_inline"]
    if not slots.try_take():
        raise TooManyRequests(f"{what} runs inside the request, and this gateway process already runs "
                              f"{slots.limit} such calls (FLOWGATE_MAX_CONCURRENT_INLINE); retry shortly",
                              code="inline_slots_full", headers={"Retry-After": "2"})
    try:
        yield
    finally:
        slots.give_back()


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
