"""The flow-run launcher (flows/prefect/launcher.py) with a real Prefect server and process worker: a flow run is
forked from the launcher and completes with the flow run's own settings, a cancel and a killed launch script end the
forked process, and without a launcher flow runs start as `python -m prefect.engine` and complete all the same."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from app import create_app
from flows.outcome import TERMINAL
from flows.prefect.deploy import LAUNCH_COMMAND
from tests.support.gunicorn_server import ROOT
from tests.support.prefect_stack import PrefectStack, fresh_postgres_database
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=120)  # started first in the parallel run (conftest.py)

CONNECTORS = """
connectors:
  traced:
    source: {kind: python, ref: "tests.support.ancestry_source:recorded_ancestry", args: {path: "", seconds: 0}}
    dataset: raw
"""
LAUNCH = [sys.executable, "-S", str(ROOT / "flows" / "prefect" / "launch.py")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    workdir = tmp_path_factory.mktemp("launcher")
    (workdir / "connectors.yaml").write_text(CONNECTORS)
    stack = PrefectStack(workdir, database_url=fresh_postgres_database("flowgate_test_launcher"))
    try:
        stack.start_server()
        said = stack.deploy()
        assert f"flow runs start as: {LAUNCH_COMMAND}" in said, said
        start_launcher(stack)
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def start_launcher(stack: PrefectStack) -> None:
    """The launcher with an API URL where nothing answers: a flow run forked from it that reaches Prefect's server
    read its settings from the env its worker gave it, not from the launcher's."""
    stack.start_launcher(PREFECT_API_URL="http://127.0.0.1:9/api")


@pytest.fixture
def gateway(stack: PrefectStack, tmp_path: Path):
    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml", "workflows_dir": stack.workdir / "workflows",
                      "prefect_api_url": stack.api_url, "lease_seconds": 10.0, "poll_seconds": 0.05})
    services = app.extensions["flowgate"]
    services.executor.start()
    yield app.test_client()
    services.executor.shutdown(timeout=10)
    services.store.dispose()


def trigger(gateway, path: Path, seconds: float = 0.0, wait: int | None = None) -> dict:
    body = {"connector_id": "traced", "backend": "prefect", "params": {"path": str(path), "seconds": seconds}}
    response = gateway.post("/trigger", json=body if wait is None else {**body, "wait": wait})
    assert response.status_code in (200, 202) and response.json["backend"] == "prefect", response.json
    return response.json


def started(path: Path) -> list[int] | None:
    """The step's ancestry once it has written it (tests/support/ancestry_source.py)."""
    try:
        return json.loads(path.read_text())["pids"]
    except (FileNotFoundError, ValueError):  # not yet, or half written
        return None


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def flow_run_process(chain: list[int], started_by: int) -> int:
    """In a step's ancestry, the flow run's process: the one `started_by` (the launcher or the worker) started."""
    return chain[chain.index(started_by) - 1]


def launch_scripts(worker: int) -> list[int]:
    """The worker's children running flows/prefect/launch.py (a launch script that fell back runs the engine)."""
    children = [int(pid) for task in Path(f"/proc/{worker}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [pid for pid in children if b"flows/prefect/launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_flow_run_is_forked_by_the_launcher_and_completes_with_its_rows_and_its_own_settings(stack, gateway,
                                                                                                tmp_path):
    done = trigger(gateway, tmp_path / "ancestry", wait=120)
    if done["status"] not in TERMINAL:
        done = wait_until_ended(gateway, done["status_url"], timeout=120)
    assert done["status"] == "completed" and done["prefect_state"] == "Completed", done
    assert done["result"]["rows"] == {"ancestry": 3}, done
    with duckdb.connect(str(stack.workdir / done["result"]["location"]), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.ancestry").fetchone()[0] >= 3
    recorded = json.loads((tmp_path / "ancestry").read_text())
    chain = recorded["pids"]
    assert stack.launcher.pid in chain and stack.worker.pid not in chain, chain  # forked, not started by the worker
    # The step's process (from its forkserver) did not import Prefect: the forked flow run's main module is the
    # launcher's, which multiprocessing imports again in each child, not prefect.engine.
    assert recorded["prefect"] is False


def test_a_cancel_through_the_gateway_reaches_the_forked_flow_run_and_ends_it(stack, gateway, tmp_path):
    run = trigger(gateway, tmp_path / "ancestry", seconds=300)
    chain = wait_until(lambda: started(tmp_path / "ancestry"), 120, "the step started")
    flow_run = flow_run_process(chain, stack.launcher.pid)
    cancel = gateway.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert cancel.status_code == 202, cancel.json
    done = wait_until_ended(gateway, run["status_url"], timeout=120)
    assert done["status"] == "cancelled" and done["prefect_state"] == "Cancelled", done
    wait_until(lambda: gone(flow_run) and gone(chain[0]), 60, "the forked flow run and its step ended")


def test_a_launch_script_killed_takes_its_forked_flow_run_with_it(stack, gateway, tmp_path):
    run = trigger(gateway, tmp_path / "ancestry", seconds=300)
    chain = wait_until(lambda: started(tmp_path / "ancestry"), 120, "the step started")
    flow_run = flow_run_process(chain, stack.launcher.pid)
    (script,) = launch_scripts(stack.worker.pid)
    os.kill(script, signal.SIGKILL)
    wait_until(lambda: gone(flow_run) and gone(chain[0]), 60, "the forked flow run and its step ended")
    done = wait_until_ended(gateway, run["status_url"], timeout=120)  # the worker reports the crash
    assert done["status"] != "completed", done


def test_without_a_launcher_flow_runs_start_as_the_engine_and_complete(stack, gateway, tmp_path):
    stack.stop_launcher()
    try:
        assert not os.path.exists(stack.launcher_socket)  # a stopped launcher removes its socket
        done = trigger(gateway, tmp_path / "ancestry", wait=120)
        if done["status"] not in TERMINAL:
            done = wait_until_ended(gateway, done["status_url"], timeout=120)
        assert done["status"] == "completed" and done["result"]["rows"] == {"ancestry": 3}, done
        recorded = json.loads((tmp_path / "ancestry").read_text())
        # The launch script became the engine in place: the flow run's process is the worker's child.
        assert stack.worker.pid in recorded["pids"], recorded
    finally:
        start_launcher(stack)


def test_the_launch_script_runs_the_engine_in_the_launchers_fork_and_exits_as_it_did(stack, tmp_path):
    """Outside the worker: an invalid flow run id makes `python -m prefect.engine` log and exit 1; through the
    launcher the same line reaches the launch script's stderr and the same exit code its caller."""
    env = dict(stack.env, PREFECT__FLOW_RUN_ID="not-a-uuid")
    through = subprocess.run(LAUNCH, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    direct = subprocess.run(LAUNCH, cwd=tmp_path, env=dict(env, FLOWGATE_LAUNCHER_SOCKET=""), capture_output=True,
                            text=True, timeout=120)
    for done in (through, direct):
        assert done.returncode == 1 and "Invalid flow run id" in done.stderr, done
    assert "flow run not-a-uuid: process" in (stack.workdir / "launcher.log").read_text()


def test_a_launch_script_of_another_checkout_is_refused_and_runs_the_engine_itself(stack, tmp_path):
    other = tmp_path / "other" / "flows" / "prefect"
    other.mkdir(parents=True)
    (other / "launch.py").write_text((ROOT / "flows" / "prefect" / "launch.py").read_text())
    env = dict(stack.env, PREFECT__FLOW_RUN_ID="not-a-uuid")
    done = subprocess.run([sys.executable, "-S", str(other / "launch.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the launcher refused: launch script of" in done.stderr, done
    assert "Invalid flow run id" in done.stderr, done
