"""Benchmark: flowgate on gunicorn vs the original single-threaded http.server, same pipeline, same load.

16 clients trigger a python connector that sleeps 0.5 s (then loads its rows into DuckDB with dlt) for
10 s while one prober, a process of its own (as a liveness probe is), calls /health. Prints triggers accepted per
second, trigger and health latency p50/p99 for both servers, the gateway's CPU per accepted trigger (its whole
process tree: workers, forkservers, pipelines), and flowgate's ratios against the baseline measured in this run.
flowgate runs with its run store on SQLite, on PostgreSQL when one answers, and once more only accepting (no
executor in the gateway: its runs queue for executors elsewhere), which shows the trigger path's own ceiling on
this machine. The load average is printed beside each figure: the machine may be shared.

`--compare DIR` puts another checkout of flowgate (e.g. `git archive <commit> | tar -x -C DIR`) beside this one
instead of the seed: each mode runs `--rounds` times each way, alternating, so the machine's drift falls on both,
and the ratios are this checkout's against that one's.

    make bench            (or: .venv/bin/python -m bench.trigger_throughput --seconds 10 --clients 16)
    .venv/bin/python -m bench.trigger_throughput --compare /tmp/before --modes sqlite,accepting --rounds 3
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.gunicorn_server import ROOT, GunicornServer, free_port


@dataclass
class Result:
    name: str
    seconds: float
    triggers: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_seconds: float | None = None  # of the server's process tree while loaded
    load_average: tuple[float, float] = (float("nan"), float("nan"))  # 1-minute, at the start and at the end

    @property
    def accepted_per_second(self) -> float:
        return len(self.triggers) / self.seconds

    @property
    def cpu_ms_per_trigger(self) -> float:
        return self.cpu_seconds / len(self.triggers) * 1000 if self.cpu_seconds and self.triggers else float("nan")


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every descendant alive, with the reaped children each one has waited for."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = sum(int(value) for value in fields[11:15]) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


def settle(pid: int, busy_below: float = 0.1, timeout: float = 120) -> None:
    """Wait until the process tree of `pid` spends less than `busy_below` of a core: a gateway is ready before each
    worker's forkserver has imported dlt (seconds of CPU each), which must not fall into the measured load."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = tree_cpu_seconds(pid)
        if now - before < busy_below:
            return
        before = now


def _probe(url: str, seconds: float, results: object) -> None:
    """In a process of its own: GET /health every 50 ms for `seconds`, put the latencies on `results`."""
    latencies = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.get("/health")  # the connection is made before the clock starts, as for the triggering clients
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.get("/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    results.put(latencies)


def load(name: str, url: str, clients: int, seconds: float, headers: dict[str, str] | None = None,
         server_pid: int | None = None) -> Result:
    """`clients` threads POST /trigger for `seconds` while a prober process GETs /health; with `server_pid`, the CPU
    its process tree spent meanwhile."""
    result = Result(name, seconds)
    lock = threading.Lock()
    context = multiprocessing.get_context("spawn")
    probed = context.Queue()
    prober = context.Process(target=_probe, args=(url, seconds, probed), daemon=True)
    prober.start()
    load_before = os.getloadavg()[0]
    cpu_before = tree_cpu_seconds(server_pid) if server_pid else None
    deadline = time.monotonic() + seconds

    def trigger(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    ok = client.post("/trigger", json={"connector_id": f"bench_{i}"}).status_code in (200, 202)
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok and time.monotonic() <= deadline + 0.001:
                        result.triggers.append(elapsed)
                    elif not ok:
                        result.errors += 1

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if cpu_before is not None:
        result.cpu_seconds = tree_cpu_seconds(server_pid) - cpu_before
    result.load_average = (load_before, os.getloadavg()[0])
    result.health = probed.get(timeout=60)
    prober.join(10)
    return result


def write_connectors(workdir: Path, clients: int, delay: float) -> None:
    body = "".join(f"  bench_{i}:\n    source: {{kind: python, ref: 'connectors.demo:numbers', "
                   f"args: {{n: 100, delay_seconds: {delay}}}}}\n" for i in range(clients))
    (workdir / "connectors.yaml").write_text("connectors:\n" + body)


def run_seed(workdir: Path, clients: int, seconds: float) -> Result:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.seed_server", str(port), str(workdir / "connectors.yaml"),
                                str(workdir / "seed-var")], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        return load("http.server (original)", url, clients, seconds, server_pid=process.pid)
    finally:
        process.kill()
        process.wait()


def run_flowgate(workdir: Path, clients: int, seconds: float, workers: int, database_url: str | None = None,
                 executing: bool = True, root: Path = ROOT, label: str = "flowgate") -> Result:
    """`executing=False`: a gateway that only accepts (its runs queue for executors elsewhere), which shows
    what the trigger path itself costs on this machine, without the pipelines competing for its 2 cores.
    `root`: the checkout whose gateway runs (this one by default)."""
    # The load queues far more runs per connector than the default limit (FLOWGATE_MAX_QUEUED_PER_TARGET) allows:
    # lift it, this measures how fast triggers are accepted.
    env = {"FLOWGATE_MAX_QUEUED_PER_TARGET": "100000", **({"DATABASE_URL": database_url} if database_url else {}),
           **({} if executing else {"FLOWGATE_EXECUTOR_THREADS": "0"})}
    # A fresh run store each time: none of the runs queued by an earlier gateway.
    var = Path(tempfile.mkdtemp(prefix="var-", dir=workdir))
    server = GunicornServer(workdir, workers=workers, ready_path="/api/v1/health/ready" if executing else "/health",
                            root=root, FLOWGATE_VAR_DIR=str(var), **env).start()
    try:
        settle(server.process.pid)
        store = "PostgreSQL" if database_url else "SQLite"
        return load(f"{label} ({workers} workers, {store}{'' if executing else ', accepting only'})", server.url,
                    clients, seconds, server_pid=server.process.pid)
    finally:
        server.kill()


def run_flowgate_on_postgres(workdir: Path, clients: int, seconds: float, workers: int, root: Path = ROOT,
                             label: str = "flowgate") -> Result | None:
    """The same load with the run store on PostgreSQL (a fresh schema), or None without a server."""
    from tests.support.postgres import fresh_schema, postgres_available

    if postgres_available():
        return None
    with fresh_schema("flowgate_bench") as url:
        return run_flowgate(workdir, clients, seconds, workers, url, root=root, label=label)


MODES = ("sqlite", "postgres", "accepting")


def run_mode(mode: str, workdir: Path, args: argparse.Namespace, root: Path = ROOT,
             label: str = "flowgate") -> Result | None:
    """One gateway under the load: executing on SQLite, on PostgreSQL (None without a server), or accepting only."""
    if mode == "postgres":
        return run_flowgate_on_postgres(workdir, args.clients, args.seconds, args.workers, root=root, label=label)
    return run_flowgate(workdir, args.clients, args.seconds, args.workers, executing=mode != "accepting", root=root,
                        label=label)


def merged(name: str, results: list[Result]) -> Result:
    """The rounds of one configuration as one result (CPU and load averages summed and spanned)."""
    total = Result(name, sum(r.seconds for r in results))
    for r in results:
        total.triggers += r.triggers
        total.health += r.health
        total.errors += r.errors
    cpu = [r.cpu_seconds for r in results if r.cpu_seconds is not None]
    total.cpu_seconds = sum(cpu) if cpu else None
    total.load_average = (min(r.load_average[0] for r in results), max(r.load_average[1] for r in results))
    return total


def print_table(results: list[Result]) -> None:
    header = (f"{'server':48} {'accepted/s':>10} {'trigger p50':>12} {'trigger p99':>12} {'health p50':>11} "
              f"{'health p99':>11} {'CPU/trigger':>11} {'errors':>6} {'load':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:48} {r.accepted_per_second:10.1f} {pct(r.triggers, 50) * 1000:10.1f}ms "
              f"{pct(r.triggers, 99) * 1000:10.1f}ms {pct(r.health, 50) * 1000:9.1f}ms "
              f"{pct(r.health, 99) * 1000:9.1f}ms {r.cpu_ms_per_trigger:9.2f}ms {r.errors:6d} "
              f"{r.load_average[0]:4.1f}→{r.load_average[1]:<4.1f}")


def compare(workdir: Path, args: argparse.Namespace, modes: list[str]) -> None:
    """This checkout against the one in --compare, each mode --rounds times each way, alternating."""
    other = Path(args.compare).resolve()
    rows = []
    for mode in modes:
        before, after = [], []
        for _ in range(args.rounds):
            for root, label, results in ((other, "before", before), (ROOT, "after", after)):
                result = run_mode(mode, workdir, args, root=root, label=label)
                if result is not None:
                    results.append(result)
        if before and after:
            rows.append((merged(before[0].name, before), merged(after[0].name, after)))
    print(f"\n{args.clients} triggering clients + 1 health prober (a process) for {args.seconds:g} s, {args.rounds} "
          f"round(s) each way, alternating; before = {other}, after = {ROOT}\n")
    print_table([r for pair in rows for r in pair])
    print("\nratios (after / before, all rounds of this run):")
    for before, after in rows:
        print(f"  {after.name.split('(', 1)[1].rstrip(')'):38} accepted/s {after.accepted_per_second / before.accepted_per_second:5.2f}x"
              f"  trigger p99 {pct(after.triggers, 99) / pct(before.triggers, 99):5.2f}x"
              f"  health p99 {pct(after.health, 99) / pct(before.health, 99):5.2f}x"
              f"  CPU/trigger {after.cpu_ms_per_trigger / before.cpu_ms_per_trigger:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the connector sleeps")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--compare", metavar="DIR", help="another checkout to run beside this one, instead of the seed")
    parser.add_argument("--rounds", type=int, default=1, help="with --compare: rounds each way")
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="flowgate-bench-") as tmp:
        workdir = Path(tmp)
        write_connectors(workdir, args.clients, args.delay)
        if args.compare:
            compare(workdir, args, modes)
            return
        seed = run_seed(workdir, args.clients, args.seconds)
        flowgate = [result for mode in modes if (result := run_mode(mode, workdir, args)) is not None]

    print(f"\n{args.clients} triggering clients + 1 health prober (a process) for {args.seconds:g} s; "
          f"connector sleeps {args.delay:g} s then loads 100 rows into DuckDB\n")
    print_table([seed, *flowgate])
    first = flowgate[0]
    print(f"\nratios ({first.name} vs original, measured in this run):")
    print(f"  triggers accepted per second: {first.accepted_per_second / seed.accepted_per_second:8.1f}x more")
    print(f"  trigger p50 latency:          {pct(seed.triggers, 50) / pct(first.triggers, 50):8.1f}x lower")
    print(f"  health p50 latency:           {pct(seed.health, 50) / pct(first.health, 50):8.1f}x lower")
    print(f"  health p99 latency:           {pct(seed.health, 99) / pct(first.health, 99):8.1f}x lower")


if __name__ == "__main__":
    main()
