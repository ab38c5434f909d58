"""A keyless gateway takes nothing from other web pages: no DNS rebinding (Host), no cross-site requests (a body
that is not JSON, another Origin). On a real gunicorn, as the review reproduced it, and through Flask's client."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app import create_app
from app.config import ConfigError
from tests.support.gunicorn_server import GunicornServer

TRIGGER = '{"connector_id": "numbers"}'


def runs(client) -> list[dict]:
    return client.get("/api/v1/runs").json["items"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_json_is_a_415_naming_the_content_type_and_starts_nothing(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/trigger", data=TRIGGER.encode(), headers=headers)
    assert response.status_code == 415 and response.mimetype == "application/problem+json"
    assert response.json["code"] == "unsupported_media_type"
    assert response.json["errors"][0]["field"] == "Content-Type"
    assert (content_type or "none").split(";")[0] in response.json["detail"]
    assert runs(client) == []


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/problem+json"])
def test_json_bodies_are_taken_whatever_their_parameters(client, content_type):
    response = client.post("/trigger", data=TRIGGER.encode(), headers={"Content-Type": content_type})
    assert response.status_code == 202, response.json


def test_an_empty_body_without_a_content_type_still_means_no_options(client):
    run = client.post("/trigger", json={"connector_id": "numbers"}).json
    assert client.post(f"/api/v1/runs/{run['run_id']}/cancel").status_code == 200


def test_an_empty_form_is_refused_too(client):
    # An empty body is a run with no options here: a form with no fields must not start one.
    response = client.post("/api/v1/connectors/numbers/runs", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and runs(client) == []


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:5000", "localhost.evil.example",
                                  "127.0.0.1.nip.io"])
def test_a_host_the_keyless_gateway_does_not_serve_is_a_421_naming_it(client, host):
    response = client.get("/api/v1/runs", headers={"Host": host})
    assert response.status_code == 421 and response.mimetype == "application/problem+json"
    assert response.json["code"] == "unknown_host" and response.json["errors"][0]["field"] == "Host"
    assert "items" not in response.json
    assert client.get("/health", headers={"Host": host}).status_code == 200  # liveness reads nothing


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "LOCALHOST.", "dash.localhost:5000",
                                  "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "192.168.1.20:5000"])
def test_loopback_names_and_ip_addresses_are_served(client, host):
    assert client.get("/api/v1/runs", headers={"Host": host}).status_code == 200


def test_configured_server_names_are_served(app_config):
    app = create_app({**app_config, "server_names": "flowgate.internal, *.dev.example"})
    client = app.test_client()
    for host in ("flowgate.internal:5000", "box.dev.example", "a.b.dev.example"):
        assert client.get("/api/v1/runs", headers={"Host": host}).status_code == 200, host
    for host in ("dev.example", "flowgate.internal.evil.example", "evildev.example"):
        assert client.get("/api/v1/runs", headers={"Host": host}).status_code == 421, host
    app.extensions["flowgate"].store.dispose()


def test_a_bad_server_name_stops_the_start_naming_the_variable(app_config):
    with pytest.raises(ConfigError, match="FLOWGATE_SERVER_NAMES"):
        create_app({**app_config, "server_names": "ok.example, http://bad.example/"})


def test_with_api_keys_any_host_is_served(app_config):
    key = "reader-key-0123456789"
    app = create_app({**app_config, "api_keys": f"dash:{key}:read"})
    response = app.test_client().get("/api/v1/runs", headers={"Host": "flowgate.example.com", "X-API-Key": key})
    assert response.status_code == 200
    app.extensions["flowgate"].store.dispose()


def test_a_request_from_another_origin_that_could_change_something_is_a_403(client):
    run = client.post("/trigger", json={"connector_id": "numbers"}).json
    for origin in ("http://localhost:8088", "http://attacker.example", "null"):
        cancel = client.post(f"/api/v1/runs/{run['run_id']}/cancel", headers={"Origin": origin})
        assert cancel.status_code == 403 and cancel.json["code"] == "cross_origin_refused"
        assert cancel.json["errors"][0]["field"] == "Origin"
    assert runs(client)[0]["status"] == "queued"
    assert client.get("/api/v1/runs", headers={"Origin": "http://localhost:8088"}).status_code == 200
    # the dashboard, served by the gateway itself, is same-origin
    same = client.post(f"/api/v1/runs/{run['run_id']}/cancel", headers={"Origin": "http://localhost"})
    assert same.status_code == 200


def test_a_keyless_gunicorn_refuses_the_reviews_csrf_and_rebinding_requests(workdir: Path):
    server = GunicornServer(workdir, workers=1).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # fetch(..., {mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}) from another page
            simple = client.post("/trigger", content=TRIGGER, headers={"Content-Type": "text/plain",
                                                                        "Origin": "http://localhost:8088"})
            assert simple.status_code in (403, 415), simple.text
            text = client.post("/trigger", content=TRIGGER, headers={"Content-Type": "text/plain"})
            assert text.status_code == 415 and text.json()["errors"][0]["field"] == "Content-Type"
            # an HTML form with enctype="text/plain", and a fetch with no body at all
            form = client.post("/api/workflow/greet/execute", content=b'{"inputs": {"name": "csrf"}, "x": "="}',
                               headers={"Content-Type": "text/plain", "Origin": "http://localhost:8088"})
            assert form.status_code in (403, 415)
            empty = client.post("/api/workflow/greet/execute", headers={"Origin": "http://localhost:8088"})
            assert empty.status_code == 403 and empty.json()["code"] == "cross_origin_refused"
            rebound = client.get("/api/v1/runs", headers={"Host": "rebind.attacker.example"})
            assert rebound.status_code == 421 and "items" not in rebound.json()
            assert client.get("/api/v1/runs").json()["items"] == []  # nothing was started
            assert client.post("/trigger", json={"connector_id": "numbers"}).status_code == 202
    finally:
        server.terminate()
