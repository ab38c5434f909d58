"""The chaos test's connector source: every execution writes `start`, `tick` and `end` lines to a shared file, so the
test can tell which trigger's token ran, in which process, when, whether it ran to its end, and whether two
executions of one connector ever overlapped, whichever gateway process or Prefect worker ran it."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dlt

NO_TOKEN = "-"  # in the file, for an execution without a token (a scheduled run's: its params are the connector's)
TICK_SECONDS = 0.05  # an execution killed mid-way was alive until its last line, and at most this much longer


def _write(path: str, event: str, token: str, connector: str) -> None:
    line = f"{event} {token or NO_TOKEN} {connector} {os.getpid()} {time.time():.6f}\n".encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)  # one write of a short line with O_APPEND: lines never interleave
    finally:
        os.close(descriptor)


@dlt.resource(name="executions", write_disposition="append")
def recorded(token: str = "", connector: str = "", path: str = "", seconds: float = 0.3) -> Iterator[dict[str, Any]]:
    """One row with `token`, after `seconds` of ticking; `start` before, `end` after, lines in `path`."""
    _write(path, "start", token, connector)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(TICK_SECONDS)
        _write(path, "tick", token, connector)
    yield {"token": token, "pid": os.getpid()}
    _write(path, "end", token, connector)


@dataclass
class Execution:
    """One execution of the source, as its lines show it."""

    token: str
    connector: str
    pid: int
    started: float
    last_seen: float
    ended: bool


def read_executions(path: Path) -> list[Execution]:
    """Every execution recorded in `path`, in the order they started."""
    executions: dict[tuple[str, int], Execution] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        event, token, connector, pid, at = line.split()
        token = "" if token == NO_TOKEN else token
        key = (token, int(pid))
        if event == "start":
            executions[key] = Execution(token, connector, int(pid), float(at), float(at), False)
            continue
        execution = executions[key]
        execution.last_seen = max(execution.last_seen, float(at))
        execution.ended = execution.ended or event == "end"
    return sorted(executions.values(), key=lambda execution: execution.started)
