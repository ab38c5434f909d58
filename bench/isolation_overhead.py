"""Benchmark: what running a connector in its own process costs, against the same run in the calling thread.

A trivial python-source connector (10 rows into DuckDB) runs --repeat times each way, interleaved: in-thread
(run_connector, the old local path) and isolated (run_connector_isolated: a child forked from a forkserver
preloaded with dlt). Printed: medians of the whole run, the time from the call until the child's first step
begins (what a trigger waits before its pipeline starts), and the ratio of the medians; of the in-thread run, its
CPU time (which the machine's other load distorts far less than wall time); of both, how long the run held the
DuckDB file locked, and in how many separate holds (what another process reading the file for /schema or a
preview is refused for: a prober process of its own asks the kernel, every millisecond, whether a lock is held).

`--compare DIR` runs this same benchmark from another checkout of flowgate (e.g. `git worktree add` or
`git archive <commit> | tar -x -C DIR`) and from this one, `--rounds` times each way, alternating, so the
machine's drift falls on both, and prints them side by side with the ratios. The load average is printed beside
each round: the machine may be shared.

    .venv/bin/python -m bench.isolation_overhead [--repeat 15]
    .venv/bin/python -m bench.isolation_overhead --compare /tmp/before --rounds 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A process of its own: the kernel tells a process of another's locks only (fcntl F_GETLK; DuckDB locks its file so).
PROBE = r"""
import fcntl, os, struct, sys, threading, time
path, state = sys.argv[1], {"held": 0.0, "holds": 0, "since": None}
lock = threading.Lock()
def locked(fd):
    asked = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(4)
    return struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, asked)[:28])[0] != fcntl.F_UNLCK
def poll():
    fd = os.open(path, os.O_RDONLY)
    while True:
        now, held = time.perf_counter(), locked(fd)
        with lock:
            if held and state["since"] is None:
                state["since"], state["holds"] = now, state["holds"] + 1
            elif not held and state["since"] is not None:
                state["held"] += now - state["since"]
                state["since"] = None
        time.sleep(0.0005)
threading.Thread(target=poll, daemon=True).start()
for line in sys.stdin:
    with lock:
        print(state["held"], state["holds"], flush=True)
        state["held"], state["holds"] = 0.0, 0
"""


class _FirstStep(logging.Handler):
    """Hears the child's first log line of a run (re-emitted in this process) to time its start."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None:
            self.at = time.perf_counter()


class _LockProbe:
    """The prober process: `take()` says how long the file was locked since the last take, and in how many holds."""

    def __init__(self, path: Path):
        self.process = subprocess.Popen([sys.executable, "-c", PROBE, str(path)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)
        self.take()

    def take(self) -> tuple[float, int]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        held, holds = self.process.stdout.readline().split()
        return float(held), int(holds)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def measure(repeat: int) -> dict[str, float]:
    """Medians of `repeat` interleaved in-thread and isolated runs of the trivial connector."""
    from connectors.isolated import run_connector_isolated, warm_up
    from connectors.pipeline import Workspace, duckdb_path, run_connector
    from connectors.registry import ConnectorRegistry

    folder = Path(tempfile.mkdtemp(prefix="flowgate-isolation-"))
    (folder / "connectors.yaml").write_text("connectors:\n  tiny:\n    source: {kind: python, "
                                             "ref: 'connectors.demo:numbers', args: {n: 10}}\n")
    spec = ConnectorRegistry.load(folder / "connectors.yaml").get("tiny")
    workspace = Workspace(folder / "dlt", folder / "duckdb")
    started = time.perf_counter()
    warm_up()
    forkserver = time.perf_counter() - started
    run_connector(spec, workspace)  # first-run costs (imports, schema) out of the measurement
    path = duckdb_path(spec, workspace)
    assert path is not None
    probe = _LockProbe(path)
    first_step = _FirstStep()
    logging.getLogger().addHandler(first_step)
    logging.getLogger().setLevel(logging.INFO)
    runs: dict[str, list[float]] = {name: [] for name in (
        "in_thread", "in_thread_cpu", "in_thread_locked", "in_thread_holds", "isolated", "to_first_step",
        "isolated_locked", "isolated_holds")}
    try:
        for _ in range(repeat):
            started, cpu = time.perf_counter(), time.process_time()
            run_connector(spec, workspace)
            runs["in_thread"].append(time.perf_counter() - started)
            runs["in_thread_cpu"].append(time.process_time() - cpu)
            time.sleep(0.005)  # the prober's last look
            held, holds = probe.take()
            runs["in_thread_locked"].append(held)
            runs["in_thread_holds"].append(holds)
            first_step.at = None
            started = time.perf_counter()
            run_connector_isolated(spec, workspace)
            runs["isolated"].append(time.perf_counter() - started)
            if first_step.at is not None:
                runs["to_first_step"].append(first_step.at - started)
            time.sleep(0.005)
            held, holds = probe.take()
            runs["isolated_locked"].append(held)
            runs["isolated_holds"].append(holds)
    finally:
        probe.stop()
        logging.getLogger().removeHandler(first_step)
    medians = {name: statistics.median(values) for name, values in runs.items() if values}
    return {**medians, "to_first_step_max": max(runs["to_first_step"], default=0.0), "forkserver": forkserver,
            "repeat": repeat, "load_average": os.getloadavg()[0]}


def print_one(result: dict[str, float]) -> None:
    a, b = result["in_thread"], result["isolated"]
    print(f"forkserver start (once per gateway process, at executor start): {result['forkserver']:.2f} s")
    print(f"whole run, median of {result['repeat']}: in-thread {a * 1000:.0f} ms, isolated {b * 1000:.0f} ms "
          f"-> {b / a:.2f}x ({(b - a) * 1000:+.0f} ms per run)")
    print(f"in-thread run's CPU: median {result['in_thread_cpu'] * 1000:.0f} ms")
    print(f"DuckDB file locked per run: in-thread {result['in_thread_locked'] * 1000:.0f} ms in "
          f"{result['in_thread_holds']:.0f} hold(s), isolated {result['isolated_locked'] * 1000:.0f} ms in "
          f"{result['isolated_holds']:.0f} hold(s)")
    if "to_first_step" in result:
        print(f"call -> the child's first log line: median {result['to_first_step'] * 1000:.0f} ms, "
              f"max {result['to_first_step_max'] * 1000:.0f} ms")
    print(f"load average (1 min) at the end: {result['load_average']:.1f}")


ROWS = [("in-thread run, wall", "in_thread", 1000, "ms"), ("in-thread run, CPU", "in_thread_cpu", 1000, "ms"),
        ("isolated run, wall", "isolated", 1000, "ms"), ("call -> child's first step", "to_first_step", 1000, "ms"),
        ("DuckDB file locked, in-thread run", "in_thread_locked", 1000, "ms"),
        ("separate holds of it, in-thread run", "in_thread_holds", 1, ""),
        ("DuckDB file locked, isolated run", "isolated_locked", 1000, "ms"),
        ("separate holds of it, isolated run", "isolated_holds", 1, "")]


def compare(other: Path, repeat: int, rounds: int) -> None:
    """This checkout against `other`, `rounds` times each way, alternating; medians of the rounds' medians."""
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_ in range(rounds):
        for root, label in ((other, "before"), (ROOT, "after")):
            # This file run as a script on the other checkout's code (its own bench may not have --json)
            done = subprocess.run([sys.executable, __file__, "--repeat", str(repeat), "--json"], cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                                  check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[label].append(result)
            print(f"round {round_ + 1}, {label}: in-thread {result['in_thread'] * 1000:.0f} ms (CPU "
                  f"{result['in_thread_cpu'] * 1000:.0f} ms), isolated {result['isolated'] * 1000:.0f} ms, load "
                  f"average {result['load_average']:.1f}", flush=True)
    print(f"\n{rounds} round(s) each way, alternating, {repeat} runs each way per round; before = {other}, "
          f"after = {ROOT}; medians of the rounds' medians\n")
    print(f"{'':38} {'before':>10} {'after':>10} {'after/before':>13}")
    for title, key, scale, unit in ROWS:
        before = statistics.median(r[key] for r in results["before"] if key in r)
        after = statistics.median(r[key] for r in results["after"] if key in r)
        print(f"{title:38} {before * scale:8.0f}{unit:2} {after * scale:8.0f}{unit:2} "
              f"{after / before if before else float('nan'):12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--compare", metavar="DIR", help="another checkout of flowgate to run beside this one")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: rounds each way")
    parser.add_argument("--json", action="store_true", help="print the medians as one JSON line")
    args = parser.parse_args()
    if args.compare:
        compare(Path(args.compare).resolve(), args.repeat, args.rounds)
        return
    result = measure(args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        print_one(result)


if __name__ == "__main__":
    main()
