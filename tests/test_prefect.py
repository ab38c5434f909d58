"""The Prefect path against a real Prefect server and process worker (one of each for this module); a worker
that hangs or races the gateway is in test_prefect_worker_faults.py."""
from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from app import create_app
from app.runs.models import utcnow
from app.runs.store import NewRun
from flows.outcome import TERMINAL
from tests.support.fake_services import SlowProxy
from tests.support.incremental import events_db
from tests.support.prefect_stack import PrefectStack, deployed_stack
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=250)  # started first in the parallel run (conftest.py)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    with deployed_stack(tmp_path_factory.mktemp("prefect"), "flowgate_test_prefect") as stack:
        yield stack


@pytest.fixture
def gateway(stack: PrefectStack, tmp_path: Path):
    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml",
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


def test_deploy_is_idempotent_registers_no_schedule_and_a_removed_connector_is_undeployed(stack, gateway):
    def deployments() -> dict[str, str]:
        found = stack.api("POST", "deployments/filter", json={"flows": {"name": {"any_": ["flowgate-connector"]}}})
        return {d["name"]: d["id"] for d in found}

    before = deployments()  # the module's deploy of deployed.yaml
    assert set(before) == {"numbers", "inc", "flaky"}
    said = stack.deploy(stack.workdir / "with-ticker.yaml")
    try:
        assert "schedules: none registered in Prefect" in said and "(ticker)" in said
        assert set(deployments()) == {"numbers", "inc", "flaky", "ticker"}
        ticker = stack.api("GET", "deployments/name/flowgate-connector/ticker")
        assert ticker["global_concurrency_limit"]["limit"] == 1
        assert ticker["schedules"] == []  # the gateway fires ticker's 5 s schedule, so no slot can run twice
        # The gateway's scheduler fires a slot: a flow run of the deployment, created by flowgate and tagged.
        services = gateway.application.extensions["flowgate"]
        services.scheduler.run_once()  # first seen now: from here on
        run = wait_until(lambda: services.scheduler.run_once() or services.store.schedules.last_run(
            "connector", "ticker"), 30, "a slot of ticker fired")
        assert (run.source, run.backend, run.fallback_reason) == ("schedule", "prefect", None)
        flow_run = stack.api("GET", f"flow_runs/{run.prefect_flow_run_id}")
        assert {"flowgate", "flowgate-schedule", f"flowgate-schedule:{run.scheduled_for.isoformat()}"} <= \
            set(flow_run["tags"])
        done = wait_until_ended(gateway, f"/api/v1/runs/{run.id}", timeout=120)
        assert done["status"] == "completed" and done["result"]["rows"] == {"numbers": 1}, done
    finally:  # gone for the other tests
        removed = stack.deploy(stack.workdir / "deployed.yaml")
    assert "removed 1: ticker" in removed
    assert deployments() == before  # deployed twice: the same deployments, updated in place


def test_a_trigger_becomes_a_prefect_flow_run_and_shows_its_summary(stack, gateway):
    accepted = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": 4}})
    assert accepted.status_code == 202
    run = accepted.json
    assert run["backend"] == "prefect" and run["prefect_flow_run_id"] and run["fallback_reason"] is None, run
    done = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": 6}, "wait": 120}).json
    first = wait_until_ended(gateway, run["status_url"], timeout=120)  # Prefect may have run the other first
    for finished, rows in ((first, 4), (done, 6)):
        assert finished["status"] == "completed" and finished["prefect_state"] == "Completed", finished
        assert finished["result"]["rows"] == {"numbers": rows} and finished["result"]["load_ids"]
    with duckdb.connect(str(stack.workdir / done["result"]["location"]), read_only=True) as con:
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
    windows = []

    def run(backend: str) -> dict:
        accepted = gateway.post("/trigger", json={"connector_id": "inc", "backend": backend}).json
        done = wait_until_ended(gateway, accepted["status_url"], timeout=120)
        assert done["status"] == "completed" and done["backend"] == backend, done
        windows.append(done["result"]["incremental"]["events"])  # the same result document on both paths
        return done["result"]["rows"]

    events_db(stack.workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(20)])
    assert run("prefect") == {"events": 20}
    events_db(stack.workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i:02d}") for i in range(20, 25)])
    assert run("local") == {"events": 5}  # the cursor the worker left in the destination
    events_db(stack.workdir / "events.db", [(25, "new", "2025-01-03T00:00:00")])
    assert run("prefect") == {"events": 1}
    assert [(w["from"], w["to"], w["rows"]) for w in windows] == [
        (None, "2025-01-01T00:00:19", 20), ("2025-01-01T00:00:19", "2025-01-02T00:00:24", 5),
        ("2025-01-02T00:00:24", "2025-01-03T00:00:00", 1)]


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
        while (doc := gateway.get(accepted.json["statusUrl"]).json)["status"] not in TERMINAL:
            if doc["status"] == "running":
                live.append({n["id"]: n["status"] for n in doc["nodes"]})
            assert time.monotonic() < deadline, doc
            time.sleep(0.25)  # each GET of a Prefect run reads its flow run from Prefect
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


def test_a_flow_run_started_by_hand_in_prefect_becomes_one_run_followed_to_its_end(stack, gateway, tmp_path):
    """As Prefect's UI ("Quick run") or `prefect deployment run flowgate-connector/numbers` start one: a flow run of
    a flowgate deployment that no gateway created. Two gateway processes look for it at once; it is adopted once
    (source `prefect`), and its run ends with the flow run's result."""
    deployment = stack.api("GET", "deployments/name/flowgate-connector/numbers")
    flow_run = stack.api("POST", f"deployments/{deployment['id']}/create_flow_run", json={})
    other = create_app({"var_dir": tmp_path / "other", "database_url": stack.run_store_url,
                        "connectors_file": stack.workdir / "connectors.yaml", "workflows_dir": stack.workdir / "workflows",
                        "prefect_api_url": stack.api_url})
    syncs = [gateway.application.extensions["flowgate"].prefect_sync, other.extensions["flowgate"].prefect_sync]
    with ThreadPoolExecutor(2) as pool:
        adopted = [run for made in pool.map(lambda sync: sync.adopt_once(), syncs) for run in made]
    other.extensions["flowgate"].store.dispose()
    [run] = [run for run in adopted if run.prefect_flow_run_id == flow_run["id"]]
    assert (run.kind, run.target, run.source, run.backend, run.triggered_by) == (
        "connector", "numbers", "prefect", "prefect", "prefect")
    listed = gateway.get("/api/v1/runs", query_string={"source": "prefect", "connector_id": "numbers"}).json["items"]
    assert [item["run_id"] for item in listed if item.get("prefect_flow_run_id") == flow_run["id"]] == [run.id]
    done = wait_until_ended(gateway, f"/api/v1/runs/{run.id}", timeout=120)
    assert done["status"] == "completed" and done["result"]["rows"] == {"numbers": 10}, done
    assert syncs[0].adopt_once() == []  # seen again: already a run


def test_a_transient_failure_on_prefect_is_retried_as_a_new_flow_run_of_the_same_run(stack, gateway, tmp_path):
    """The connector's source refuses its first connection (transient) on the Prefect worker; its policy retries
    it: attempt 2 is a new flow run of the same run id, made by the sync when due, and completes there."""
    services = gateway.application.extensions["flowgate"]
    services.prefect_sync.every = 0.5
    services.prefect_sync.start()
    try:
        run = gateway.post("/trigger", json={"connector_id": "flaky",
                                             "params": {"counter": str(tmp_path / "runs.count")}}).json
        assert run["backend"] == "prefect", run
        done = wait_until_ended(gateway, run["status_url"], timeout=180)
    finally:
        services.prefect_sync.stop()
    # Attempt 2 completes; on a busy machine a later one may (attempt 2 cut off by something else transient).
    assert (done["status"], done["backend"]) == ("completed", "prefect") and done["attempt"] >= 2, done
    first, *_, last = done["attempts"]
    assert (first["status"], first["backend"], first["error"]["failure_class"]) == ("failed", "prefect", "transient")
    assert last["status"] == "completed" and last["prefect_flow_run_id"] not in (None, first["prefect_flow_run_id"])
    assert int((tmp_path / "runs.count").read_text()) >= 2  # the source ran again after its first failure


def test_the_same_idempotency_key_gives_one_flow_run(stack, gateway):
    headers = {"Idempotency-Key": "prefect-once"}
    first = gateway.post("/trigger", json={"connector_id": "numbers"}, headers=headers).json
    again = gateway.post("/trigger", json={"connector_id": "numbers"}, headers=headers).json
    assert first["run_id"] == again["run_id"] and first["prefect_flow_run_id"] == again["prefect_flow_run_id"]
    tagged = stack.api("POST", "flow_runs/filter",
                       json={"flow_runs": {"tags": {"all_": [f"flowgate-run:{first['run_id']}"]}}})
    assert len(tagged) == 1


def test_a_key_used_again_after_retention_pruned_its_run_makes_a_new_flow_run_that_executes(gateway):
    """Prefect keeps a flow run's idempotency key for good, flowgate a caller's only as long as the run: a key
    Prefect knew gave the new run the old flow run back, recorded completed without executing."""
    trigger = {"connector_id": "numbers", "params": {"n": 3}, "wait": 120}
    headers = {"Idempotency-Key": "nightly-numbers"}
    first = gateway.post("/trigger", json=trigger, headers=headers).json
    assert first["status"] == "completed" and first["backend"] == "prefect", first
    services = gateway.application.extensions["flowgate"]
    assert services.store.retention.prune(utcnow() + timedelta(seconds=1)) >= 1  # as FLOWGATE_RETENTION_DAYS would
    again = gateway.post("/trigger", json=trigger, headers=headers).json
    assert again["run_id"] != first["run_id"]
    done = wait_until_ended(gateway, again["status_url"], timeout=120)
    assert done["status"] == "completed" and done["backend"] == "prefect", done
    assert done["prefect_flow_run_id"] != first["prefect_flow_run_id"]
    assert done["result"]["rows"] == {"numbers": 3} and set(done["result"]["load_ids"]).isdisjoint(
        first["result"]["load_ids"])  # it ran: a load of its own


def test_a_connector_without_a_deployment_runs_locally_with_the_reason(gateway):
    done = gateway.post("/trigger", json={"connector_id": "undeployed", "wait": 60}).json
    assert done["backend"] == "local" and done["fallback_reason"] == "no_deployment"
    assert done["status"] == "completed" and done["result"]["rows"] == {"numbers": 2}


def test_readiness_reports_prefect_pool_and_workers(gateway):
    prefect = gateway.get("/api/v1/health/ready").json["checks"]["prefect"]
    assert prefect["status"] == "up" and prefect["circuit"] == "closed"
    assert prefect["work_pool"] == "flowgate" and prefect["workers_online"] >= 1 and prefect["latency_ms"] > 0


def test_cancel_goes_to_prefects_cancellation(gateway):
    run = gateway.post("/trigger", json={"connector_id": "numbers", "params": {"delay_seconds": 60.0}}).json
    assert run["backend"] == "prefect"
    wait_until(lambda: gateway.get(run["status_url"]).json["status"] == "running", 90, "the flow run ran")
    cancel = gateway.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert cancel.status_code == 202 and cancel.json["status"] == "cancelling"
    done = wait_until_ended(gateway, run["status_url"], timeout=90)
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
        done = gateway.post("/trigger", json={"connector_id": "numbers", "wait": 180}).json  # behind two local runs
        assert done["status"] == "completed" and done["backend"] == "local"
    finally:
        stack.restart_server()
    wait_until(lambda: gateway.get("/api/v1/health/ready").json["checks"]["prefect"]["status"] == "up", 120,
               "the re-probe closed the circuit")

    def on_prefect() -> dict | None:
        run = gateway.post("/trigger", json={"connector_id": "numbers"}).json
        return run if run["backend"] == "prefect" else None

    assert wait_until(on_prefect, 60, "a trigger went to Prefect", every=1)["prefect_flow_run_id"]


def test_the_background_sync_follows_every_unfinished_run_in_one_call(stack, gateway):
    ids = [gateway.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 1}}).json["run_id"]
           for i in range(2)]
    services = gateway.application.extensions["flowgate"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        services.prefect_sync.sync_once()
        runs = [services.store.get(i) for i in ids]
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
    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": f"{proxy.url}/api",
                      "prefect_timeout_seconds": 1.5, "lease_seconds": 10.0, "poll_seconds": 0.05})
    services = app.extensions["flowgate"]
    services.executor.start()
    services.prefect_sync.every = 0.5
    services.prefect_sync.start()
    client = app.test_client()
    try:
        for mode in ("auto", "prefect"):
            accepted = client.post("/trigger", json={"connector_id": "numbers", "params": {"n": 3},
                                                     "backend": mode})
            assert accepted.status_code == 202, accepted.json
            run = accepted.json
            assert run["backend"] == "prefect" and run["fallback_reason"] is None, run
            done = wait_until_ended(client, run["status_url"], timeout=120)
            assert done["status"] == "completed" and done["backend"] == "prefect", done
            assert done["result"]["rows"] == {"numbers": 3}
            assert len(tagged_flow_runs(stack, run["run_id"])) == 1
        assert proxy.slowed >= 2
        assert services.store.count_by_status() == {}  # nothing ever ran locally
    finally:
        services.prefect_sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()
        proxy.stop()


def test_a_run_accepted_but_never_handed_to_prefect_is_dispatched_by_the_sync(stack, gateway):
    """The process died between storing the run and creating its flow run: any process's sync dispatches it."""
    services = gateway.application.extensions["flowgate"]
    orphan, _ = services.store.create_run(NewRun(kind="connector", target="numbers", params={"n": 4},
                                                 backend="prefect", concurrency_key="connector:numbers"))
    services.prefect_sync.every = 0.5
    services.prefect_sync.start()
    try:
        deadline = time.monotonic() + 120
        while not (run := services.store.get(orphan.id)).is_terminal and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        services.prefect_sync.stop()
    assert run.status == "completed" and run.backend == "prefect" and run.prefect_flow_run_id, run.error
    assert run.result["rows"] == {"numbers": 4}
    assert len(tagged_flow_runs(stack, orphan.id)) == 1


def test_a_cancel_prefect_does_not_confirm_changes_nothing_and_the_run_is_still_followed(stack, tmp_path):
    proxy = SlowProxy(stack.api_url.removesuffix("/api"), fail_path="/set_state")
    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml",
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
        done = wait_until_ended(client, run["status_url"], timeout=120)
        assert done["status"] == "cancelled", done
        flow_run = stack.api("GET", f"flow_runs/{run['prefect_flow_run_id']}")
        assert flow_run["state"]["type"] in ("CANCELLED", "CANCELLING")
    finally:
        services.store.dispose()
        proxy.stop()
