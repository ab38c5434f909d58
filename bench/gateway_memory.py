"""Benchmark: the gateway's memory at rest, with `make run`'s settings (the repo's connectors and workflows) and
`--workers` workers (3 by default): RSS and PSS (/proc/<pid>/smaps_rollup) of every process of gunicorn's tree,
summed by kind (master, workers, forkservers, resource trackers), once the total has settled after startup (the
forkservers' imports done). PSS counts a page shared by n processes as 1/n in each: the tree's PSS is what the
gateway costs the machine, its RSS counts shared pages once per process.

    .venv/bin/python -m bench.gateway_memory [--workers 3] [--compare DIR]

`--compare DIR` measures another checkout of flowgate (e.g. `git archive <commit> | tar -x -C DIR`) too, with
the same settings, one after the other.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.support.gunicorn_server import ROOT, GunicornServer


def children(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kind(pid: int, master: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    if pid == master:
        return "master"
    if "multiprocessing.forkserver" in cmdline:
        return "forkserver"
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource tracker"
    if "gunicorn" in cmdline:
        return "worker"
    return cmdline[:60]


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


def tree(master: int) -> dict[str, list[tuple[int, int, int]]]:
    """Each kind of process: (pid, RSS kB, PSS kB) of each."""
    kinds: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for pid in [master, *children(master)]:
        try:
            kinds[kind(pid, master)].append((pid, *memory(pid)))
        except (OSError, KeyError):
            continue  # ended meanwhile
    return kinds


def settled(master: int, timeout: float = 90) -> dict[str, list[tuple[int, int, int]]]:
    """The tree once its total PSS has changed by less than 1% over 3 s (or after `timeout`)."""
    totals: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        kinds = tree(master)
        totals.append(sum(p for procs in kinds.values() for _, _, p in procs))
        if len(totals) >= 4 and max(totals[-4:]) - min(totals[-4:]) < 0.01 * totals[-1] or time.monotonic() > deadline:
            return kinds
        time.sleep(1)


def measure(root: Path, workers: int, label: str) -> None:
    with tempfile.TemporaryDirectory(prefix="flowgate-memory-") as workdir:
        server = GunicornServer(Path(workdir), workers=workers, root=root,
                                FLOWGATE_CONNECTORS=str(root / "connectors.yaml"),
                                FLOWGATE_WORKFLOWS=str(root / "workflows")).start()
        try:
            kinds = settled(server.process.pid)
        finally:
            server.kill()
    print(f"\n{label} ({root}), {workers} workers, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'process':18} {'count':>5} {'RSS MB':>9} {'PSS MB':>9}   RSS MB each")
    for name, procs in sorted(kinds.items()):
        each = ", ".join(f"{r / 1024:.0f}" for _, r, _ in procs)
        print(f"  {name:18} {len(procs):5d} {sum(r for _, r, _ in procs) / 1024:9.1f} "
              f"{sum(p for _, _, p in procs) / 1024:9.1f}   {each}")
    rss = sum(r for procs in kinds.values() for _, r, _ in procs)
    pss = sum(p for procs in kinds.values() for _, _, p in procs)
    print(f"  {'total':18} {sum(len(p) for p in kinds.values()):5d} {rss / 1024:9.1f} {pss / 1024:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--compare", metavar="DIR", help="another checkout to measure too")
    args = parser.parse_args()
    if args.compare:
        measure(Path(args.compare).resolve(), args.workers, "compared")
    measure(ROOT, args.workers, "this checkout")


if __name__ == "__main__":
    main()
