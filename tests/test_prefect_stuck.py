"""Prefect runs whose flow run is stuck must still end, against a real Prefect server and process worker of this
module's own: a flow run whose process died while the server was down (Prefect shows it Running for good) ends
crashed within about one lease, or is retried; one a worker claimed and never started is taken back and runs
locally once; a healthy slow one is never touched. The flow runs' lease on their runs: flows/run_lease.py."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.prefect_stack import PrefectStack, deployed_stack, frozen_worker, ran_on_prefect, sync_gateway
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=150)  # started first in the parallel run (conftest.py)

WORKER_LEASE = 9.0  # the flow runs' lease on their runs (FLOWGATE_LEASE_SECONDS of the worker)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    with deployed_stack(tmp_path_factory.mktemp("prefect"), "flowgate_test_prefect_stuck",
                        env={"FLOWGATE_LEASE_SECONDS": str(WORKER_LEASE)}) as stack:
        yield stack


@pytest.fixture
def gateway(stack: PrefectStack, tmp_path: Path):
    """A gateway on the worker's run store with its executor and Prefect sync running; FLOWGATE_RUN_TIMEOUT_SECONDS
    at its default (6 h): whatever ends here ends without it."""
    def make(**settings):
        app, services = sync_gateway(stack, tmp_path, **settings)
        made.append(services)
        return app.test_client(), services

    made: list = []
    yield make
    for services in made:
        services.prefect_sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()


def flow_run_processes(flow_run_id: str) -> list[int]:
    """The processes of a flow run: the one the process worker started (PREFECT__FLOW_RUN_ID in its environment)
    and its connector step's child, which inherits it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ:
            found.append(int(pid))
    return found


def step_started(stack: PrefectStack, flow_run_id: str) -> bool:
    """A step of the flow run (a task run) started: the flow run executes its connector."""
    return bool(stack.api("POST", "task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}))


def holding_its_lease(services, run_id: str):
    run = services.store.get(run_id)
    return run if run.status == "running" and (run.lease_owner or "").startswith("prefect:") else None


def test_a_healthy_slow_flow_run_longer_than_several_leases_is_never_touched(stack, gateway):
    client, services = gateway()
    run = client.post("/trigger", json={"connector_id": "numbers",
                                        "params": {"n": 4, "delay_seconds": 4 * WORKER_LEASE}}).json
    assert run["backend"] == "prefect", run
    wait_until(lambda: holding_its_lease(services, run["run_id"]), 120, "the flow run took its run's lease")
    done = wait_until_ended(client, run["status_url"], timeout=240)
    assert done["status"] == "completed" and done["backend"] == "prefect", done
    assert done["result"]["rows"] == {"numbers": 4} and done["fallback_reason"] is None and done["attempt"] == 1


@pytest.mark.parametrize("retry", [None, {"max_attempts": 2, "backoff_seconds": 0, "on": ["crashed"]}],
                         ids=["no-retry", "retried"])
def test_a_flow_run_killed_while_the_prefect_server_is_down_ends_within_about_a_lease(stack, gateway, retry):
    """The Prefect server is down when the flow run's process (and its worker) is SIGKILLed: nobody can report
    it, and the server, back, shows the flow run Running for good. Its lease on the run lapsed: the run
    ends crashed (Prefect is told), or its retry policy runs it again, long before FLOWGATE_RUN_TIMEOUT_SECONDS."""
    client, services = gateway()
    # Slow enough to be killed mid-run on a busy machine; attempt 2 (a flow run of its own) sleeps as long.
    body = {"connector_id": "numbers", "params": {"n": 5, "delay_seconds": 30.0}, **({"retry": retry} if retry else {})}
    run = client.post("/trigger", json=body).json
    assert run["backend"] == "prefect", run
    flow_run_id = run["prefect_flow_run_id"]
    wait_until(lambda: step_started(stack, flow_run_id), 120, "the flow run's first step started", every=0.5)
    processes = wait_until(lambda: flow_run_processes(flow_run_id), 30, "the flow run's process")
    stack.stop_server()
    try:
        # The worker goes too: it would report the crash once the server is back (its client retries for about a
        # minute), and the point is a flow run nobody reports. restart_server starts a new one, which never knew it.
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(30)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):  # gone with the worker's process group, or exited
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not flow_run_processes(flow_run_id), 30, "the flow run's processes gone")
    finally:
        stack.restart_server()
    back_at = time.monotonic()
    done = wait_until_ended(client, run["status_url"], timeout=300 if retry else 120)
    print(f"\nflow run process killed with Prefect down: run {done['status']} {time.monotonic() - back_at:.1f} s after "
          f"the server was back (worker lease {WORKER_LEASE:g} s)")
    def history() -> list[dict]:
        return sorted(stack.api("GET", f"flow_run_states/?flow_run_id={flow_run_id}"), key=lambda s: s["timestamp"])

    # Prefect is told second (the run's end is written first), best effort: once it answers, it is told.
    told = wait_until(lambda: (states := history())[-1]["type"] != "RUNNING" and states, 30,
                      "Prefect told what became of the flow run", every=0.5)
    states = [state["type"] for state in told]
    if retry is None:
        assert done["status"] == "crashed" and done["backend"] == "prefect", done
        assert done["error"]["code"] == "prefect_crashed" and "process is gone" in done["error"]["message"], done
    else:
        assert done["status"] == "completed" and done["attempt"] == 2, done
        assert done["attempts"][0]["status"] == "crashed" and done["result"]["rows"] == {"numbers": 5}, done
        assert done["prefect_flow_run_id"] != flow_run_id
    # Running until flowgate said what became of it: nobody else did
    assert "RUNNING" in states and states[-1] == "CRASHED" and told[-1]["message"].startswith("flowgate:"), told


def test_a_flow_run_a_worker_claimed_and_never_started_runs_locally_once(stack, gateway):
    """A worker claimed the flow run (PENDING, as a process worker proposes it) and then hung before starting it:
    past FLOWGATE_PREFECT_START_SECONDS the run is taken back and runs here under the same run id, executed once
    (never on Prefect, whose flow run is closed), with its rows."""
    client, services = gateway(prefect_start_seconds=5.0, prefect_pickup_seconds=120.0,
                               prefect_worker_max_age_seconds=120)
    with frozen_worker(stack):
        run = client.post("/trigger", json={"connector_id": "numbers", "params": {"n": 3}}).json
        assert run["backend"] == "prefect", run
        flow_run_id = run["prefect_flow_run_id"]
        claimed = stack.api("POST", f"flow_runs/{flow_run_id}/set_state", json={
            "state": {"type": "PENDING", "name": "Pending"}, "force": False})
        assert claimed["status"] == "ACCEPT", claimed
        claimed_at = time.monotonic()
        done = wait_until_ended(client, run["status_url"], timeout=120)
        print(f"\nclaimed, never started: {done['status']} locally {time.monotonic() - claimed_at:.1f} s after the "
              f"claim (start deadline 5 s)")
    ready = client.get("/api/v1/health/ready").json["checks"]["prefect"]
    assert done["status"] == "completed" and done["backend"] == "local", done
    assert done["fallback_reason"] == "prefect_not_started" and done["prefect_state"] == "Cancelled", done
    assert done["result"]["rows"] == {"numbers": 3} and done["attempt"] == 1
    assert not ran_on_prefect(stack, flow_run_id)
    assert stack.api("GET", f"flow_runs/{flow_run_id}")["state"]["type"] == "CANCELLED"
    assert ready["start_deadline_seconds"] == 5.0
