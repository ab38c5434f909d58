"""PrefectRoute and PrefectClient with only the HTTP transport mocked (respx): reasons, auth, circuit."""
from __future__ import annotations

import httpx
import pytest
import respx

from app.backends.prefect_client import PrefectClient
from app.backends.prefect_route import PrefectRoute

API = "http://prefect.test/api"
DEPLOYMENT = {"id": "d-1", "name": "shop", "work_pool_name": "flowgate"}


@pytest.fixture
def route():
    client = PrefectClient(API, api_key="pnu_secret", timeout=0.5)
    yield PrefectRoute(client, "flowgate-connector", "flowgate", reprobe_seconds=60)
    client.close()


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
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[{"status": "ONLINE"}])
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
    respx.post(f"{API}/work_pools/flowgate/workers/filter").respond(json=[{"status": "ONLINE"}])
    assert route.route("shop").deployment_id == "d-1"
