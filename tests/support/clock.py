"""A wall clock the test moves by hand, for what takes its time from a `clock()` (the scheduler)."""
from __future__ import annotations

from datetime import datetime, timedelta


class Clock:
    """The scheduler's clock, moved by the test."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)
