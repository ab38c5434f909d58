"""Waiting in tests: on a condition with a generous deadline, never for a fixed time."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60, what: str = "condition", every: float = 0.05) -> T:
    """Poll `condition` every `every` seconds until it returns something truthy (returned) or `timeout` seconds
    pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s")
        time.sleep(every)
