"""`make stack` (flows/prefect/stack.py) for real: the gateway keeps serving when Prefect's server dies, runs go
local, and the stack brings the server back and the gateway uses it again; a schedule keeps firing throughout, each
slot once, on whichever path could take it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flows.outcome import TERMINAL
from tests.support.gunicorn_server import free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.long(seconds=60), pytest.mark.prefect]  # long: started first in the parallel run

ROOT = Path(__file__).resolve().parent.parent
CONNECTORS = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 3}}
    dataset: raw
  ticker:
    source: {kind: python, ref: "tests.support.chaos_source:recorded", args: {connector: ticker, path: "%s", seconds: 0.1}}
    schedule: {interval: 3}
"""


def _pids_running(fragment: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _until(condition, timeout: float, what: str):
    """wait_until every half second, a gateway or Prefect server that does not answer counting as not yet."""
    return wait_until(condition, timeout, what, every=0.5, ignoring=(httpx.HTTPError,))


def test_the_stack_keeps_the_gateway_serving_while_prefect_is_down_and_brings_prefect_back(tmp_path):
    executions = tmp_path / "executions.log"
    (tmp_path / "connectors.yaml").write_text(CONNECTORS % executions)
    gateway_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLOWGATE_"))}
    env.update({"FLOW_SERVER_PORT": str(gateway_port), "PREFECT_PORT": str(prefect_port),
                "FLOWGATE_VAR_DIR": str(tmp_path / "var"), "FLOWGATE_CONNECTORS": str(tmp_path / "connectors.yaml"),
                "FLOWGATE_WORKFLOWS": str(tmp_path / "workflows"), "FLOWGATE_STACK_POSTGRES_URL": "",
                "WEB_CONCURRENCY": "2"})
    log = (tmp_path / "stack.log").open("wb")
    stack = subprocess.Popen([sys.executable, "-m", "flows.prefect.stack"], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    gateway = httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=10)

    def trigger() -> dict:
        response = gateway.post("/trigger", json={"connector_id": "numbers"})
        assert response.status_code in (200, 202), (response.status_code, response.text,
                                                    (tmp_path / "stack.log").read_text(errors="replace")[-3000:])
        return response.json()

    def ended(run: dict) -> dict | None:
        doc = gateway.get(run["status_url"]).json()
        return doc if doc["status"] in TERMINAL else None

    try:
        _until(lambda: gateway.get("/health").status_code == 200, 120, "the gateway")
        # The schedule fires from the first Prefect run until Prefect has been killed and is back (each of its
        # flow runs costs a process on the worker, so not longer).
        assert gateway.post("/api/v1/connectors/ticker/schedule/pause").status_code == 200
        on_prefect = _until(lambda: (run := trigger())["backend"] == "prefect" and run, 120, "a run on Prefect")
        assert _until(lambda: ended(on_prefect), 120, "the Prefect run's end")["status"] == "completed"

        def slots() -> list[dict]:
            return gateway.get("/api/v1/runs", params={"connector_id": "ticker", "limit": 200}).json()["items"]

        assert gateway.post("/api/v1/connectors/ticker/schedule/resume").status_code == 200
        _until(lambda: any(r["backend"] == "prefect" for r in slots()), 60, "a slot on Prefect")
        # Paused again until Prefect is gone: while a slot's run still waits on Prefect, the next slots are
        # skipped, not run (at most one run of a schedule waits), and none would fire locally.
        assert gateway.post("/api/v1/connectors/ticker/schedule/pause").status_code == 200
        _until(lambda: all(ended(r) for r in slots()), 120, "the slots on Prefect ended")
        (server,) = _pids_running(f"server start --host 127.0.0.1 --port {prefect_port}")
        os.killpg(server, signal.SIGKILL)  # Prefect's server dies
        assert gateway.post("/api/v1/connectors/ticker/schedule/resume").status_code == 200  # a slot within 3 s
        _until(lambda: not _pids_running(f"--port {prefect_port}"), 30, "the server gone")
        assert gateway.get("/health").status_code == 200
        # A trigger racing the kill may have sent its create before the server died: its answer is lost, so the
        # run waits for the sync to settle it (Prefect's or local), never run twice. The next ones go local.
        unsettled = []

        def gone_local() -> dict | None:
            run = trigger()
            if run["backend"] == "local":
                return run
            unsettled.append(run)
            return None

        local = _until(gone_local, 60, "a run gone local")
        _until(lambda: any(r["backend"] == "local" for r in slots()), 60, "a slot fired locally while Prefect is down")
        assert local["fallback_reason"] in ("prefect_unreachable", "prefect_circuit_open"), local
        assert _until(lambda: ended(local), 60, "the local run's end")["status"] == "completed"

        back = _until(lambda: (run := trigger())["backend"] == "prefect" and run, 180, "runs on Prefect again")
        assert _until(lambda: ended(back), 120, "the Prefect run's end")["status"] == "completed"
        for run in unsettled:
            assert _until(lambda run=run: ended(run), 120, f"the end of {run['run_id']}")["status"] == "completed"

        # The schedule fired all along, through the gateway: to Prefect while it could take its slots, locally
        # (saying why) while it could not, to Prefect again once it was back; each slot one run, executed once.
        restarted = gateway.get(back["status_url"]).json()["created_at"]
        _until(lambda: any(r["backend"] == "prefect" and r["created_at"] > restarted for r in slots()), 120,
               "a slot on Prefect after its restart")
        assert gateway.post("/api/v1/connectors/ticker/schedule/pause").status_code == 200  # no slot after these
        scheduled = [_until(lambda r=r: ended(r), 120, f"the end of slot {r['scheduled_for']}") for r in slots()]
        assert all(r["source"] == "schedule" for r in scheduled)
        assert len({r["scheduled_for"] for r in scheduled}) == len(scheduled)
        assert {r["status"] for r in scheduled} <= {"completed", "cancelled"}, scheduled
        local = [r for r in scheduled if r["backend"] == "local"]
        assert local and all(r["fallback_reason"] for r in local), local  # Prefect down: fired locally
        assert sum(r["backend"] == "prefect" for r in scheduled) >= 2  # before the kill and after the restart
        starts = [line for line in executions.read_text().splitlines() if line.startswith("start ")]
        assert len(starts) == sum(r["status"] == "completed" for r in scheduled), (starts, scheduled)
        assert stack.poll() is None
    finally:
        gateway.close()
        if stack.poll() is None:
            os.kill(stack.pid, signal.SIGTERM)
        try:
            code = stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            code = None
        for fragment in (f"--port {prefect_port}", str(tmp_path / "var")):
            for pid in _pids_running(fragment):
                os.kill(pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "stack.log").read_text(errors="replace")
    assert "Prefect server exited" in text and "Prefect server started again" in text, text[-3000:]
    assert "SQLite" in text and code == 0, text[-3000:]
    # The flow runs on Prefect were forked by the stack's launcher (flows/prefect/launcher.py), not started anew
    assert re.search(r"\[launcher \d+\] flow run [0-9a-f-]{36}: process \d+", text), text[-3000:]
