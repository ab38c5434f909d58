"""Benchmark: what running a connector in its own process costs, against the same run in the calling thread.

A trivial python-source connector (10 rows into DuckDB) runs --repeat times each way, interleaved: in-thread
(run_connector, the old local path) and isolated (run_connector_isolated: a child forked from a forkserver
preloaded with dlt). Printed: medians of the whole run, the time from the call until the child's first step
begins (what a trigger waits before its pipeline starts), and the ratio of the medians.

    .venv/bin/python -m bench.isolation_overhead [--repeat 15]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from connectors.isolated import run_connector_isolated, warm_up
from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry


class _FirstStep(logging.Handler):
    """Hears the child's first log line of a run (re-emitted in this process) to time its start."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="flowgate-isolation-"))
    (folder / "connectors.yaml").write_text("connectors:\n  tiny:\n    source: {kind: python, "
                                             "ref: 'connectors.demo:numbers', args: {n: 10}}\n")
    spec = ConnectorRegistry.load(folder / "connectors.yaml").get("tiny")
    workspace = Workspace(folder / "dlt", folder / "duckdb")
    started = time.perf_counter()
    warm_up()
    print(f"forkserver start (once per gateway process, at executor start): {time.perf_counter() - started:.2f} s")
    run_connector(spec, workspace)  # first-run costs (imports, schema) out of the measurement
    first_step = _FirstStep()
    logging.getLogger().addHandler(first_step)
    logging.getLogger().setLevel(logging.INFO)
    in_thread, isolated, to_start = [], [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        run_connector(spec, workspace)
        in_thread.append(time.perf_counter() - started)
        first_step.at = None
        started = time.perf_counter()
        run_connector_isolated(spec, workspace)
        isolated.append(time.perf_counter() - started)
        if first_step.at is not None:
            to_start.append(first_step.at - started)
    a, b = statistics.median(in_thread), statistics.median(isolated)
    print(f"whole run, median of {args.repeat}: in-thread {a * 1000:.0f} ms, isolated {b * 1000:.0f} ms "
          f"-> {b / a:.2f}x ({(b - a) * 1000:+.0f} ms per run)")
    if to_start:
        print(f"call -> the child's first log line: median {statistics.median(to_start) * 1000:.0f} ms, "
              f"max {max(to_start) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
