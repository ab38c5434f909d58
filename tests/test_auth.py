"""API keys and scopes: 401 without a valid key, 403 without the scope, /health always open."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app import create_app
from app.auth import KeyRing, digest
from app.config import ConfigError
from tests.support.gunicorn_server import ROOT, GunicornServer
from tests.support.nginx_proxy import NGINX, repo_nginx
from tests.support.waiting import wait_until

READER, TRIGGERER, ADMIN = "reader-key-0123456789", "trigger-key-0123456789", "admin-key-0123456789"


@pytest.fixture
def app_config(app_config: dict) -> dict:
    return {**app_config, "api_keys": f"dash:{READER}:read, backend:{TRIGGERER}:read+trigger, ops:{ADMIN}:admin"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_health_stays_open_and_everything_else_needs_a_key(client):
    assert client.get("/health").status_code == 200
    for method, path in (("get", "/api/v1/runs"), ("get", "/openapi.json"), ("post", "/trigger"),
                         ("get", "/api/v1/health/ready"), ("post", "/api/workflow/x/execute")):
        response = getattr(client, method)(path, json={"connector_id": "numbers"} if method == "post" else None)
        assert response.status_code == 401, (path, response.json)
        assert response.mimetype == "application/problem+json" and response.json["code"] == "missing_api_key"
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="flowgate"'


def test_a_wrong_key_is_a_401_that_does_not_echo_it(client):
    response = client.get("/api/v1/runs", headers=bearer("not-a-key-at-all-0000"))
    assert response.status_code == 401 and response.json["code"] == "invalid_api_key"
    assert "not-a-key" not in response.get_data(as_text=True)


def test_scopes_read_trigger_admin(client):
    refused = client.post("/trigger", json={"connector_id": "numbers"}, headers=bearer(READER))
    assert refused.status_code == 403 and refused.json["code"] == "insufficient_scope"
    assert refused.json["required_scope"] == "trigger" and "'dash'" in refused.json["detail"]
    assert client.get("/api/v1/runs", headers=bearer(ADMIN)).json["items"] == []  # the refusal stored nothing
    assert client.get("/api/v1/runs", headers=bearer(READER)).status_code == 200
    accepted = client.post("/trigger", json={"connector_id": "numbers"}, headers={"X-API-Key": TRIGGERER})
    assert accepted.status_code == 202
    assert client.post(f"/api/v1/runs/{accepted.json['run_id']}/cancel", headers=bearer(READER)).status_code == 403
    assert client.post(f"/api/v1/runs/{accepted.json['run_id']}/cancel", headers=bearer(ADMIN)).status_code == 200


def test_whoami_names_the_key_and_its_scopes_for_any_valid_key(client, app_config):
    assert client.get("/api/v1/whoami", headers=bearer(READER)).json == {
        "name": "dash", "scopes": ["read"], "authenticated": True}
    assert client.get("/api/v1/whoami", headers=bearer(TRIGGERER)).json["scopes"] == ["read", "trigger"]
    assert client.get("/api/v1/whoami", headers=bearer(ADMIN)).json["scopes"] == ["read", "trigger", "admin"]
    assert client.get("/api/v1/whoami").status_code == 401
    trigger_only = create_app({**app_config, "api_keys": f"t:{TRIGGERER}:trigger"}).test_client()
    assert trigger_only.get("/api/v1/whoami", headers=bearer(TRIGGERER)).json["scopes"] == ["trigger"]
    keyless = create_app({**app_config, "api_keys": None}).test_client()
    assert keyless.get("/api/v1/whoami").json == {"name": "anonymous", "scopes": ["read", "trigger", "admin"],
                                                  "authenticated": False}


def test_keys_from_a_file_are_kept_as_digests(tmp_path: Path):
    hashed = subprocess.run([sys.executable, "-m", "app", "keys", "hash", TRIGGERER], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert hashed == f"sha256:{digest(TRIGGERER).hex()}"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# name digest scopes\nbackend {hashed} trigger\n")
    ring = KeyRing.parse(None, keys)
    assert TRIGGERER not in keys.read_text()
    assert ring.identify(TRIGGERER).name == "backend" and ring.identify(READER) is None
    assert ring.identify(TRIGGERER).allows("trigger") and not ring.identify(TRIGGERER).allows("read")


@pytest.mark.parametrize("value, message", [
    ("backend:short:read", "entry 1: expected <name>:<key of 16+ characters>:<scopes>"),
    (f"backend:{READER}:write", "scopes must be one or more of read, trigger, admin"),
    (f"a:{READER}:read,a:{ADMIN}:admin", "API key names must be unique: a"),
    (f"{READER}", "entry 1: expected"),
])
def test_a_bad_key_setting_stops_the_start_without_echoing_the_key(app_config, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        create_app({**app_config, "api_keys": value})
    assert READER not in str(info.value) and ADMIN not in str(info.value)


def test_without_keys_gunicorn_serves_loopback_only_and_says_so_in_json_lines(workdir):
    server = GunicornServer(workdir, workers=1)
    server.env["FLOWGATE_BIND"] = f"0.0.0.0:{server.port}"
    server.start()
    try:
        assert httpx.get(f"{server.url}/health", headers={"X-Request-ID": "probe-1"}).status_code == 200
        # The access line is written after the response: wait for it.
        wait_until(lambda: '"probe-1"' in server.log(), what="the access line of the probe")
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    finally:
        server.kill()
    messages = [line["message"] for line in lines]
    assert any(f"serving on 127.0.0.1:{server.port} only, not 0.0.0.0:{server.port}" in m for m in messages)
    assert f"Listening at: http://127.0.0.1:{server.port} ({server.process.pid})" in messages
    access = [line for line in lines if line["logger"] == "gunicorn.access" and line.get("request_id") == "probe-1"]
    assert access and access[0]["path"] == "/health" and access[0]["status"] == 200, lines[-3:]


def test_wrong_keys_from_one_address_are_limited_but_a_right_key_from_it_is_always_served(client):
    wrong = [client.get("/api/v1/runs", headers=bearer("not-a-key-0123456789")).status_code for _ in range(10)]
    assert wrong == [401] * 10
    limited = client.get("/api/v1/runs", headers=bearer("not-a-key-0123456789"))
    assert limited.status_code == 429 and limited.mimetype == "application/problem+json"
    assert limited.json["code"] == "too_many_failed_authentications" and int(limited.headers["Retry-After"]) > 0
    assert client.get("/api/v1/runs").status_code == 429  # no key at all: limited too
    # Callers behind one proxy or NAT share the address: one caller's wrong keys lock out no one else's right key.
    assert [client.get("/api/v1/runs", headers=bearer(key)).status_code for key in (READER, ADMIN)] == [200, 200]
    assert client.post("/trigger", json={"connector_id": "numbers"}, headers=bearer(TRIGGERER)).status_code == 202
    elsewhere = client.get("/api/v1/runs", headers=bearer("not-a-key-0123456789"),
                           environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert elsewhere.status_code == 401
    assert client.get("/health").status_code == 200


def test_x_forwarded_for_is_ignored_unless_trusted_proxies_are_configured(client):
    # Without FLOWGATE_TRUSTED_PROXIES anyone can write the header: a wrong-key sender cannot escape its count by
    # naming a new address each time.
    for number in range(11):
        client.get("/api/v1/runs", headers={**bearer("not-a-key-0123456789"), "X-Forwarded-For": f"10.0.0.{number}"})
    assert client.get("/api/v1/runs", headers={"X-Forwarded-For": "10.9.9.9"}).status_code == 429


def test_behind_a_trusted_proxy_wrong_keys_count_against_the_address_it_saw(app_config):
    app = create_app({**app_config, "trusted_proxies": 1})
    client = app.test_client()
    proxy = {"REMOTE_ADDR": "172.18.0.5"}  # every request arrives from the proxy
    # What the client wrote itself (left) is not trusted; the proxy's entry (right) is the address.
    for number in range(11):
        client.get("/api/v1/runs", environ_base=proxy, headers={**bearer("not-a-key-0123456789"),
                                                                "X-Forwarded-For": f"1.1.1.{number}, 203.0.113.7"})
    attacker = client.get("/api/v1/runs", environ_base=proxy, headers={"X-Forwarded-For": "9.9.9.9, 203.0.113.7"})
    assert attacker.status_code == 429
    other = client.get("/api/v1/runs", environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.8"})
    assert other.status_code == 401 and other.json["code"] == "missing_api_key"
    app.extensions["flowgate"].store.dispose()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_the_compose_nginx_one_clients_wrong_keys_limit_only_that_client(workdir):
    """docker-compose.yml's gateway settings behind deploy/nginx.conf: two clients on two loopback addresses."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    trusted = compose["services"]["gateway"]["environment"]["FLOWGATE_TRUSTED_PROXIES"]
    server = GunicornServer(workdir, workers=1, FLOWGATE_API_KEYS=f"dash:{READER}:read",
                            FLOWGATE_TRUSTED_PROXIES=str(trusted), ready_headers=bearer(READER)).start()
    try:
        with repo_nginx(workdir, server.port) as url, \
                httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as attacker, \
                httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.1")) as caller:
            wrong = [attacker.get("/api/v1/runs", headers={**bearer("not-a-key-0123456789"),
                                                           "X-Forwarded-For": f"10.0.0.{n}"}).status_code
                     for n in range(11)]
            forged = attacker.get("/api/v1/runs", headers={"X-Forwarded-For": "127.0.0.1"}).status_code
            mistyped = caller.get("/api/v1/runs", headers=bearer("not-a-key-0123456789")).status_code
            right = caller.get("/api/v1/runs", headers=bearer(READER)).status_code
    finally:
        server.kill()
    assert wrong == [401] * 10 + [429] and forged == 429  # nginx replaces the header the client wrote
    assert mistyped == 401 and right == 200  # the other client's count is its own


def test_idempotency_keys_are_scoped_to_the_caller(app_config):
    app = create_app({**app_config, "api_keys": f"alice:{TRIGGERER}:read+trigger,bob:{ADMIN}:read+trigger"})
    client = app.test_client()

    def trigger(key: str, params: dict) -> httpx.Response:
        return client.post("/trigger", json={"connector_id": "numbers", "params": params},
                           headers={**bearer(key), "Idempotency-Key": "order-42"})

    alices = trigger(TRIGGERER, {"n": 1})
    assert alices.status_code == 202
    bobs = trigger(ADMIN, {"n": 1})
    assert bobs.status_code == 202 and bobs.json["run_id"] != alices.json["run_id"]
    other_body = trigger(ADMIN, {"n": 2})  # bob's own key again, another body: bob's conflict, not alice's run
    assert other_body.status_code == 409 and other_body.json["run_id"] == bobs.json["run_id"]
    assert alices.json["run_id"] not in other_body.get_data(as_text=True)
    assert trigger(TRIGGERER, {"n": 1}).json["run_id"] == alices.json["run_id"]  # a retry still finds its run
    for headers in (bearer(TRIGGERER), bearer(ADMIN)):
        executed = [client.post("/api/workflow/x/execute", headers={**headers, "Idempotency-Key": "wf-1"}, json={
            "workflow": {"nodes": [{"id": "o", "type": "output"}]}}).json["executionId"] for _ in range(2)]
        assert executed[0] == executed[1]
    app.extensions["flowgate"].store.dispose()


def test_reading_source_data_needs_read_as_well_as_trigger(app_config):
    """A preview answers the source's rows and execute-node a node's output: a trigger-only key may start runs
    but not read data through them (before: it read raw rows through preview)."""
    from app import create_app

    runner = "runner-key-0123456789"
    app = create_app({**app_config, "api_keys": f"dash:{READER}:read, runner:{runner}:trigger, "
                                                f"backend:{TRIGGERER}:read+trigger"})
    client = app.test_client()
    node = {"nodeId": "n", "nodeType": "transform", "node": {"id": "n", "type": "transform", "config": {"value": "x"}},
            "inputData": {}}
    for key in (runner, READER):
        refused = client.post("/api/v1/connectors/numbers/preview", json={}, headers=bearer(key))
        assert refused.status_code == 403 and refused.json["required_scope"] == "read+trigger"
        assert client.post("/api/workflow/any/execute-node", json=node, headers=bearer(key)).status_code == 403
    assert client.post("/trigger", json={"connector_id": "numbers"}, headers=bearer(runner)).status_code == 202
    assert client.post("/api/v1/connectors/numbers/preview", json={}, headers=bearer(TRIGGERER)).status_code == 200
    assert client.post("/api/workflow/any/execute-node", json=node, headers=bearer(TRIGGERER)).status_code == 200
    app.extensions["flowgate"].store.dispose()
