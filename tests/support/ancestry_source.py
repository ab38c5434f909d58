"""A connector source for tests/test_launcher.py: writes the process ids from its own up to the first process, so
the test can tell which process started the flow run (the launcher's fork, or the process worker's launch script
turned `python -m prefect.engine`), and whether its process has Prefect imported; then yields its rows after
`seconds`."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dlt


def ancestry(pid: int) -> list[int]:
    """`pid`, its parent, and so on up to the first process."""
    chain = [pid]
    while chain[-1] > 1:
        stat = Path(f"/proc/{chain[-1]}/stat").read_text()
        chain.append(int(stat.rsplit(")", 1)[1].split()[1]))  # the field after the state: the parent's pid
    return chain


@dlt.resource(name="ancestry", write_disposition="append")
def recorded_ancestry(path: str = "", seconds: float = 0.0, rows: int = 3) -> Iterator[dict[str, Any]]:
    """`rows` rows, after writing this process's ancestry and whether it imported Prefect to `path` (JSON) and
    waiting `seconds`."""
    Path(path).write_text(json.dumps({"pids": ancestry(os.getpid()), "prefect": "prefect" in sys.modules}))
    time.sleep(seconds)
    yield from ({"n": n} for n in range(rows))
