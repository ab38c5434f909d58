"""The gateway under a real gunicorn with several workers: concurrency, health under load, killed workers, SIGTERM."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from app.runs.store import RunStore
from flows.outcome import TERMINAL
from tests.support.gunicorn_server import ROOT, GunicornServer, run_store
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=110)  # started first in the parallel run (conftest.py)


@pytest.fixture
def server(workdir: Path, request):
    env = getattr(request, "param", {})
    server = GunicornServer(workdir, workers=2, **env).start()
    yield server
    server.kill()


def status(client: httpx.Client, run_id: str) -> str:
    return client.get(f"/api/v1/runs/{run_id}").json()["status"]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_forty_concurrent_triggers_all_complete_and_health_stays_fast(server, workdir):
    latencies: list[float] = []
    stop = threading.Event()

    answered_at: list[datetime] = []

    def probe_health() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                answered_at.append(datetime.now(timezone.utc))
                time.sleep(0.02)

    def trigger(i: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/trigger", json={"connector_id": ("numbers", "products", "events")[i % 3]})

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            responses = list(pool.map(trigger, range(40)))
        assert [r.status_code for r in responses] == [202] * 40
        with httpx.Client(base_url=server.url, timeout=10) as client:
            done = [wait_until_ended(client, f"/api/v1/runs/{r.json()['run_id']}", timeout=240) for r in responses]
    finally:
        stop.set()
        prober.join()
    assert [d["status"] for d in done] == ["completed"] * 40, [d["error"] for d in done if d["status"] != "completed"]
    assert sum(d["result"]["rows"].get("numbers", 0) for d in done) == 14 * 10
    store = run_store(workdir)
    owners = {store.get(d["run_id"]).lease_owner.split(":")[1] for d in done}
    store.dispose()
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(f"\n/health during 40 runs: {len(latencies)} probes, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; runs executed by {len(owners)} worker processes")
    # The old server answered /health only between pipelines; here it is answered while they run.
    spans = [(parse_time(d["started_at"]), parse_time(d["finished_at"])) for d in done]
    during = sum(any(start < at < end for start, end in spans) for at in answered_at)
    assert during >= 10, f"{during} of {len(answered_at)} /health probes were answered while a run was running"
    assert len(owners) >= 2  # capacity is shared: runs were claimed by more than one worker


@pytest.mark.parametrize("server", [{"FLOWGATE_LEASE_SECONDS": "600"}], indirect=True)
def test_a_sigkilled_worker_leaves_its_run_crashed_at_once_not_after_its_lease(server, workdir):
    """gunicorn's master hears which worker died (child_exit) and ends the runs it held: `process_died`, long
    before the 600 s lease would have lapsed."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        run = client.post("/trigger", json={"connector_id": "numbers", "params": {"delay_seconds": 60.0}}).json()
        wait_until(lambda: status(client, run["run_id"]) == "running", 30, "the run running")
        store = run_store(workdir)
        pid = int(store.get(run["run_id"]).lease_owner.split(":")[1])
        store.dispose()
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
    # A keep-alive connection may have been held by the killed process: start fresh ones.
    with httpx.Client(base_url=server.url, timeout=90) as client:  # longer than the wait asked for below
        crashed = wait_until_ended(client, f"/api/v1/runs/{run['run_id']}", timeout=30)
        print(f"\nrun marked {crashed['status']} {time.monotonic() - killed_at:.1f} s after SIGKILL (lease 600 s)")
        assert crashed["status"] == "crashed" and crashed["error"]["code"] == "process_died", crashed["error"]
        # gunicorn replaced the worker; the gateway still runs pipelines
        after = client.post("/trigger", json={"connector_id": "numbers", "wait": 60})
        assert after.status_code == 200 and after.json()["status"] == "completed"


@pytest.mark.parametrize("server", [{"GUNICORN_GRACEFUL_TIMEOUT": "25"}], indirect=True)
def test_sigterm_lets_a_short_run_finish_and_records_a_long_one(server, workdir):
    # Short: 2 s of extract and dlt's work, well inside the graceful timeout even on a busy machine; long: never.
    with httpx.Client(base_url=server.url, timeout=10) as client:
        short = client.post("/trigger", json={"connector_id": "slow", "params": {"delay_seconds": 2.0}}).json()
        long = client.post("/trigger", json={"connector_id": "numbers", "params": {"delay_seconds": 600.0}}).json()
        wait_until(lambda: status(client, short["run_id"]) == "running", 30, "the run running")
        wait_until(lambda: status(client, long["run_id"]) == "running", 30, "the run running")
    started = time.monotonic()
    assert server.terminate(timeout=30) == 0
    print(f"\ngunicorn exited {time.monotonic() - started:.1f} s after SIGTERM (graceful timeout 25 s)")
    store = run_store(workdir)
    short_run, long_run = store.get(short["run_id"]), store.get(long["run_id"])
    store.dispose()
    assert short_run.status == "completed" and short_run.result["rows"] == {"numbers": 5}
    assert long_run.status == "crashed" and long_run.error["code"] == "interrupted"


@pytest.mark.parametrize("web_concurrency, workers", [(None, "2"), ("5", "5")])
def test_two_workers_by_default_whatever_the_cores_and_web_concurrency_overrides(tmp_path, web_concurrency, workers):
    """Sized for a laptop or a 1 GB container (docs/operations.md, Sizing), not 2 x cores + 1."""
    env = {name: value for name, value in os.environ.items() if name != "WEB_CONCURRENCY"}
    env.update({"FLOWGATE_VAR_DIR": str(tmp_path / "var"), **({"WEB_CONCURRENCY": web_concurrency}
                                                              if web_concurrency else {})})
    code = "import runpy; print(runpy.run_path('gunicorn.conf.py')['workers'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == workers


def test_gunicorn_cmd_args_win_over_the_config_file(workdir):
    from tests.support.gunicorn_server import free_port

    port = free_port()
    server = GunicornServer(workdir, workers=1, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port} --workers 2")
    server.url = f"http://127.0.0.1:{port}"
    server.start()
    try:
        def executors() -> int:
            return httpx.get(f"{server.url}/api/v1/health/ready", timeout=30).json()["checks"]["executor"]["executors"]

        # The second worker boots (imports the app) on its own: on a busy machine that takes seconds.
        wait_until(lambda: executors() >= 2, 120, "both workers' executors registered", every=0.2)
        assert executors() == 2  # --workers 2 beat WEB_CONCURRENCY=1
    finally:
        server.kill()


FAN_OUT_WORKFLOW = """
nodes:
  - {id: start, type: trigger}
  - {id: a, type: delay, config: {seconds: 0.5}}
  - {id: b, type: delay, config: {seconds: 0.5}}
  - {id: c, type: llm, config: {prompt: "take {{ inputs.i }}"}}
  - {id: load, type: connector, config: {connector_id: numbers, params: {n: "{{ inputs.i + 1 }}"}}}
  - {id: join, type: join}
  - {id: out, type: output, config: {value: "{{ nodes.load.output.rows.numbers }}"}}
connections:
  - {from: start, to: a}
  - {from: start, to: b}
  - {from: start, to: c}
  - {from: start, to: load}
  - {from: a, to: join}
  - {from: b, to: join}
  - {from: c, to: join}
  - {from: load, to: join}
  - {from: join, to: out}
"""


def test_workflows_on_several_gunicorn_workers_end_with_every_node_recorded(workdir):
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "fan.yaml").write_text(FAN_OUT_WORKFLOW)
    server = GunicornServer(workdir, workers=3).start()
    try:
        with ThreadPoolExecutor(8) as pool:
            accepted = list(pool.map(lambda i: httpx.post(f"{server.url}/api/workflow/fan/execute",
                                                          json={"inputs": {"i": i}}, timeout=30), range(8)))
        assert [r.status_code for r in accepted] == [202] * 8
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i, response in enumerate(accepted):
                deadline = time.monotonic() + 90
                while (doc := client.get(response.json()["statusUrl"], headers={"Connection": "close"}).json())[
                        "status"] not in TERMINAL and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert doc["status"] == "completed", doc
                assert [n["status"] for n in doc["nodes"]] == ["completed"] * 7
                assert doc["outputs"] == {"out": i + 1}  # each run's own connector run and rows
        store = run_store(workdir)
        runs = store.list(limit=100)
        store.dispose()
        assert sorted(r.kind for r in runs) == ["connector"] * 8 + ["workflow"] * 8
        owners = {r.lease_owner for r in runs if r.kind == "workflow"}
        print(f"\n8 workflows ran on {len(owners)} executor(s)")
    finally:
        server.kill()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_gateways_on_one_store_share_a_backlog(workdir, request, database):
    """A backlog queued through gateway A, whose executor hears of each new run and of each ended one first
    (room for all three connectors at once: 4 slots, one kept for workflows); gateway B only polls, at the default
    interval. Each executes a share of the runs."""
    url = (request.getfixturevalue("postgres_url") if database == "postgresql"
           else f"sqlite:///{(workdir / 'var' / 'flowgate.db').resolve()}")
    with (workdir / "connectors.yaml").open("a") as connectors:
        for name in ("tick_a", "tick_b", "tick_c"):
            connectors.write(f"  {name}:\n    source: {{kind: python, ref: \"connectors.demo:numbers\", "
                             f"args: {{n: 2, delay_seconds: 0.4}}}}\n    dataset: {name}\n")
    env = {"DATABASE_URL": url, "FLOWGATE_POLL_SECONDS": "0.5", "FLOWGATE_EXECUTOR_THREADS": "4",
           "FLOWGATE_MAX_QUEUED_PER_TARGET": "1000"}
    a = GunicornServer(workdir, workers=1, **env).start()
    b = GunicornServer(workdir, workers=1, **env).start()
    try:
        with httpx.Client(base_url=a.url, timeout=30) as client:
            accepted = [client.post("/trigger", json={"connector_id": target}).json()["run_id"]
                        for _ in range(6) for target in ("tick_a", "tick_b", "tick_c")]
            ended = [wait_until_ended(client, f"/api/v1/runs/{run_id}", timeout=300)["status"] for run_id in accepted]
    finally:
        a.kill()
        b.kill()
    store = RunStore(url)
    owners = Counter(store.get(run_id).lease_owner.rsplit(":", 1)[0] for run_id in accepted)  # host:pid
    store.dispose()
    print(f"\n{len(accepted)} runs queued through gateway A, executed by: {dict(owners)}")
    assert set(ended) == {"completed"}
    assert len(owners) == 2 and min(owners.values()) >= len(accepted) // 6, owners
