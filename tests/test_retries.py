"""Retries by failure class: the same run id goes back to `queued` with its next attempt's number and start time,
on every path that ends a run (the executor, a dead worker, a lapsed lease, Prefect), and its callback fires once."""
from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import respx
from sqlalchemy import update

from app.backends.prefect import PrefectBackend
from app.backends.prefect_client import PrefectClient
from app.backends.prefect_route import PrefectRoute
from app.backends.prefect_sync import PrefectSync
from app.runs.models import Run, utcnow
from app.runs.store import NewRun, RunStore
from connectors.failures import RetryPolicy
from flows.outcome import CANCELLED, COMPLETED, CRASHED, FAILED, QUEUED, RUNNING, RunError
from tests.support.fake_services import CallbackReceiver
from tests.support.waiting import wait_for_callback, wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=30)

SECRET = "callback-secret-for-the-retry-tests"

FLAKY = """
  flaky:
    source: {kind: python, ref: "tests.support.flaky_source:flaky", args: {counter: "%(counter)s", fail_times: 2}}
    dataset: raw
  buggy:
    source: {kind: python, ref: "tests.support.flaky_source:flaky", args: {counter: "%(counter)s", fail_times: 9,
             error: zero}}
    dataset: raw
    retry: {max_attempts: 3, backoff_seconds: 0}
"""


@pytest.fixture
def receiver():
    server = CallbackReceiver()
    yield server
    server.stop()


@pytest.fixture
def app_config(app_config: dict, workdir: Path, receiver: CallbackReceiver) -> dict:
    with (workdir / "connectors.yaml").open("a") as yaml:
        yaml.write(FLAKY % {"counter": workdir / "runs.count"})
    return {**app_config, "callback_secret": SECRET, "callback_allowed_hosts": f"127.0.0.1:{receiver.port}",
            "callback_backoff_seconds": 0.05}


def test_a_transient_failure_is_retried_under_the_same_run_id_and_the_callback_fires_once(running_app, receiver):
    services = running_app.extensions["flowgate"]
    services.callbacks.start()
    client = running_app.test_client()
    accepted = client.post("/trigger", json={
        "connector_id": "flaky", "retry": {"max_attempts": 3, "backoff_seconds": 0.5, "on": ["transient"]},
        "callback_url": f"{receiver.url}/hook"}).json
    assert accepted["retry"]["max_attempts"] == 3 and accepted["attempt"] == 1 and accepted["attempts"] == []
    waiting = wait_until(lambda: (doc := client.get(accepted["status_url"]).json)["attempt"] == 2 and doc, 60,
                         "the second attempt")
    done = wait_until_ended(client, accepted["status_url"])
    assert done["run_id"] == accepted["run_id"] and done["status"] == "completed" and done["attempt"] == 3
    attempts = done["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == ["failed", "failed", "completed"]
    assert all(a["error"]["failure_class"] == "transient" and "connection refused" in a["error"]["message"]
               for a in attempts[:2])
    # each retry waited its backoff (0.5 s, then 1 s) before it was claimed
    for before, after, wait in ((attempts[0], attempts[1], 0.5), (attempts[1], attempts[2], 1.0)):
        gap = datetime.fromisoformat(after["started_at"]) - datetime.fromisoformat(before["ended_at"])
        assert gap >= timedelta(seconds=wait), (before, after)
    if waiting["status"] == "queued":
        assert waiting["next_attempt_at"] is not None
    lines = client.get(f"{accepted['status_url']}/logs").json["items"]
    assert sum(line["level"] == "ERROR" for line in lines) == 2, lines
    assert any(line["level"] == "WARNING" and "attempt 1 of 3 ended failed (transient); attempt 2 starts at"
               in line["message"] for line in lines), lines
    callback = wait_for_callback(client, accepted["run_id"], "delivered")
    assert len(callback["attempts"]) == 1 and len(receiver.raw) == 1
    body = json.loads(receiver.raw[0][1])
    assert body["status"] == "completed" and body["attempt"] == 3 and len(body["attempts"]) == 3
    services.callbacks.stop()


def test_a_terminal_failure_fails_at_once_whatever_the_policy(running_app):
    client = running_app.test_client()
    done = client.post("/trigger", json={"connector_id": "buggy", "wait": 60}).json  # retry from connectors.yaml
    assert done["status"] == "failed" and done["attempt"] == 1 and len(done["attempts"]) == 1
    assert done["error"]["failure_class"] == "terminal" and "ZeroDivisionError" in done["error"]["message"]
    assert done["retry"] == {"max_attempts": 3, "backoff_seconds": 0.0, "max_backoff_seconds": 600.0,
                             "on": ["transient", "crashed"]}


def test_without_a_policy_a_transient_failure_ends_the_run(running_app):
    done = running_app.test_client().post("/trigger", json={"connector_id": "flaky", "wait": 60}).json
    assert done["status"] == "failed" and done["retry"] is None and done["attempt"] == 1
    assert done["error"]["failure_class"] == "transient" and done["error"]["terminal"] is False


def test_a_bad_policy_is_a_422_naming_the_field(client):
    for retry, field in (({"max_attempts": 0}, "retry.max_attempts"), ({"on": ["terminal"]}, "retry.on.0"),
                         ({"max_attempts": True}, "retry.max_attempts"), ({"other": 1}, "retry.other")):
        answer = client.post("/trigger", json={"connector_id": "flaky", "retry": retry})
        assert answer.status_code == 422 and answer.json["errors"][0]["field"] == field, answer.json
    assert client.get("/api/v1/runs").json["items"] == []


# --- the store: every path that ends an attempt ------------------------------------------------------------------

def with_policy(store: RunStore, backend: str = "local", **policy) -> Run:
    run, _ = store.create_run(NewRun(kind="connector", target="shop", params={}, backend=backend,
                                     concurrency_key="duckdb:/shop.duckdb",
                                     retry=RetryPolicy.model_validate({"backoff_seconds": 600, **policy})))
    return run


def claim(store: RunStore, owner: str = "executor-a") -> Run:
    return store.claim_next(owner, lease_seconds=600)


def make_due(store: RunStore, run_id: str) -> None:
    with store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == run_id).values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def test_a_dead_workers_run_is_queued_again_and_not_claimed_before_its_time(store: RunStore):
    run = with_policy(store, on=["crashed"])
    host = socket.gethostname()
    assert claim(store, f"{host}:4242:abcd").id == run.id
    assert store.crash_runs_of_process(host, 4242) == [run.id]
    again = store.get(run.id)
    assert (again.status, again.attempt, again.lease_owner, again.started_at) == (QUEUED, 2, None, None)
    assert again.next_attempt_at > utcnow() + timedelta(seconds=500)
    assert [(a["attempt"], a["status"], a["error"]["code"]) for a in again.attempt_log] == [
        (1, CRASHED, "process_died")]
    assert claim(store) is None  # not before next_attempt_at
    make_due(store, run.id)
    second = claim(store)
    assert (second.id, second.status, second.attempt) == (run.id, RUNNING, 2)
    assert store.finish(run.id, "executor-a", COMPLETED, result={"rows": {}}) == COMPLETED
    lines = store.logs.read(run.id)
    assert [line["level"] for line in lines] == ["ERROR", "WARNING"] and "process_died" in lines[0]["message"]


def test_a_lapsed_lease_is_retried_and_the_last_attempt_ends_the_run(store: RunStore):
    run = with_policy(store, max_attempts=2)
    for attempt in (1, 2):
        assert claim(store).attempt == attempt
        with store.db.session(write=True) as session:
            session.execute(update(Run).where(Run.id == run.id).values(lease_expires_at=utcnow() - timedelta(1)))
        assert store.recover_expired() == [run.id]
        make_due(store, run.id)
    ended = store.get(run.id)
    assert (ended.status, ended.attempt, len(ended.attempt_log)) == (CRASHED, 2, 1)
    assert ended.error["code"] == "lease_expired" and ended.finished_at is not None


def test_only_the_policys_classes_are_retried_and_a_cancel_is_never_undone(store: RunStore):
    run = with_policy(store, on=["crashed"])
    claim(store)
    assert store.finish(run.id, "executor-a", FAILED, error=RunError("connector_failed", "x",
                                                                      failure_class="transient")) == FAILED
    cancelled = with_policy(store)
    claim(store)
    store.cancel(cancelled.id)  # cancelling: its executor stops it, and the process dies meanwhile
    assert store.finish(cancelled.id, "executor-a", CRASHED, error=RunError.interrupted()) == CRASHED


def failed_transiently_on_prefect(store: RunStore, backend: PrefectBackend, api: str) -> tuple[Run, Run]:
    """A run with a retry policy whose first flow run failed with a transient error its flow published (Prefect's
    artifacts answered by respx): the run, and the run as that failure left it."""
    run = with_policy(store, backend="prefect", backoff_seconds=0)
    store.record_flow_run(run.id, "fr-1", "Scheduled")
    with respx.mock:
        respx.post(f"{api}/artifacts/filter").respond(json=[{"key": "flowgate-error-shop", "data": [
            {"code": "connector_failed", "message": "HTTP 503 from the source", "step": "extract",
             "failure_class": "transient"}]}])
        return run, backend.apply_flow_run(store.get(run.id), {"id": "fr-1", "state": {
            "type": "FAILED", "name": "Failed", "message": "Flow run encountered an exception"},
            "start_time": utcnow().isoformat(), "end_time": utcnow().isoformat()})


def test_a_retry_on_prefect_is_a_new_flow_run_with_its_own_tag_and_key(store: RunStore):
    """Prefect answers (respx): attempt 1's flow run failed with a transient error its flow published; the sync
    creates attempt 2's flow run when it is due, tagged and keyed by attempt, never finding attempt 1's."""
    api = "http://prefect.test/api"
    route = PrefectRoute(PrefectClient(api, timeout=0.5), "flowgate-connector", "flowgate", reprobe_seconds=60)
    backend = PrefectBackend(store, route, run_timeout_seconds=3600)
    try:
        run, failed = failed_transiently_on_prefect(store, backend, api)
        assert (failed.status, failed.attempt, failed.prefect_flow_run_id) == (QUEUED, 2, None)
        assert failed.attempt_log[0]["prefect_flow_run_id"] == "fr-1"
        assert failed.attempt_log[0]["error"]["failure_class"] == "transient"
        with respx.mock:
            found = respx.post(f"{api}/flow_runs/filter").respond(json=[])
            respx.get(f"{api}/deployments/name/flowgate-connector/shop").respond(
                json={"id": "d-1", "name": "shop", "work_pool_name": "flowgate"})
            respx.post(f"{api}/work_pools/flowgate/workers/filter").respond(json=[
                {"name": "w", "status": "ONLINE", "last_heartbeat_time": utcnow().isoformat()}])
            created = respx.post(f"{api}/deployments/d-1/create_flow_run").respond(
                json={"id": "fr-2", "state": {"type": "SCHEDULED", "name": "Scheduled"}})
            PrefectSync(backend).settle_undispatched(older_than_seconds=60)
        assert json.loads(found.calls[0].request.content)["flow_runs"]["tags"]["all_"] == [
            f"flowgate-attempt:{run.id}:2"]
        sent = json.loads(created.calls[0].request.content)
        assert sent["idempotency_key"].endswith(":attempt-2") and f"flowgate-attempt:{run.id}:2" in sent["tags"]
        assert store.get(run.id).prefect_flow_run_id == "fr-2"
    finally:
        route.close()


def test_a_prefect_run_waiting_for_its_next_attempt_is_cancelled_without_asking_prefect(store: RunStore):
    """Between two attempts (or after a create that went unanswered) a run on Prefect has no flow run: a cancel
    ends it in the store, where a flow run of it created late finds it ended. It asked Prefect to cancel flow run
    `None` before, which Prefect refuses (422), and answered 503."""
    api = "http://prefect.test/api"
    route = PrefectRoute(PrefectClient(api, timeout=0.5), "flowgate-connector", "flowgate", reprobe_seconds=60)
    backend = PrefectBackend(store, route, run_timeout_seconds=3600)
    try:
        run, waiting = failed_transiently_on_prefect(store, backend, api)
        assert (waiting.status, waiting.prefect_flow_run_id) == (QUEUED, None)
        with respx.mock(assert_all_called=False) as prefect:
            asked = prefect.post(path__regex=r"/api/flow_runs/[^/]+/set_state").respond(
                422, json={"detail": "flow_run_id: not a valid UUID"})
            cancelled = backend.cancel(waiting)
        assert not asked.called
        assert cancelled is not None and cancelled.status == CANCELLED
        assert store.get(run.id).status == CANCELLED
    finally:
        route.close()


def test_a_prefect_run_with_no_flow_run_yet_has_no_log_lines_and_prefect_is_not_asked(store: RunStore):
    """A run on Prefect whose flow run is not created yet (its create unconfirmed) has logged nothing there: an
    empty page. It asked Prefect for the logs of flow run `None` before, which Prefect refuses (422): a 503."""
    api = "http://prefect.test/api"
    run = with_policy(store, backend="prefect")
    route = PrefectRoute(PrefectClient(api, timeout=0.5), "flowgate-connector", "flowgate", reprobe_seconds=60)
    backend = PrefectBackend(store, route, run_timeout_seconds=3600)
    try:
        with respx.mock(assert_all_called=False) as prefect:
            asked = prefect.post(f"{api}/logs/filter").respond(422, json={"detail": "flow_run_id: not a valid UUID"})
            page = backend.logs(run, after=0, limit=50)
        assert not asked.called
        assert (page.source, page.items, page.next_after) == ("prefect", [], None)
    finally:
        route.close()


def test_a_prefect_run_cut_off_without_a_cancel_is_crashed_not_cancelled(store: RunStore):
    run = with_policy(store, backend="prefect", on=["transient"])  # crashed is not retried here
    store.record_flow_run(run.id, "fr-1", "Running")
    backend = PrefectBackend(store, None, run_timeout_seconds=3600)
    ended = backend.apply_flow_run(store.get(run.id), {"id": "fr-1", "state": {
        "type": "CANCELLED", "name": "Cancelled", "message": "The worker shut down while the flow run was running"}})
    assert ended.status == CRASHED and ended.error["code"] == "cut_off"
    assert "worker shut down" in ended.error["message"] and ended.error["failure_class"] == "crashed"
