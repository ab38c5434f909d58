"""`make stack` (flows/prefect/stack.py) for real: the gateway keeps serving when Prefect's server dies, runs go
local, and the stack brings the server back and the gateway uses it again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.gunicorn_server import free_port

pytestmark = [pytest.mark.long(seconds=60), pytest.mark.prefect]  # long: started first in the parallel run

ROOT = Path(__file__).resolve().parent.parent
CONNECTORS = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 3}}
    dataset: raw
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def test_the_stack_keeps_the_gateway_serving_while_prefect_is_down_and_brings_prefect_back(tmp_path):
    (tmp_path / "connectors.yaml").write_text(CONNECTORS)
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
        return doc if doc["status"] in ("completed", "failed", "cancelled", "crashed") else None

    try:
        _until(lambda: gateway.get("/health").status_code == 200, 120, "the gateway")
        on_prefect = _until(lambda: (run := trigger())["backend"] == "prefect" and run, 120, "a run on Prefect")
        assert _until(lambda: ended(on_prefect), 120, "the Prefect run's end")["status"] == "completed"

        (server,) = _pids_running(f"server start --host 127.0.0.1 --port {prefect_port}")
        os.killpg(server, signal.SIGKILL)  # Prefect's server dies
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
        assert local["fallback_reason"] in ("prefect_unreachable", "prefect_circuit_open"), local
        assert _until(lambda: ended(local), 60, "the local run's end")["status"] == "completed"

        back = _until(lambda: (run := trigger())["backend"] == "prefect" and run, 180, "runs on Prefect again")
        assert _until(lambda: ended(back), 120, "the Prefect run's end")["status"] == "completed"
        for run in unsettled:
            assert _until(lambda: ended(run), 120, f"the end of {run['run_id']}")["status"] == "completed"
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
