"""The rest_api source against a real local HTTP API: three paginators, a token from the environment, retries."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry
from tests.api_server import TOKEN, ApiServer

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
    summary = run_connector(spec, Workspace(tmp_path / "dlt", tmp_path / "duckdb"))
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
    workspace = Workspace(tmp_path / "dlt", tmp_path / "duckdb")
    assert run_connector(spec, workspace).rows == {"changes": 25}

    api.changes[2] = {**api.changes[2], "name": "renamed", "updated": 30}
    api.changes.append({"id": 26, "name": "item 26", "updated": 31})
    second = run_connector(spec, workspace)
    assert api.requests[-1] == "/changes?since=25"  # the cursor came from dlt's state
    assert second.rows == {"changes": 2}
    with duckdb.connect(second.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM api_raw.changes").fetchone()[0] == 26
        assert con.execute("SELECT name FROM api_raw.changes WHERE id = 3").fetchone()[0] == "renamed"
