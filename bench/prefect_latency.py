"""Benchmark: the Prefect path's costs, each against a baseline measured in the same run.

1. On-demand latency: `--runs` triggers of a trivial connector with `wait`, one at a time, each broken down
   from Prefect's state history and task runs (trigger -> flow run created -> worker picked it up (PENDING) ->
   flow RUNNING -> pipeline start -> pipeline end -> COMPLETED in Prefect -> the waiting caller has `completed`),
   against the local executor's trigger -> completed.
2. Trigger latency through the gateway (gunicorn, backend auto -> Prefect) vs calling Prefect's
   create_flow_run directly on the same server: p50/p99 and the ratio.
3. What a caller pays while Prefect is down: the first trigger, then with the circuit open.

With `--launcher`, instead: trigger -> completed and the CPU of every process a flow run costs, for flow runs the
launcher forks (flows/prefect/launcher.py, the deployments' command by default) against flow runs started as
`<python> -m prefect.engine` (a second deployment of the same connector with that command), alternating, in the
same stack and the same run. The CPU is the user + system time of the processes the worker, the launcher and this
process reaped during the run: launch scripts and engines (the worker's children), forked flow runs (the
launcher's), and the forkserver each flow run starts for its steps, which outlives it and is reaped here (this
process is a child subreaper), so both ways count every process of a flow run.

Without `--launcher` no launcher runs: the flow runs start as `python -m prefect.engine` (the launch script's
fallback). The worker and its flow runs get the settings `make stack` gives them (flows/prefect/stack.prefect_environment);
PrefectStack adds only test-speed server loops and a shorter heartbeat (a little more of the
server's CPU than the stack's).

    .venv/bin/python -m bench.prefect_latency [--runs 5] [--triggers 40]
    .venv/bin/python -m bench.prefect_latency --launcher [--runs 10]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

from app.backends.prefect_client import PrefectClient
from tests.support.gunicorn_server import GunicornServer
from tests.support.prefect_stack import PrefectStack, fresh_postgres_database

CONNECTORS = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 100}}
"""
# --launcher: the same connector twice, `numbers` deployed with the launch script, `direct` with the engine.
LAUNCHER_CONNECTORS = CONNECTORS + """  direct:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 100}}
"""
DEPLOY_DIRECT = """
import sys
from pathlib import Path
from connectors.registry import ConnectorRegistry
from flows.prefect.deploy import ENGINE_COMMAND, deploy_connector
deploy_connector(ConnectorRegistry.load(Path(sys.argv[1])).get("direct"), "flowgate", ENGINE_COMMAND)
"""


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def when(value: str | None) -> float | None:
    """An ISO timestamp (Prefect's or the run record's) as epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


# The stages of one on-demand run, in order: (label, what the stage ends with).
STAGES = [
    ("gateway stored the run", "accepted"),
    ("flow run created in Prefect", "created"),
    ("worker picked it up (PENDING)", "pending"),
    ("flow RUNNING (process started, imports)", "running"),
    ("pipeline start (first task)", "pipeline_start"),
    ("pipeline end (last task)", "pipeline_end"),
    ("flow COMPLETED in Prefect", "completed"),
    ("caller has `completed` (wait answered)", "answered"),
]


def prefect_run(client: httpx.Client, stack: PrefectStack, connector: str = "numbers") -> dict[str, float]:
    """One trigger with `wait`, through the gateway to the process worker: when each stage ended, in seconds
    after the trigger was sent (the gateway, Prefect's server and the flow run share this machine's clock)."""
    sent = time.time()
    run = client.post("/trigger", json={"connector_id": connector, "backend": "prefect", "wait": 120}).json()
    answered = time.time()
    assert run["status"] == "completed" and run["backend"] == "prefect", run
    flow_run_id = run["prefect_flow_run_id"]
    flow_run = stack.api("GET", f"flow_runs/{flow_run_id}")
    states = {state["type"]: when(state["timestamp"])
              for state in stack.api("GET", "flow_run_states/", params={"flow_run_id": flow_run_id})}
    tasks = stack.api("POST", "task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
    marks = {
        "accepted": when(run["created_at"]), "created": when(flow_run["created"]), "pending": states["PENDING"],
        "running": states["RUNNING"], "pipeline_start": min(when(t["start_time"]) for t in tasks),
        "pipeline_end": max(when(t["end_time"]) for t in tasks), "completed": states["COMPLETED"],
        "answered": answered}
    return {stage: mark - sent for stage, mark in marks.items()}


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of the processes `pid` started and has waited for: the worker's flow runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


def wait_for_no_children(pid: int, timeout: float = 60) -> None:
    """Until every flow-run process of the worker has exited (a flow run reports COMPLETED, then exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            Path(task, "children").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()):
        time.sleep(0.2)


def become_subreaper() -> None:
    """Orphans of this process's descendants (a flow run's forkserver outlives the flow run) become its children,
    so their CPU can be counted when they are reaped (prctl PR_SET_CHILD_SUBREAPER)."""
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans(known: set[int]) -> bool:
    """Reap the children of this process that it did not start (orphans it adopted); True when none is left."""
    left = False
    for task in Path("/proc/self/task").iterdir():
        for pid in map(int, (task / "children").read_text().split()):
            if pid in known:
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            left = left or done == 0
    return not left


def has_children(pid: int) -> bool:
    return any(Path(task, "children").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir())


def flow_run_cpu(stack: PrefectStack) -> dict[str, float]:
    """CPU seconds of every process of flow runs that has ended, by who reaped it: the worker (launch scripts,
    engines), the launcher (forked flow runs) or this process (the steps' forkservers, with their steps)."""
    assert stack.worker and stack.launcher
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"worker": children_cpu_seconds(stack.worker.pid), "launcher": children_cpu_seconds(stack.launcher.pid),
            "orphans": own.ru_utime + own.ru_stime}


def settle(stack: PrefectStack, known: set[int], timeout: float = 60) -> None:
    """Until every process of the flow runs so far has ended and been reaped."""
    assert stack.worker and stack.launcher
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not has_children(stack.worker.pid) and not has_children(stack.launcher.pid) and reap_orphans(known):
            return
        time.sleep(0.1)
    raise RuntimeError("the flow runs' processes did not all end")


def launcher_main(runs: int) -> None:
    """--launcher: forked flow runs against `python -m prefect.engine` ones, alternating (see the docstring)."""
    load_before = os.getloadavg()
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="flowgate-launcher-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "connectors.yaml").write_text(LAUNCHER_CONNECTORS)
        database = fresh_postgres_database("flowgate_bench_launcher")
        stack = PrefectStack(workdir, database_url=database)
        gateway = None
        try:
            stack.start_server()
            said = stack.deploy()
            subprocess.run([sys.executable, "-c", DEPLOY_DIRECT, str(workdir / "connectors.yaml")], env=stack.env,
                           check=True, timeout=180)
            stack.start_launcher()
            stack.start_worker()
            gateway = GunicornServer(workdir, workers=2, PREFECT_API_URL=stack.api_url,
                                     DATABASE_URL=stack.run_store_url).start()
            assert stack.server and stack.worker and stack.launcher and gateway.process
            known = {stack.server.pid, stack.worker.pid, stack.launcher.pid, gateway.process.pid}
            client = httpx.Client(base_url=gateway.url, timeout=150)
            ways = {"launcher": "numbers", "engine": "direct"}
            for connector in ways.values():  # first runs: DuckDB files, dlt's working state
                prefect_run(client, stack, connector)
            settle(stack, known)
            runs_of: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
            cpu_of: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
            for i in range(runs):
                order = list(ways) if i % 2 == 0 else list(reversed(ways))  # alternating, each first half the time
                for way in order:
                    before = flow_run_cpu(stack)
                    runs_of[way].append(prefect_run(client, stack, ways[way]))
                    settle(stack, known)
                    after = flow_run_cpu(stack)
                    cpu_of[way].append({part: after[part] - before[part] for part in after})
        finally:
            if gateway:
                gateway.kill()
            stack.stop()
    load_after = os.getloadavg()
    print(said.strip().splitlines()[-1])
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
          f"{', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} cores; "
          f"Prefect's server on {'PostgreSQL' if database else 'SQLite'}")
    print(f"\n{runs} flow runs each way of a trivial connector (100 rows into DuckDB), trigger with `wait`, "
          "alternating:")
    print(f"  {'':34} {'launcher':>10} {'engine':>10} {'ratio':>7}")
    rows = [("trigger -> completed, median", lambda w: statistics.median(r["answered"] for r in runs_of[w])),
            ("trigger -> completed, max", lambda w: max(r["answered"] for r in runs_of[w])),
            ("picked up -> RUNNING, median", lambda w: statistics.median(r["running"] - r["pending"]
                                                                       for r in runs_of[w])),
            ("RUNNING -> first task, median", lambda w: statistics.median(r["pipeline_start"] - r["running"]
                                                                        for r in runs_of[w])),
            ("CPU per flow run, median", lambda w: statistics.median(sum(c.values()) for c in cpu_of[w])),
            ("CPU per flow run, mean", lambda w: statistics.mean(sum(c.values()) for c in cpu_of[w])),
            ("  reaped by the worker, mean", lambda w: statistics.mean(c["worker"] for c in cpu_of[w])),
            ("  reaped by the launcher, mean", lambda w: statistics.mean(c["launcher"] for c in cpu_of[w])),
            ("  steps' forkserver and steps, mean", lambda w: statistics.mean(c["orphans"] for c in cpu_of[w]))]
    for label, figure in rows:
        launched, engine = figure("launcher"), figure("engine")
        ratio = f"{launched / engine:6.2f}x" if engine else ""
        print(f"  {label:34} {launched:9.2f}s {engine:9.2f}s {ratio}")


def local_run(client: httpx.Client) -> float:
    """Seconds from sending a `wait` trigger on the local executor to its `completed` answer."""
    sent = time.monotonic()
    run = client.post("/trigger", json={"connector_id": "numbers", "backend": "local", "wait": 120}).json()
    assert run["status"] == "completed", run
    return time.monotonic() - sent


def print_breakdown(runs: list[dict[str, float]], local: list[float], flow_run_cpu: float) -> None:
    print(f"\nOn-demand run of a trivial connector (100 rows into DuckDB), trigger with `wait`, {len(runs)} runs "
          "one at a time:")
    print(f"  {'stage ends':42} {'step median':>11} {'step max':>9} {'since trigger':>14}")
    previous = None
    for label, stage in STAGES:
        steps = [r[stage] - (r[previous] if previous else 0.0) for r in runs]
        print(f"  {label:42} {statistics.median(steps):10.2f}s {max(steps):8.2f}s "
              f"{statistics.median(r[stage] for r in runs):13.2f}s")
        previous = stage
    total, base = statistics.median(r["answered"] for r in runs), statistics.median(local)
    print(f"  trigger -> completed: Prefect median {total:.2f} s (max {max(r['answered'] for r in runs):.2f} s), "
          f"local executor median {base:.2f} s (max {max(local):.2f} s): {total / base:.1f}x")
    print(f"  CPU of the flow-run process(es) the worker started, per run: {flow_run_cpu:.2f} s (user + system)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triggers", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5, help="on-demand runs waited for, on each path")
    parser.add_argument("--launcher", action="store_true",
                        help="only: flow runs forked by the launcher against `python -m prefect.engine` ones")
    args = parser.parse_args()
    if args.launcher:
        launcher_main(args.runs)
        return
    load_before = f"{os.getloadavg()[0]:.2f}"
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
            gateway = GunicornServer(workdir, workers=2, PREFECT_API_URL=stack.api_url,
                                     DATABASE_URL=stack.run_store_url).start()
            client = httpx.Client(base_url=gateway.url, timeout=150)

            local_run(client)  # the first run of a pipeline creates its DuckDB file and dlt's working state
            prefect_run(client, stack)
            wait_for_no_children(stack.worker.pid)
            cpu_before = children_cpu_seconds(stack.worker.pid)
            runs, local = [], []
            for _ in range(args.runs):  # interleaved, so both see the same load
                runs.append(prefect_run(client, stack))
                local.append(local_run(client))
            wait_for_no_children(stack.worker.pid)
            flow_run_cpu = (children_cpu_seconds(stack.worker.pid) - cpu_before) / args.runs

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

    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print_breakdown(runs, local, flow_run_cpu)
    print(f"\nPrefect path, one Prefect server ({'PostgreSQL' if database else 'SQLite'}) + one process worker, gateway on gunicorn (2 workers); "
          f"{args.triggers} triggers each way, interleaved")
    print(f"  create_flow_run direct     p50 {pct(direct, 50):7.1f} ms   p99 {pct(direct, 99):7.1f} ms")
    print(f"  POST /trigger via gateway  p50 {pct(through, 50):7.1f} ms   p99 {pct(through, 99):7.1f} ms   "
          f"(backends used: {', '.join(sorted(backends))})")
    print(f"  ratio gateway/direct       p50 {pct(through, 50) / pct(direct, 50):7.2f}x   "
          f"p99 {pct(through, 99) / pct(direct, 99):7.2f}x")
    print("\nPrefect down (connection refused):")
    print(f"  first trigger (probe fails, circuit opens)  {down_first:7.1f} ms")
    print(f"  next triggers, circuit open                 p50 {pct(down_open, 50):7.1f} ms   "
          f"p99 {pct(down_open, 99):7.1f} ms")


if __name__ == "__main__":
    main()
