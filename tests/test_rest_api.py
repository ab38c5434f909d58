"""The rest_api source against a real local HTTP API: three paginators, a token from the environment, retries; the
hosts it may call (FLOWGATE_HTTP_ALLOWED_HOSTS) and where its credentials go."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from app import create_app
from connectors.outbound import OutboundPolicy
from connectors.pipeline import ConnectorRunError, Workspace, run_connector
from connectors.registry import ConnectorRegistry
from connectors.spec import ConnectorSpec
from tests.support.api_server import TOKEN, ApiServer
from tests.support.fake_services import LinkedPages

YAML = """
connectors:
  api:
    source:
      kind: rest_api
      config:
        client:
          base_url: "{url}/"
          auth: {{type: bearer, token: "${{API_TOKEN}}"}}
        resources:
          - name: items
            endpoint:
              path: items
              data_selector: items
              paginator: {{type: cursor, cursor_path: next_cursor, cursor_param: cursor}}
          - name: orders
            endpoint:
              path: orders
              data_selector: data
              paginator: {{type: offset, limit: 10, offset_param: offset, limit_param: limit, total_path: total}}
          - name: events
            endpoint:
              path: events
              paginator: {{type: header_link}}
    dataset: api_raw
"""


def workspace_for(tmp_path: Path, api: ApiServer) -> Workspace:
    """A workspace whose sources may call the test API (and nothing else)."""
    return Workspace(tmp_path / "dlt", tmp_path / "duckdb", OutboundPolicy.parse(api.url.removeprefix("http://")))


@pytest.fixture
def api():
    server = ApiServer()
    yield server
    server.stop()


def test_every_page_of_every_paginator_is_loaded_despite_a_429_and_a_500(api, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0")  # retry at once: the server says Retry-After 0
    path = tmp_path / "connectors.yaml"
    path.write_text(YAML.format(url=api.url))
    registry = ConnectorRegistry.load(path, environ={"API_TOKEN": TOKEN})
    spec = registry.get("api")
    assert TOKEN not in str(spec.public_dict())
    summary = run_connector(spec, workspace_for(tmp_path, api))
    assert summary.rows == {"items": 25, "orders": 25, "events": 25}
    with duckdb.connect(summary.location, read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT id) FROM api_raw.items").fetchone()[0] == 25
    assert api.failures == {}  # both failures were served, and retried past
    assert api.requests.count("/items?cursor=10") == 2 and api.requests.count("/orders?offset=10&limit=10") == 2


def test_a_rest_api_connector_without_base_url_is_refused_at_start_up(tmp_path: Path):
    path = tmp_path / "connectors.yaml"
    path.write_text("connectors:\n  api:\n    source: {kind: rest_api, config: {client: {}, resources: [x]}}\n")
    with pytest.raises(Exception, match=r"connector 'api': field 'source.config'.*base_url"):
        ConnectorRegistry.load(path)


INCREMENTAL_YAML = """
connectors:
  changes:
    source:
      kind: rest_api
      config:
        client: {{base_url: "{url}/", auth: {{type: bearer, token: "{token}"}}}}
        resources:
          - name: changes
            primary_key: id
            endpoint:
              path: changes
              paginator: single_page
              params:
                since: {{type: incremental, cursor_path: updated, initial_value: 0}}
    write_disposition: merge
    dataset: api_raw
"""


def test_rest_api_incremental_params_ask_only_for_what_changed_since_the_last_run(api, tmp_path: Path):
    path = tmp_path / "connectors.yaml"
    path.write_text(INCREMENTAL_YAML.format(url=api.url, token=TOKEN))
    spec = ConnectorRegistry.load(path).get("changes")
    workspace = workspace_for(tmp_path, api)
    assert run_connector(spec, workspace).rows == {"changes": 25}

    api.changes[2] = {**api.changes[2], "name": "renamed", "updated": 30}
    api.changes.append({"id": 26, "name": "item 26", "updated": 31})
    second = run_connector(spec, workspace)
    assert api.requests[-1] == "/changes?since=25"  # the cursor came from dlt's state
    assert second.rows == {"changes": 2}
    with duckdb.connect(second.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM api_raw.changes").fetchone()[0] == 26
        assert con.execute("SELECT name FROM api_raw.changes WHERE id = 3").fetchone()[0] == "renamed"


def _paged_connector(tmp_path: Path, base_url: str, auth: str) -> ConnectorSpec:
    path = tmp_path / "paged.yaml"
    path.write_text(f"""
connectors:
  paged:
    source:
      kind: rest_api
      config:
        client:
          base_url: "{base_url}/"
          auth: {auth}
          headers: {{X-Tenant-Key: tenant-secret}}
        resources:
          - name: rows
            endpoint: {{path: page, paginator: header_link, data_selector: "$"}}
""")
    return ConnectorRegistry.load(path).get("paged")


@pytest.fixture
def elsewhere():
    server = LinkedPages()
    yield server
    server.stop()


@pytest.mark.parametrize("redirect", [False, True], ids=["next-link", "redirect"])
def test_a_rest_api_source_never_calls_a_host_off_the_allow_list_however_the_upstream_points_there(
        tmp_path: Path, elsewhere, redirect):
    upstream = LinkedPages(next_url=f"{elsewhere.url}/stolen?page=2", redirect=redirect)
    try:
        spec = _paged_connector(tmp_path, upstream.url, "{type: bearer, token: tok-123}")
        workspace = Workspace(tmp_path / "dlt", tmp_path / "duckdb", OutboundPolicy.parse(f"127.0.0.1:{upstream.port}"))
        with pytest.raises(ConnectorRunError) as info:
            run_connector(spec, workspace)
    finally:
        upstream.stop()
    assert info.value.terminal and f"127.0.0.1:{elsewhere.port}' is not on the allow-list" in info.value.message
    assert "FLOWGATE_HTTP_ALLOWED_HOSTS" in info.value.message
    assert len(upstream.requests) == 1 and elsewhere.requests == []


def test_a_rest_api_source_whose_base_url_is_off_the_allow_list_calls_nothing(tmp_path: Path, elsewhere):
    spec = _paged_connector(tmp_path, elsewhere.url, "{type: bearer, token: tok-123}")
    with pytest.raises(ConnectorRunError, match="is not on the allow-list"):
        run_connector(spec, Workspace(tmp_path / "dlt", tmp_path / "duckdb", OutboundPolicy.parse("api.example.com")))
    assert elsewhere.requests == []


@pytest.mark.parametrize("auth,sent", [
    ("{type: bearer, token: tok-123}", lambda request: request["headers"].get("authorization") == "Bearer tok-123"),
    ("{type: http_basic, username: u, password: tok-123}", lambda request: "authorization" in request["headers"]),
    ("{type: api_key, name: X-Api-Key, api_key: tok-123}", lambda request: request["headers"].get("x-api-key")),
    ("{type: api_key, name: key, api_key: tok-123, location: query}", lambda request: request["query"].get("key")),
], ids=["bearer", "basic", "api-key-header", "api-key-query"])
def test_a_rest_api_sources_credentials_go_only_to_its_base_urls_origin(tmp_path: Path, elsewhere, auth, sent):
    upstream = LinkedPages(next_url=f"{elsewhere.url}/more?page=2")
    try:
        spec = _paged_connector(tmp_path, upstream.url, auth)
        allowed = OutboundPolicy.parse([f"127.0.0.1:{upstream.port}", f"127.0.0.1:{elsewhere.port}"])
        summary = run_connector(spec, Workspace(tmp_path / "dlt", tmp_path / "duckdb", allowed))
    finally:
        upstream.stop()
    assert summary.rows == {"rows": 2}  # the allowed page elsewhere was read, without the credentials
    assert sent(upstream.requests[0]) and upstream.requests[0]["headers"]["x-tenant-key"] == "tenant-secret"
    assert [request["query"] for request in elsewhere.requests] == [{"page": "2"}]
    assert not sent(elsewhere.requests[0]) and "x-tenant-key" not in elsewhere.requests[0]["headers"]
    assert "tok-123" not in str(elsewhere.requests)


def test_the_gateway_holds_rest_api_connectors_to_flowgate_http_allowed_hosts(tmp_path: Path, app_config, elsewhere):
    upstream = LinkedPages(next_url=f"{elsewhere.url}/stolen?page=2")
    spec_file = _paged_connector(tmp_path, upstream.url, "{type: bearer, token: tok-123}")
    app = create_app({**app_config, "connectors_file": tmp_path / "paged.yaml",
                      "http_allowed_hosts": f"127.0.0.1:{upstream.port}"})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        preview = client.post("/api/v1/connectors/paged/preview", json={})
        assert preview.status_code == 422 and preview.json["code"] == "preview_failed", preview.json
        assert "is not on the allow-list" in preview.json["detail"]
        run = client.post("/trigger", json={"connector_id": spec_file.id, "wait": 60}).json
        assert run["status"] == "failed" and "is not on the allow-list" in run["error"]["message"], run
    finally:
        services.stop(timeout=10)
        services.store.dispose()
        upstream.stop()
    assert len(upstream.requests) == 2 and elsewhere.requests == []  # the first page, once per call
