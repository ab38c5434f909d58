"""PrefectRoute and PrefectClient with only the HTTP transport mocked (respx): reasons, auth, circuit."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import respx

from app.backends.prefect_client import PrefectClient, PrefectUnavailable
from app.backends.prefect_route import PrefectRoute

API = "http://prefect.test/api"
DEPLOYMENT = {"id": "d-1", "name": "shop", "work_pool_name": "flowgate"}


def heartbeat(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat()


def alive() -> dict:
    """A worker that sent its heartbeat a second ago (computed now: the suite may reach this test minutes later)."""
    return {"name": "w", "status": "ONLINE", "last_heartbeat_time": heartbeat(1)}


@pytest.fixture
def route():
    route = PrefectRoute(PrefectClient(API, api_key="pnu_secret", timeout=0.5), "flowgate-connector", "flowgate",
                         reprobe_seconds=60)
    yield route
    route.close()  # a circuit a test opened stops re-probing (it logged errors through a closed client at exit)


@respx.mock
def test_a_pool_without_an_online_worker_sends_the_run_local(route):
    respx.get(f"{API}/deployments/name/flowgate-connector/shop").respond(json=DEPLOYMENT)
    workers = respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[{"status": "OFFLINE"}])
    decision = route.route("shop")
    assert not decision.ok and decision.reason == "no_worker_online"
    assert workers.calls.last.request.headers["Authorization"] == "Bearer pnu_secret"


@respx.mock
def test_answers_are_cached_briefly(route):
    deployment = respx.get(f"{API}/deployments/name/flowgate-connector/shop").respond(json=DEPLOYMENT)
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[alive()])
    assert [route.route("shop").deployment_id for _ in range(5)] == ["d-1"] * 5
    assert deployment.call_count == 1


@respx.mock
def test_an_unreachable_prefect_opens_the_circuit_and_later_calls_skip_it(route):
    deployment = respx.get(f"{API}/deployments/name/flowgate-connector/shop").mock(
        side_effect=httpx.ConnectError("connection refused"))
    assert route.route("shop").reason == "prefect_unreachable"
    assert route.circuit_open
    assert route.route("shop").reason == "prefect_circuit_open"
    assert deployment.call_count == 1


@respx.mock
def test_a_busy_server_answering_503_is_retried(route):
    respx.get(f"{API}/deployments/name/flowgate-connector/shop").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json=DEPLOYMENT)])
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[alive()])
    assert route.route("shop").deployment_id == "d-1"


@respx.mock
def test_a_worker_prefect_still_counts_online_but_silent_past_the_age_sends_runs_local(route):
    respx.get(f"{API}/deployments/name/flowgate-connector/shop").respond(json=DEPLOYMENT)
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[
        {"name": "hung", "status": "ONLINE", "last_heartbeat_time": heartbeat(route.worker_max_age_seconds + 5)}])
    decision = route.route("shop")
    assert not decision.ok and decision.reason == "no_worker_online" and "heartbeat" in decision.detail


@respx.mock
def test_one_unanswered_call_does_not_open_the_circuit_three_do(route):
    respx.get(f"{API}/deployments/name/flowgate-connector/shop").mock(side_effect=httpx.ReadTimeout("slow"))
    for _ in range(2):
        assert route.route("shop").reason == "prefect_unreachable" and not route.circuit_open
    route.route("shop")
    assert route.circuit_open


@respx.mock
def test_a_health_answer_that_is_not_json_does_not_end_the_reprobe(route):
    route.reprobe_seconds = 0.05
    health = respx.get(f"{API}/health").mock(side_effect=[
        httpx.Response(200, text="<html>proxy page</html>"), httpx.Response(200, text="<html>again</html>"),
        httpx.Response(200, json=True)])
    respx.get(f"{API}/deployments/name/flowgate-connector/shop").mock(side_effect=httpx.ConnectError("refused"))
    route.route("shop")
    assert route.circuit_open
    deadline = time.monotonic() + 10
    while route.circuit_open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not route.circuit_open and health.call_count == 3


@respx.mock
def test_a_claim_that_lands_after_a_worker_ran_the_whole_run_gives_it_back():
    """Prefect accepts PENDING after a run's end (a manual retry): the state before the claim tells."""
    client = PrefectClient(API, timeout=0.5)
    set_state = respx.post(f"{API}/flow_runs/f-1/set_state").mock(side_effect=[
        httpx.Response(200, json={"status": "ACCEPT", "state": {"id": "s4", "type": "PENDING"}}),
        httpx.Response(200, json={"status": "ACCEPT", "state": {"id": "s5", "type": "COMPLETED"}})])
    respx.get(f"{API}/flow_run_states/", params={"flow_run_id": "f-1"}).respond(json=[
        {"id": "s1", "type": "SCHEDULED", "name": "Scheduled", "timestamp": "2026-01-01T00:00:01Z"},
        {"id": "s4", "type": "PENDING", "name": "Pending", "timestamp": "2026-01-01T00:00:09Z"},
        {"id": "s2", "type": "RUNNING", "name": "Running", "timestamp": "2026-01-01T00:00:03Z"},
        {"id": "s3", "type": "COMPLETED", "name": "Completed", "timestamp": "2026-01-01T00:00:05Z", "data": None}])
    assert client.claim_flow_run("f-1") is False
    restored = json.loads(set_state.calls.last.request.content)
    assert restored["state"]["type"] == "COMPLETED" and restored["force"] is True
    client.close()


@respx.mock
def test_a_claim_on_a_scheduled_run_is_ours():
    client = PrefectClient(API, timeout=0.5)
    respx.post(f"{API}/flow_runs/f-2/set_state").respond(
        json={"status": "ACCEPT", "state": {"id": "s2", "type": "PENDING"}})
    respx.get(f"{API}/flow_run_states/", params={"flow_run_id": "f-2"}).respond(json=[
        {"id": "s1", "type": "SCHEDULED", "name": "Late", "timestamp": "2026-01-01T00:00:01Z"},
        {"id": "s2", "type": "PENDING", "name": "Pending", "timestamp": "2026-01-01T00:00:09Z"}])
    assert client.claim_flow_run("f-2") is True
    client.close()


@respx.mock
def test_a_claim_not_found_in_the_flow_runs_history_is_not_ours_and_nothing_is_restored():
    """Who ran the flow run before the claim cannot be told: it stays on Prefect (it was: position 0, ours)."""
    client = PrefectClient(API, timeout=0.5)
    set_state = respx.post(f"{API}/flow_runs/f-3/set_state").respond(
        json={"status": "ACCEPT", "state": {"id": "s9", "type": "PENDING"}})
    respx.get(f"{API}/flow_run_states/", params={"flow_run_id": "f-3"}).respond(json=[
        {"id": "s1", "type": "SCHEDULED", "name": "Scheduled", "timestamp": "2026-01-01T00:00:01Z"}])
    assert client.claim_flow_run("f-3") is False
    assert set_state.call_count == 1  # the claim only
    client.close()


def test_a_closed_route_stops_re_probing(route):
    route.record_failure(PrefectUnavailable("ConnectError: refused", maybe_done=False))
    assert route.circuit_open and route._reprober.is_alive()
    route.close()
    route._reprober.join(5)
    assert not route._reprober.is_alive()


@respx.mock
def test_a_create_refused_at_the_connection_goes_local_as_prefect_unreachable(app_config):
    """The probe said Prefect can take it, then the server died before the create: the run goes local, and says
    Prefect was unreachable (not a generic create failure)."""
    from app import create_app

    respx.get(f"{API}/deployments/name/flowgate-connector/numbers").respond(json={**DEPLOYMENT, "name": "numbers"})
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[alive()])
    respx.post(f"{API}/deployments/d-1/create_flow_run").mock(side_effect=httpx.ConnectError("connection refused"))
    app = create_app({**app_config, "prefect_api_url": API})
    try:
        run = app.test_client().post("/trigger", json={"connector_id": "numbers"}).json
        assert run["backend"] == "local" and run["fallback_reason"] == "prefect_unreachable", run
    finally:
        app.extensions["flowgate"].dispatcher.prefect.route.close()
        app.extensions["flowgate"].store.dispose()
