"""A python connector source that fails its first runs, for the retry tests (locally and on a Prefect worker)."""
from __future__ import annotations

from pathlib import Path


def flaky(counter: str, fail_times: int, error: str = "refused"):
    """A source that fails its first `fail_times` runs (the count kept in a file: each run is a process of its
    own), with a refused connection (transient) or a ZeroDivisionError (a bug: terminal)."""
    import dlt

    @dlt.resource(name="numbers")
    def rows():
        path = Path(counter)
        runs = int(path.read_text()) if path.exists() else 0
        path.write_text(str(runs + 1))
        if runs < fail_times:
            if error == "zero":
                yield {"n": 1 / 0}
            raise ConnectionRefusedError(111, "Connection refused")
        yield {"n": runs}

    return rows
