"""Benchmark: flowgate on gunicorn vs the original single-threaded http.server, same pipeline, same load.

16 clients trigger a python connector that sleeps 0.5 s (then loads its rows into DuckDB with dlt) for
10 s while one prober calls /health. Prints triggers accepted per second, trigger and health latency
p50/p99 for both servers, and flowgate's ratios against the baseline measured in this run. flowgate runs with
its run store on SQLite, on PostgreSQL when one answers, and once more only accepting (no executor in the
gateway: its runs queue for executors elsewhere), which shows the trigger path's own ceiling on this machine.

    make bench            (or: .venv/bin/python -m bench.trigger_throughput --seconds 10 --clients 16)
"""
from __future__ import annotations

import argparse
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

    @property
    def accepted_per_second(self) -> float:
        return len(self.triggers) / self.seconds


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def load(name: str, url: str, clients: int, seconds: float, headers: dict[str, str] | None = None) -> Result:
    result = Result(name, seconds)
    lock = threading.Lock()
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

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                client.get("/health")
                result.health.append(time.perf_counter() - started)
                time.sleep(0.05)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(clients)] + [threading.Thread(target=probe)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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
        return load("http.server (original)", url, clients, seconds)
    finally:
        process.kill()
        process.wait()


def run_flowgate(workdir: Path, clients: int, seconds: float, workers: int, database_url: str | None = None,
                 executing: bool = True) -> Result:
    """`executing=False`: a gateway that only accepts (its runs queue for executors elsewhere), which shows
    what the trigger path itself costs on this machine, without the pipelines competing for its 2 cores."""
    # The load queues far more runs per connector than the default limit (FLOWGATE_MAX_QUEUED_PER_TARGET) allows:
    # lift it, this measures how fast triggers are accepted.
    env = {"FLOWGATE_MAX_QUEUED_PER_TARGET": "100000", **({"DATABASE_URL": database_url} if database_url else {}),
           **({} if executing else {"FLOWGATE_EXECUTOR_THREADS": "0"})}
    server = GunicornServer(workdir, workers=workers, ready_path="/api/v1/health/ready" if executing else "/health",
                            **env).start()
    try:
        store = "PostgreSQL" if database_url else "SQLite"
        return load(f"flowgate ({workers} workers, {store}{'' if executing else ', accepting only'})", server.url,
                    clients, seconds)
    finally:
        server.kill()


def run_flowgate_on_postgres(workdir: Path, clients: int, seconds: float, workers: int) -> Result | None:
    """The same load with the run store on PostgreSQL (a fresh schema), or None without a server."""
    import uuid

    import sqlalchemy as sa

    from tests.support.postgres import POSTGRES_URL, postgres_available

    if postgres_available():
        return None
    schema = f"flowgate_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        return run_flowgate(workdir, clients, seconds, workers, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the connector sleeps")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowgate-bench-") as tmp:
        workdir = Path(tmp)
        write_connectors(workdir, args.clients, args.delay)
        seed = run_seed(workdir, args.clients, args.seconds)
        flowgate = run_flowgate(workdir, args.clients, args.seconds, args.workers)
        on_postgres = run_flowgate_on_postgres(workdir, args.clients, args.seconds, args.workers)
        (workdir / "var").rename(workdir / "var-executing")  # a fresh store: none of the runs queued above
        accepting = run_flowgate(workdir, args.clients, args.seconds, args.workers, executing=False)

    print(f"\n{args.clients} triggering clients + 1 health prober for {args.seconds:g} s; "
          f"connector sleeps {args.delay:g} s then loads 100 rows into DuckDB\n")
    header = f"{'server':36} {'accepted/s':>10} {'trigger p50':>12} {'trigger p99':>12} {'health p50':>11} {'health p99':>11} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for r in (seed, flowgate, *([on_postgres] if on_postgres else []), accepting):
        print(f"{r.name:36} {r.accepted_per_second:10.1f} {pct(r.triggers, 50) * 1000:10.1f}ms "
              f"{pct(r.triggers, 99) * 1000:10.1f}ms {pct(r.health, 50) * 1000:9.1f}ms "
              f"{pct(r.health, 99) * 1000:9.1f}ms {r.errors:6d}")
    print("\nratios (flowgate vs original, measured in this run):")
    print(f"  triggers accepted per second: {flowgate.accepted_per_second / seed.accepted_per_second:8.1f}x more")
    print(f"  trigger p50 latency:          {pct(seed.triggers, 50) / pct(flowgate.triggers, 50):8.1f}x lower")
    print(f"  health p50 latency:           {pct(seed.health, 50) / pct(flowgate.health, 50):8.1f}x lower")
    print(f"  health p99 latency:           {pct(seed.health, 99) / pct(flowgate.health, 99):8.1f}x lower")


if __name__ == "__main__":
    main()
