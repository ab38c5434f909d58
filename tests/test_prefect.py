"""The Prefect path against a real Prefect server and process worker (one of each for this module)."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx
import pytest

from app import create_app
from app.runs.store import NewRun, RunStore
from tests.fake_services import SlowProxy
from tests.prefect_stack import PrefectStack, fresh_postgres_database
from tests.test_api_triggers import poll_until_ended
from tests.test_pipeline import _events_db
from tests.waiting import wait_until

DEPLOYED = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 10, delay_seconds: 0}}
    dataset: raw
  inc:
    source: {kind: sql_database, url: "sqlite:///events.db", tables: [events], incremental: {cursor: updated_at}}
    destination: {path: shared/inc.duckdb}  # one file both paths write (never at once: one run at a time)
"""
TICKER = """
  ticker:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    dataset: raw
    schedule: {interval: 5}
"""
UNDEPLOYED = """
  undeployed:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 2}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> PrefectStack:
    workdir = tmp_path_factory.mktemp("prefect")
    (workdir / "deployed.yaml").write_text(DEPLOYED)  # no schedule: a 5 s one keeps the worker busy
    (workdir / "with-ticker.yaml").write_text(DEPLOYED + TICKER)
    (workdir / "connectors.yaml").write_text(DEPLOYED + TICKER + UNDEPLOYED)
    stack = PrefectStack(workdir, database_url=fresh_postgres_database("flowgate_test_prefect"))
    try:
        stack.start_server()
        stack.deploy(workdir / "deployed.yaml")
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def gateway(stack: PrefectStack, tmp_path: Path):
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows",
                      "prefect_api_url": stack.api_url, "lease_seconds": 10.0, "poll_seconds": 0.05})
    services = app.extensions["flowgate"]
    services.executor.start()
    services.dispatcher.prefect.route.reprobe_seconds = 0.5
    yield app.test_client()
    services.executor.shutdown(timeout=10)
    services.store.dispose()


def flow_runs(stack: PrefectStack, deployment: str) -> list[dict]:
    dep = stack.api("GET", f"deployments/name/flowgate-connector/{deployment}")
    return stack.api("POST", "flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}}})


def test_deploy_is_idempotent_and_removes_deployments_of_removed_connectors(stack):
    def deployments() -> dict[str, str]:
        found = stack.api("POST", "deployments/filter", json={"flows": {"name": {"any_": ["flowgate-connector"]}}})
        return {d["name"]: d["id"] for d in found}

    before = deployments()
    stack.deploy(stack.workdir / "deployed.yaml")
    assert deployments() == before and set(before) == {"numbers", "inc"}
    stack.deploy(stack.workdir / "with-ticker.yaml")
    try:
        assert set(deployments()) == {"numbers", "inc", "ticker"}
    finally:
        removed = stack.deploy(stack.workdir / "deployed.yaml")
    assert "removed 1: ticker" in removed and deployments() == before


def test_a_trigger_becomes_a_prefect_flow_run_and_shows_its_summary(stack, gateway):
    accepted = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": 4}})
    assert accepted.status_code == 202
    run = accepted.json
    assert run["backend"] == "prefect" and run["prefect_flow_run_id"] and run["fallback_reason"] is None, run
    done = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": 6}, "wait": 120}).json
    first = poll_until_ended(gateway, run["status_url"], timeout=120)  # Prefect may have run the other first
    for finished, rows in ((first, 4), (done, 6)):
        assert finished["status"] == "completed" and finished["prefect_state"] == "Completed", finished
        assert finished["result"]["rows"] == {"numbers": rows} and finished["result"]["load_ids"]
    with duckdb.connect(done["result"]["location"], read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.numbers").fetchone()[0] >= 10
    flow_run = stack.api("GET", f"flow_runs/{run['prefect_flow_run_id']}")
    task_runs = stack.api("POST", "task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert {t["name"].split("-")[0] for t in task_runs} >= {"extract", "normalize", "load"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # log lines reach Prefect's server a moment after the run ends
        logs = gateway.get(f"/api/v1/runs/{run['run_id']}/logs").json
        if any("Finished in state Completed" in line["message"] for line in logs["items"]):
            break
        time.sleep(0.5)
    assert logs["source"] == "prefect" and any("Finished in state Completed" in line["message"]
                                               for line in logs["items"]), logs


def test_incremental_state_carries_over_between_the_prefect_and_the_local_path(stack, gateway):
    def run(backend: str) -> dict:
        accepted = gateway.post("/trigger", json={"connector_id": "inc", "backend": backend}).json
        done = poll_until_ended(gateway, accepted["status_url"], timeout=120)
        assert done["status"] == "completed" and done["backend"] == backend, done
        return done["result"]["rows"]

    _events_db(stack.workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(20)])
    assert run("prefect") == {"events": 20}
    _events_db(stack.workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i:02d}") for i in range(20, 25)])
    assert run("local") == {"events": 5}  # the cursor the worker left in the destination
    _events_db(stack.workdir / "events.db", [(25, "new", "2025-01-03T00:00:00")])
    assert run("prefect") == {"events": 1}


TERMINAL_STATUSES = ("completed", "failed", "cancelled", "crashed")
FAN_OUT = {
    # `pause` is long enough for its task run's state to reach Prefect's server (through its event stream, seconds
    # late on a busy machine) while it still runs: the test checks that progress shows while a run goes on.
    "nodes": [{"id": "start", "type": "trigger"}, {"id": "pause", "type": "delay", "config": {"seconds": 6}},
              {"id": "check", "type": "condition", "config": {"value": "{{ inputs.text | length > 2 }}"}},
              *({"id": f"llm{i}", "type": "llm", "config": {"prompt": f"take {i}: {{{{ inputs.text }}}}"}} for i in range(3)),
              {"id": "short", "type": "output", "config": {"value": "too short"}},
              {"id": "join", "type": "join"}, {"id": "out", "type": "output"}],
    "connections": [{"from": "start", "to": "pause"}, {"from": "pause", "to": "check"}, {"from": "check", "to": "short", "branch": "false"},
                    *({"from": "check", "to": f"llm{i}", "branch": "true"} for i in range(3)),
                    *({"from": f"llm{i}", "to": "join"} for i in range(3)), {"from": "join", "to": "out"}],
}


def test_a_workflow_runs_as_a_prefect_flow_with_a_task_per_node_and_the_same_result_as_locally(stack, gateway):
    executions = {}
    for backend in ("prefect", "local"):
        accepted = gateway.post("/api/workflow/fan/execute", json={"workflow": FAN_OUT, "inputs": {"text": "hello"},
                                                                   "backend": backend})
        assert accepted.status_code == 202 and accepted.json["backend"] == backend, accepted.json
        live = []  # node states seen while the execution was running
        deadline = time.monotonic() + 120
        while (doc := gateway.get(accepted.json["statusUrl"]).json)["status"] not in TERMINAL_STATUSES:
            if doc["status"] == "running":
                live.append({n["id"]: n["status"] for n in doc["nodes"]})
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert any(nodes["pause"] == "running" for nodes in live), live  # progress shows while it runs
        executions[backend] = doc
    prefect, local = executions["prefect"], executions["local"]
    assert prefect["status"] == local["status"] == "completed", prefect
    assert prefect["outputs"] == local["outputs"] and prefect["layers"] == local["layers"]
    assert [(n["id"], n["status"], n["output"]) for n in prefect["nodes"]] == \
           [(n["id"], n["status"], n["output"]) for n in local["nodes"]]
    assert {n["id"]: n["status"] for n in prefect["nodes"]}["short"] == "skipped"
    expected = {"start", "pause", "check", "llm0", "llm1", "llm2", "join", "out"}  # `short` was skipped: no task
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # task runs reach the server through Prefect's event stream, a little later
        task_runs = stack.api("POST", "task_runs/filter",
                              json={"flow_runs": {"id": {"any_": [prefect["prefectFlowRunId"]]}}})
        names = {t["name"].split(" (")[0] for t in task_runs}
        if names == expected:
            break
        time.sleep(0.5)
    assert names == expected


def test_the_same_idempotency_key_gives_one_flow_run(stack, gateway):
    headers = {"Idempotency-Key": "prefect-once"}
    first = gateway.post("/trigger", json={"connector_id": "numbers"}, headers=headers).json
    again = gateway.post("/trigger", json={"connector_id": "numbers"}, headers=headers).json
    assert first["run_id"] == again["run_id"] and first["prefect_flow_run_id"] == again["prefect_flow_run_id"]
    tagged = stack.api("POST", "flow_runs/filter",
                       json={"flow_runs": {"tags": {"all_": [f"flowgate-run:{first['run_id']}"]}}})
    assert len(tagged) == 1


def test_a_connector_without_a_deployment_runs_locally_with_the_reason(gateway):
    done = gateway.post("/trigger", json={"connector_id": "undeployed", "wait": 60}).json
    assert done["backend"] == "local" and done["fallback_reason"] == "no_deployment"
    assert done["status"] == "completed" and done["result"]["rows"] == {"numbers": 2}


def test_readiness_reports_prefect_pool_and_workers(gateway):
    prefect = gateway.get("/api/v1/health/ready").json["checks"]["prefect"]
    assert prefect["status"] == "up" and prefect["circuit"] == "closed"
    assert prefect["work_pool"] == "flowgate" and prefect["workers_online"] >= 1 and prefect["latency_ms"] > 0


def test_an_interval_schedule_is_run_by_the_worker(stack):
    stack.deploy(stack.workdir / "with-ticker.yaml")
    try:
        deployment = stack.api("GET", "deployments/name/flowgate-connector/ticker")
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["schedules"][0]["schedule"]["interval"] == 5
        wait_until(lambda: any(r["state"]["type"] == "COMPLETED" for r in flow_runs(stack, "ticker")), 90,
                   "a scheduled run completed")
    finally:  # a 5 s schedule keeps the worker and the server's database busy: gone for the other tests
        stack.deploy(stack.workdir / "deployed.yaml")


def test_cancel_goes_to_prefects_cancellation(gateway):
    run = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"delay_seconds": 60.0}}).json
    assert run["backend"] == "prefect"
    wait_until(lambda: gateway.get(run["status_url"]).json["status"] == "running", 90, "the flow run ran")
    cancel = gateway.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert cancel.status_code == 202 and cancel.json["status"] == "cancelling"
    done = poll_until_ended(gateway, run["status_url"], timeout=90)
    assert done["status"] == "cancelled" and done["prefect_state"] == "Cancelled"


def test_a_dead_prefect_costs_one_short_timeout_then_triggers_go_local_and_back(stack, gateway):
    stack.stop_server()
    try:
        started = time.perf_counter()
        first = gateway.post("/trigger", json={"connector_id": "numbers"})
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        second = gateway.post("/trigger", json={"connector_id": "numbers"})
        second_seconds = time.perf_counter() - started
        print(f"\nPrefect down: first trigger {first_seconds * 1000:.0f} ms, with the circuit open "
              f"{second_seconds * 1000:.0f} ms")
        assert first.status_code == second.status_code == 202
        assert first.json["backend"] == second.json["backend"] == "local"
        assert first.json["fallback_reason"] == "prefect_unreachable"
        assert second.json["fallback_reason"] == "prefect_circuit_open"
        forced = gateway.post("/trigger", json={"connector_id": "numbers", "backend": "prefect"})
        assert forced.status_code == 503 and forced.json["code"] == "prefect_unavailable"
        ready = gateway.get("/api/v1/health/ready")
        assert ready.status_code == 200 and ready.json["checks"]["prefect"]["circuit"] == "open"
        done = gateway.post("/trigger", json={"connector_id": "numbers", "wait": 60}).json
        assert done["status"] == "completed" and done["backend"] == "local"
    finally:
        stack.start_server()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        back = gateway.post("/trigger", json={"connector_id": "numbers"}).json
        if back["backend"] == "prefect":
            break
        time.sleep(0.5)
    assert back["backend"] == "prefect" and back["prefect_flow_run_id"]


def test_the_background_sync_follows_every_unfinished_run_in_one_call(stack, gateway):
    ids = [gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 1}}).json["run_id"]
           for i in range(2)]
    dispatcher = gateway.application.extensions["flowgate"].dispatcher
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dispatcher.prefect.sync.run_once()
        runs = [dispatcher.store.get(i) for i in ids]
        if all(r.is_terminal for r in runs):
            break
        time.sleep(1)
    assert [r.status for r in runs] == ["completed", "completed"], [(r.backend, r.status) for r in runs]
    assert [r.result["rows"] for r in runs] == [{"numbers": 1}, {"numbers": 2}]


def tagged_flow_runs(stack: PrefectStack, run_id: str) -> list[dict]:
    return stack.api("POST", "flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"flowgate-run:{run_id}"]}}})


def test_a_create_whose_answer_is_late_is_found_again_and_runs_once_on_prefect(stack, tmp_path):
    """Prefect creates the flow run but answers after the gateway's timeout: the run must not also run locally."""
    proxy = SlowProxy(stack.api_url.removesuffix("/api"), slow_path="/create_flow_run", delay=4.0)
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": f"{proxy.url}/api",
                      "prefect_timeout_seconds": 1.5, "lease_seconds": 10.0, "poll_seconds": 0.05})
    services = app.extensions["flowgate"]
    services.executor.start()
    services.dispatcher.prefect.sync.start(every_seconds=0.5)
    client = app.test_client()
    try:
        for mode in ("auto", "prefect"):
            accepted = client.post("/trigger", json={"connector_id": "numbers", "params": {"n": 3},
                                                     "backend": mode})
            assert accepted.status_code == 202, accepted.json
            run = accepted.json
            assert run["backend"] == "prefect" and run["fallback_reason"] is None, run
            done = poll_until_ended(client, run["status_url"], timeout=120)
            assert done["status"] == "completed" and done["backend"] == "prefect", done
            assert done["result"]["rows"] == {"numbers": 3}
            assert len(tagged_flow_runs(stack, run["run_id"])) == 1
        assert proxy.slowed >= 2
        assert services.store.count_by_status() == {}  # nothing ever ran locally
    finally:
        services.dispatcher.prefect.sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()
        proxy.stop()


def test_a_run_accepted_but_never_handed_to_prefect_is_dispatched_by_the_sync(stack, gateway):
    """The process died between storing the run and creating its flow run: any process's sync dispatches it."""
    services = gateway.application.extensions["flowgate"]
    orphan, _ = services.store.create_run(NewRun(kind="connector", target="numbers", params={"n": 4},
                                                 backend="prefect", concurrency_key="connector:numbers"))
    services.dispatcher.prefect.sync.start(every_seconds=0.5)
    try:
        deadline = time.monotonic() + 120
        while not (run := services.store.get(orphan.id)).is_terminal and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        services.dispatcher.prefect.sync.stop()
    assert run.status == "completed" and run.backend == "prefect" and run.prefect_flow_run_id, run.error
    assert run.result["rows"] == {"numbers": 4}
    assert len(tagged_flow_runs(stack, orphan.id)) == 1


def test_a_cancel_prefect_does_not_confirm_changes_nothing_and_the_run_is_still_followed(stack, tmp_path):
    proxy = SlowProxy(stack.api_url.removesuffix("/api"), fail_path="/set_state")
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": f"{proxy.url}/api",
                      "lease_seconds": 10.0, "poll_seconds": 0.05})
    services = app.extensions["flowgate"]
    client = app.test_client()
    try:
        run = client.post("/trigger", json={"connector_id": "numbers", "params": {"delay_seconds": 20.0}}).json
        assert run["backend"] == "prefect" and run["prefect_flow_run_id"]
        refused = client.post(f"/api/v1/runs/{run['run_id']}/cancel")
        assert refused.status_code == 503 and refused.json["code"] == "prefect_unavailable"
        after = client.get(run["status_url"]).json
        assert after["status"] in ("queued", "running") and after["status"] != "cancelled"
        proxy.fail_path = None  # Prefect answers again
        cancel = client.post(f"/api/v1/runs/{run['run_id']}/cancel")
        assert cancel.status_code in (200, 202), cancel.json
        done = poll_until_ended(client, run["status_url"], timeout=120)
        assert done["status"] == "cancelled", done
        flow_run = stack.api("GET", f"flow_runs/{run['prefect_flow_run_id']}")
        assert flow_run["state"]["type"] in ("CANCELLED", "CANCELLING")
    finally:
        services.store.dispose()
        proxy.stop()


@contextmanager
def frozen_worker(stack: PrefectStack):
    """The process worker hung (SIGSTOP): Prefect still counts it online until its heartbeat ages out.

    Frozen only once no earlier test's flow run is active: one it had just picked up would hold the deployment's
    concurrency slot while frozen, and Prefect refuses every claim of the deployment's runs (PENDING) until the
    slot frees, so no run could be taken back. Those that do not end within a minute are cancelled."""
    def active() -> list[dict]:
        return stack.api("POST", "flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": [
            "PENDING", "RUNNING", "CANCELLING"]}}}})

    deadline = time.monotonic() + 60
    while active() and time.monotonic() < deadline:
        time.sleep(0.5)
    for flow_run in active():
        try:
            stack.api("POST", f"flow_runs/{flow_run['id']}/set_state", json={"state": {
                "type": "CANCELLED", "name": "Cancelled", "message": "left active by an earlier test"}, "force": True})
        except httpx.HTTPStatusError:  # Prefect refused (500 seen): the test goes on, as it did before this cleanup
            pass
    os.killpg(stack.worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(stack.worker.pid, signal.SIGCONT)


def ran_on_prefect(stack: PrefectStack, flow_run_id: str) -> bool:
    states = stack.api("GET", f"flow_run_states/?flow_run_id={flow_run_id}")
    return any(state["type"] == "RUNNING" for state in states)


def pickup_gateway(stack: PrefectStack, tmp_path: Path, **settings):
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": stack.api_url,
                      # a lease long enough for a machine this busy: a stalled heartbeat must not free the key
                      "lease_seconds": 15.0, "poll_seconds": 0.05, **settings})
    services = app.extensions["flowgate"]
    services.executor.start()
    services.dispatcher.prefect.sync.start(every_seconds=0.5)
    return app, services


def test_runs_no_worker_picks_up_go_local_once_even_when_the_worker_resumes_at_the_deadline(stack, tmp_path):
    app, services = pickup_gateway(stack, tmp_path, prefect_pickup_seconds=4.0, prefect_worker_max_age_seconds=60)
    client = app.test_client()
    try:
        with frozen_worker(stack):
            stranded = [client.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 1}}).json
                        for i in range(2)]
            assert all(run["backend"] == "prefect" for run in stranded)
            moved = [poll_until_ended(client, run["status_url"], timeout=90) for run in stranded]
            ready = client.get("/api/v1/health/ready").json["checks"]["prefect"]
            raced = [client.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 5}}).json
                     for i in range(3)]
            time.sleep(3.7)  # the worker comes back just as their pickup deadline (4 s) passes
        raced = [poll_until_ended(client, run["status_url"], timeout=120) for run in raced]
    finally:
        services.dispatcher.prefect.sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()
    for run in moved:  # no worker while they waited: taken back, run here, never on Prefect
        assert run["status"] == "completed" and run["backend"] == "local", run
        assert run["fallback_reason"] == "prefect_not_picked_up" and run["prefect_state"] == "Cancelled"
        assert run["prefect_flow_run_id"] and not ran_on_prefect(stack, run["prefect_flow_run_id"])
    assert ready["worker_max_age_seconds"] == 60 and "runs_awaiting_pickup" in ready
    for run in raced:  # whoever won the race for each run, it executed exactly once
        assert run["status"] == "completed", run
        history = [(s["type"], s["name"], s["timestamp"]) for s in
                   stack.api("GET", f"flow_run_states/?flow_run_id={run['prefect_flow_run_id']}")]
        assert (run["backend"] == "local") != ran_on_prefect(stack, run["prefect_flow_run_id"]), (run, history)
    print(f"\nraced at the deadline: {sum(r['backend'] == 'local' for r in raced)} local, "
          f"{sum(r['backend'] == 'prefect' for r in raced)} on the resumed worker")


def test_triggers_go_local_once_the_workers_heartbeat_is_older_than_the_liveness_age(stack, tmp_path):
    app, services = pickup_gateway(stack, tmp_path, prefect_pickup_seconds=5.0, prefect_worker_max_age_seconds=12)
    client = app.test_client()
    try:
        assert client.post("/trigger", json={"connector_id": "numbers"}).json["backend"] == "prefect"
        with frozen_worker(stack):
            frozen_at = time.monotonic()
            while time.monotonic() - frozen_at < 60:
                run = client.post("/trigger", json={"connector_id": "numbers"}).json
                if run["backend"] == "local":
                    break
                time.sleep(0.5)
            went_local_after = time.monotonic() - frozen_at
            ready = client.get("/api/v1/health/ready").json["checks"]["prefect"]
        print(f"\nworker frozen: triggers went local after {went_local_after:.1f} s (liveness age 12 s)")
        assert run["backend"] == "local" and run["fallback_reason"] == "no_worker_online", run
        assert ready["workers_online"] == 0 and ready["workers"]  # listed, but no longer counted alive
        deadline = time.monotonic() + 60  # resumed: its next heartbeat brings triggers back to Prefect
        while time.monotonic() < deadline:
            back = client.post("/trigger", json={"connector_id": "numbers"}).json
            if back["backend"] == "prefect":
                break
            time.sleep(1)
        assert back["backend"] == "prefect"
    finally:
        services.dispatcher.prefect.sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()


def test_a_claim_left_on_a_flow_run_a_worker_had_already_run_does_not_run_it_again(stack, tmp_path):
    """A gateway's claim (PENDING "Reclaimed") can be accepted after a worker ran the whole flow run; the claimant
    then restores the run's end. When that restore never got through (Prefect gone, the gateway killed), the flow
    run is left Reclaimed: the next sync must find the worker's end before the claim, restore it and follow it,
    not take the run back and execute it a second time."""
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": stack.api_url,
                      "prefect_pickup_seconds": 0.5, "prefect_timeout_seconds": 20})
    services = app.extensions["flowgate"]  # neither executor nor sync started: the test drives the sync
    try:
        run = app.test_client().post("/trigger", json={"connector_id": "numbers", "backend": "prefect"}).json
        flow_run_id = run["prefect_flow_run_id"]
        deadline = time.monotonic() + 120
        while stack.api("GET", f"flow_runs/{flow_run_id}")["state"]["type"] != "COMPLETED":
            assert time.monotonic() < deadline, "the worker did not run the flow run"
            time.sleep(0.5)
        stack.api("POST", f"flow_runs/{flow_run_id}/set_state", json={"state": {
            "type": "PENDING", "name": "Reclaimed", "message": "a claim whose restore never got through"},
            "force": True})
        services.dispatcher.prefect.sync.run_once()
        after = services.store.get(run["run_id"])
        state = stack.api("GET", f"flow_runs/{flow_run_id}")["state"]
        services.dispatcher.prefect.sync.run_once()
        followed = services.store.get(run["run_id"])
    finally:
        services.store.dispose()
    assert after.backend == "prefect" and after.fallback_reason is None, after
    assert state["type"] == "COMPLETED"
    assert followed.status == "completed" and followed.backend == "prefect"


WENT_LOCAL = {  # per kind: the run's target and params, the deployment, the flow run's parameters
    "connector": ("numbers", {"n": 2}, "flowgate-connector/numbers",
                  lambda run_id: {"connector_id": "numbers", "params": {"n": 2}}),
    "workflow": ("wf", {"workflow": {"id": "wf", "nodes": [{"id": "start", "type": "trigger"}]}, "inputs": {}},
                 "flowgate-workflow/workflow",
                 lambda run_id: {"run_id": run_id, "workflow": {"id": "wf", "nodes": [{"id": "start", "type": "trigger"}]}}),
}


@pytest.mark.parametrize("kind", sorted(WENT_LOCAL))
def test_a_flow_run_a_worker_starts_after_its_run_went_local_does_not_execute(stack, tmp_path, kind):
    """The gateway claimed a flow run back (no worker in time), moved its run local and closed the flow run as
    Cancelled; a worker's claim sent before and answered after (Prefect grants PENDING from an ended state) then
    started it anyway: seen in the chaos test, one token executed twice. The flow must find its run elsewhere
    and end without running the connector (or the workflow)."""
    target, params, deployment_name, parameters = WENT_LOCAL[kind]
    store_url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = RunStore(store_url)
    store.create_schema()
    run, _ = store.create_run(NewRun(kind=kind, target=target, params=params, backend="prefect",
                                     concurrency_key=f"{kind}:{target}"))
    store.fall_back_to_local(run.id, "prefect_not_picked_up", prefect_state="Cancelled")
    deployment = stack.api("GET", f"deployments/name/{deployment_name}")
    flow_run = stack.api("POST", f"deployments/{deployment['id']}/create_flow_run", json={
        "parameters": parameters(run.id), "tags": ["flowgate", f"flowgate-run:{run.id}"],
        "job_variables": {"env": {"DATABASE_URL": store_url}}})  # the worker shares this run store
    try:
        deadline = time.monotonic() + 120
        while (state := stack.api("GET", f"flow_runs/{flow_run['id']}")["state"])["type"] not in (
                "COMPLETED", "FAILED", "CANCELLED", "CRASHED") and time.monotonic() < deadline:
            time.sleep(0.5)
        artifacts = stack.api("POST", "artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    finally:
        store.dispose()
    assert state["type"] == "CANCELLED" and run.id in state["message"], state
    assert artifacts == []  # no load summary or workflow document: nothing ran
