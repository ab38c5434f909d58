"""Benchmark: the Prefect path's costs, each against a baseline measured in the same run.

1. Trigger latency through the gateway (gunicorn, backend auto -> Prefect) vs calling Prefect's
   create_flow_run directly on the same server: p50/p99 and the ratio.
2. Time from trigger to pipeline start on each path (Prefect process worker vs local executor).
3. What a caller pays while Prefect is down: the first trigger, then with the circuit open.

    .venv/bin/python -m bench.prefect_latency [--triggers 40]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

from app.backends.prefect_client import PrefectClient
from tests.gunicorn_server import GunicornServer
from tests.prefect_stack import PrefectStack, fresh_postgres_database

CONNECTORS = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 100}}
"""


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def start_delay(client: httpx.Client, backend: str) -> float:
    """Seconds from the run's creation to its pipeline starting, for one run that is waited for."""
    run = client.post("/trigger", json={"connector_id": "numbers", "backend": backend, "wait": 120}).json()
    assert run["status"] == "completed", run
    created, started = (datetime.fromisoformat(run[k].replace("Z", "+00:00")) for k in ("created_at", "started_at"))
    return (started - created).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triggers", type=int, default=40)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowgate-prefect-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "connectors.yaml").write_text(CONNECTORS)
        database = fresh_postgres_database("flowgate_bench_prefect")
        stack = PrefectStack(workdir, database_url=database)
        gateway = None
        try:
            stack.start_server()
            stack.deploy()
            stack.start_worker()
            gateway = GunicornServer(workdir, workers=2, PREFECT_API_URL=stack.api_url).start()
            client = httpx.Client(base_url=gateway.url, timeout=150)

            prefect_starts = [start_delay(client, "prefect") for _ in range(args.starts)]
            local_starts = [start_delay(client, "local") for _ in range(args.starts)]

            # The baseline uses the gateway's own REST client (same pooling, same retry of a busy server's 503).
            prefect = PrefectClient(stack.api_url, timeout=10)
            deployment_id = prefect.read_deployment("flowgate-connector", "numbers")["id"]
            # Interleaved, so both see the same load (the worker is busy starting the flow runs both create).
            direct, through = [], []
            for _ in range(args.triggers):
                direct.append(timed(lambda: prefect.create_flow_run(
                    deployment_id, {"connector_id": "numbers", "params": {}}, uuid.uuid4().hex, ["bench"])))
                through.append(timed(lambda: client.post("/trigger", json={"connector_id": "numbers"})))
            backends = {r["backend"] for r in client.get("/api/v1/runs?limit=20").json()["items"]}

            stack.stop_server()
            down_first = timed(lambda: client.post("/trigger", json={"connector_id": "numbers"}))
            down_open = [timed(lambda: client.post("/trigger", json={"connector_id": "numbers"})) for _ in range(20)]
        finally:
            if gateway:
                gateway.kill()
            stack.stop()

    print(f"\nPrefect path, one Prefect server ({'PostgreSQL' if database else 'SQLite'}) + one process worker, gateway on gunicorn (2 workers); "
          f"{args.triggers} triggers each way, interleaved")
    print(f"  create_flow_run direct     p50 {pct(direct, 50):7.1f} ms   p99 {pct(direct, 99):7.1f} ms")
    print(f"  POST /trigger via gateway  p50 {pct(through, 50):7.1f} ms   p99 {pct(through, 99):7.1f} ms   "
          f"(backends used: {', '.join(sorted(backends))})")
    print(f"  ratio gateway/direct       p50 {pct(through, 50) / pct(direct, 50):7.2f}x   "
          f"p99 {pct(through, 99) / pct(direct, 99):7.2f}x")
    print(f"\ntrigger -> pipeline start (median of {args.starts}):")
    print(f"  Prefect process worker  {statistics.median(prefect_starts):6.2f} s")
    print(f"  local executor          {statistics.median(local_starts):6.3f} s")
    print("\nPrefect down (connection refused):")
    print(f"  first trigger (probe fails, circuit opens)  {down_first:7.1f} ms")
    print(f"  next triggers, circuit open                 p50 {pct(down_open, 50):7.1f} ms   "
          f"p99 {pct(down_open, 99):7.1f} ms")


if __name__ == "__main__":
    main()
