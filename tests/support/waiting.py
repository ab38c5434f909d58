"""Waiting in tests: on a condition with a generous deadline, never for a fixed time; and for a run's end."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flows.outcome import TERMINAL

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60, what: str = "condition", every: float = 0.05,
               ignoring: tuple[type[Exception], ...] = ()) -> T:
    """Poll `condition` every `every` seconds until it returns something truthy (returned) or `timeout` seconds
    pass (AssertionError). An exception of a type in `ignoring` (a server not answering yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except ignoring:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s")
        time.sleep(every)


def wait_until_ended(client: Any, url: str, timeout: float = 60) -> dict:
    """GET `url`, a run's or a workflow execution's status URL, until its status is an ended one
    (flows.outcome.TERMINAL); the document, with the statuses seen on the way in "seen". `client` is a Flask test
    client or an httpx.Client. Every 50 ms at first, backing off to every half second: a Prefect run's GET reads
    its flow run from Prefect."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    interval = 0.05
    while time.monotonic() < deadline:
        doc = json.loads(client.get(url).text)
        if not seen or seen[-1] != doc["status"]:
            seen.append(doc["status"])
        if doc["status"] in TERMINAL:
            doc["seen"] = seen
            return doc
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)
    raise AssertionError(f"{url} did not end within {timeout:g} s; statuses seen: {seen}")


def wait_for_callback(client: Any, run_id: str, status: str, timeout: float = 60) -> dict:
    """The run's callback, as the run's document shows it, once its delivery status is `status`."""
    def callback() -> dict | None:
        found = json.loads(client.get(f"/api/v1/runs/{run_id}").text)["callback"]
        return found if found["status"] == status else None

    return wait_until(callback, timeout, f"the callback of {run_id} {status}")
