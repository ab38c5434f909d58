"""The Prefect path when the process worker hangs (SIGSTOP) or races the gateway for a flow run, against a real
Prefect server and worker of this module's own: runs no worker picks up go local exactly once, triggers go local
once the worker's heartbeat is too old, and a flow run taken back or already run is never executed twice."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from app import create_app
from app.backends.prefect_client import CLAIM_MESSAGE
from app.runs.store import NewRun, RunStore
from tests.support.prefect_stack import PrefectStack, deployed_stack, frozen_worker, ran_on_prefect, sync_gateway
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=100)  # started first in the parallel run (conftest.py)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    with deployed_stack(tmp_path_factory.mktemp("prefect"), "flowgate_test_prefect_worker") as stack:
        yield stack


def test_runs_no_worker_picks_up_go_local_once_even_when_the_worker_resumes_at_the_deadline(stack, tmp_path):
    app, services = sync_gateway(stack, tmp_path, prefect_pickup_seconds=4.0, prefect_worker_max_age_seconds=60)
    client = app.test_client()
    try:
        with frozen_worker(stack):
            stranded = [client.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 1}}).json
                        for i in range(2)]
            assert all(run["backend"] == "prefect" for run in stranded)
            moved = [wait_until_ended(client, run["status_url"], timeout=90) for run in stranded]
            ready = client.get("/api/v1/health/ready").json["checks"]["prefect"]
            raced = [client.post("/trigger", json={"connector_id": "numbers", "params": {"n": i + 5}}).json
                     for i in range(3)]
            time.sleep(3.7)  # the worker comes back just as their pickup deadline (4 s) passes
        raced = [wait_until_ended(client, run["status_url"], timeout=120) for run in raced]
    finally:
        services.prefect_sync.stop()
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


def test_a_schedules_slot_no_worker_picks_up_runs_locally_once_under_its_run(stack, tmp_path):
    """A slot is dispatched as a trigger is: with the worker frozen, its flow run waits past the pickup deadline,
    is taken back and runs here under the same run; the slot has that one run, executed once, never on Prefect."""
    stack.deploy(stack.workdir / "with-ticker.yaml")
    app, services = sync_gateway(stack, tmp_path, prefect_pickup_seconds=4.0, prefect_worker_max_age_seconds=60)
    try:
        with frozen_worker(stack):
            services.scheduler.run_once()  # first seen now: the next slot (within 5 s) fires
            fired = wait_until(lambda: services.scheduler.run_once() or services.store.schedules.last_run(
                "connector", "ticker"), 30, "a slot of ticker fired")
            assert (fired.source, fired.backend, fired.fallback_reason) == ("schedule", "prefect", None)
            done = wait_until_ended(app.test_client(), f"/api/v1/runs/{fired.id}", timeout=90)
        slot_runs = [run.id for run in services.store.list(target="ticker") if run.scheduled_for == fired.scheduled_for]
    finally:
        services.prefect_sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()
        stack.deploy(stack.workdir / "deployed.yaml")
    assert done["status"] == "completed" and done["backend"] == "local", done
    assert done["fallback_reason"] == "prefect_not_picked_up" and done["source"] == "schedule"
    assert done["prefect_flow_run_id"] and not ran_on_prefect(stack, done["prefect_flow_run_id"])
    assert slot_runs == [fired.id]


def test_triggers_go_local_once_the_workers_heartbeat_is_older_than_the_liveness_age(stack, tmp_path):
    app, services = sync_gateway(stack, tmp_path, prefect_pickup_seconds=5.0, prefect_worker_max_age_seconds=12)
    services.dispatcher.prefect.route.cache_seconds = 0.5  # a trigger sees what readiness saw, half a second late
    client = app.test_client()

    def workers_online() -> int:
        return client.get("/api/v1/health/ready").json["checks"]["prefect"]["workers_online"]

    def trigger_until(backend: str) -> dict:  # a few triggers at most: each one on Prefect is a flow run
        return wait_until(lambda: (run := client.post("/trigger", json={"connector_id": "numbers"}).json)[
            "backend"] == backend and run, 30, f"a trigger going to {backend}", every=1.0)

    try:
        assert client.post("/trigger", json={"connector_id": "numbers"}).json["backend"] == "prefect"
        with frozen_worker(stack):
            frozen_at = time.monotonic()
            wait_until(lambda: workers_online() == 0, 60, "the frozen worker counted gone", every=0.5)
            run = trigger_until("local")
            went_local_after = time.monotonic() - frozen_at
            ready = client.get("/api/v1/health/ready").json["checks"]["prefect"]
        print(f"\nworker frozen: triggers went local after {went_local_after:.1f} s (liveness age 12 s)")
        assert run["backend"] == "local" and run["fallback_reason"] == "no_worker_online", run
        assert ready["workers_online"] == 0 and ready["workers"]  # listed, but no longer counted alive
        wait_until(workers_online, 60, "the resumed worker's next heartbeat", every=0.5)
        assert trigger_until("prefect")["prefect_flow_run_id"]
    finally:
        services.prefect_sync.stop()
        services.executor.shutdown(timeout=10)
        services.store.dispose()


def test_a_claim_left_on_a_flow_run_a_worker_had_already_run_does_not_run_it_again(stack, tmp_path):
    """A gateway's claim (PENDING, its message flowgate's) can be accepted after a worker ran the whole flow run;
    the claimant then restores the run's end. When that restore never got through (Prefect gone, the gateway
    killed), the flow run is left claimed: the next sync must find the worker's end before the claim, restore it and follow it,
    not take the run back and execute it a second time."""
    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml",
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
            "type": "PENDING", "name": "Pending", "message": CLAIM_MESSAGE},  # a claim whose restore never got through
            "force": True})
        services.prefect_sync.sync_once()
        after = services.store.get(run["run_id"])
        state = stack.api("GET", f"flow_runs/{flow_run_id}")["state"]
        services.prefect_sync.sync_once()
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


def executed_on(stack: PrefectStack, kind: str, run_id: str, store_url: str) -> tuple[dict, list]:
    """A flow run of `kind` for run `run_id`, made as the gateway makes it, on a worker whose run store is
    `store_url`: its end state and its artifacts (a load summary or a workflow document: what ran)."""
    target, params, deployment_name, parameters = WENT_LOCAL[kind]
    deployment = stack.api("GET", f"deployments/name/{deployment_name}")
    flow_run = stack.api("POST", f"deployments/{deployment['id']}/create_flow_run", json={
        "parameters": parameters(run_id), "tags": ["flowgate", f"flowgate-run:{run_id}"],
        "job_variables": {"env": {"DATABASE_URL": store_url}}})
    deadline = time.monotonic() + 120
    while (state := stack.api("GET", f"flow_runs/{flow_run['id']}")["state"])["type"] not in (
            "COMPLETED", "FAILED", "CANCELLED", "CRASHED") and time.monotonic() < deadline:
        time.sleep(0.5)
    return state, stack.api("POST", "artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})


@pytest.mark.parametrize("kind", sorted(WENT_LOCAL))
def test_a_flow_run_a_worker_starts_after_its_run_went_local_does_not_execute(stack, tmp_path, kind):
    """The gateway took a flow run's run back and ran it locally (a claim, or a create left unconfirmed for a
    minute); a worker then started the flow run anyway: seen in the chaos test, one token executed twice. The flow
    must find its run elsewhere and end without running the connector (or the workflow)."""
    target, params, _, _ = WENT_LOCAL[kind]
    store_url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = RunStore(store_url)
    store.create_schema()
    run, _ = store.create_run(NewRun(kind=kind, target=target, params=params, backend="prefect",
                                     concurrency_key=f"{kind}:{target}"))
    store.fall_back_to_local(run.id, "prefect_not_picked_up", prefect_state="Cancelled")
    try:
        state, artifacts = executed_on(stack, kind, run.id, store_url)  # the worker shares this run store
    finally:
        store.dispose()
    assert state["type"] == "CANCELLED" and run.id in state["message"], state
    assert artifacts == []  # no load summary or workflow document: nothing ran


@pytest.mark.parametrize(("kind", "store"), [("connector", "no runs table"), ("workflow", "no row for the run")])
def test_a_flow_run_on_a_worker_whose_run_store_lacks_its_run_does_not_execute(stack, tmp_path, kind, store):
    """A worker whose DATABASE_URL is not the gateways' (its own default SQLite file, another database), or a run
    pruned while its flow run waited: the flow ends Cancelled naming DATABASE_URL, nothing runs (it did: a run
    store without the run read as 'may execute', and the connector's lock held against nobody)."""
    store_url = f"sqlite:///{tmp_path / 'worker-own.db'}"
    if store == "no row for the run":
        other = RunStore(store_url)
        other.create_schema()
        other.dispose()
    state, artifacts = executed_on(stack, kind, "a-run-of-another-store", store_url)
    assert state["type"] == "CANCELLED" and "DATABASE_URL" in state["message"], state
    assert artifacts == []
