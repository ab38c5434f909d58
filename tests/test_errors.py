"""Bad input: a clear application/problem+json 4xx naming the field, nothing changed, never a 500."""
from __future__ import annotations

import pytest

from tests.support.problems import assert_problem


@pytest.mark.parametrize("data, code", [
    ("{not json", "malformed_json"),
    ('{"connector_id": "shop",}', "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    ("[1, 2]", "body_not_object"),
    ('"shop"', "body_not_object"),
    ("null", "body_not_object"),
])
def test_a_body_that_is_not_a_json_object_is_a_400(client, data, code):
    assert_problem(client.post("/trigger", data=data, content_type="application/json"), 400, code)
    assert client.get("/api/v1/runs").json["items"] == []


@pytest.mark.parametrize("body, fields", [
    ({}, ["connector_id"]),
    ({"connector_id": 42}, ["connector_id"]),
    ({"connector_id": ""}, ["connector_id"]),
    ({"connector_id": "shop", "paramz": {}}, ["paramz"]),
    ({"connector_id": "shop", "params": [1]}, ["params"]),
    ({"connector_id": "shop", "wait": "soon"}, ["wait"]),
    ({"connector_id": "shop", "wait": -1}, ["wait"]),
    ({"connector_id": "shop", "wait": 100000}, ["wait"]),
    ({"connector_id": "shop", "backend": "spark"}, ["backend"]),
    ({"connector_id": 1, "wait": "x", "extra": True}, ["connector_id", "wait", "extra"]),
    ({"connector_id": "shop", "params": {"url": "sqlite:///etc/passwd"}}, ["params.url"]),
    ({"connector_id": "numbers", "params": {"n": "many"}}, ["params.n"]),
    ({"connector_id": "shop", "idempotency_key": ""}, ["idempotency_key"]),
])
def test_a_wrong_field_is_a_422_naming_each_field(client, body, fields):
    problem = assert_problem(client.post("/trigger", json=body), 422, "validation_failed")
    assert sorted(e["field"] for e in problem["errors"]) == sorted(fields)
    assert client.get("/api/v1/runs").json["items"] == []


def test_an_idempotency_header_that_is_too_long_is_a_422(client):
    problem = assert_problem(client.post("/trigger", json={"connector_id": "shop"},
                                         headers={"Idempotency-Key": "k" * 256}), 422, "validation_failed")
    assert problem["errors"][0]["field"] == "Idempotency-Key"


def test_an_unknown_connector_is_a_404(client):
    assert_problem(client.post("/trigger", json={"connector_id": "nope"}), 404, "connector_not_found")
    assert_problem(client.post("/api/v1/connectors/nope/runs", json={}), 404, "connector_not_found")
    assert client.get("/api/v1/runs").json["items"] == []


def test_an_oversized_body_is_a_413(client, app):
    limit = app.config["MAX_CONTENT_LENGTH"]
    body = '{"connector_id": "shop", "params": {"x": "' + "a" * limit + '"}}'
    problem = assert_problem(client.post("/trigger", data=body, content_type="application/json"), 413,
                             "body_too_large")
    assert str(limit) in problem["detail"]
    assert client.get("/api/v1/runs").json["items"] == []


@pytest.mark.parametrize("method, path", [
    ("get", "/trigger"), ("delete", "/trigger"), ("post", "/health"), ("put", "/api/v1/runs"),
    ("get", "/api/v1/runs/abc/cancel"), ("delete", "/api/v1/connectors/shop"),
])
def test_a_wrong_method_is_a_405_with_allow(client, method, path):
    response = getattr(client, method)(path)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers.get("Allow")


@pytest.mark.parametrize("path", ["/", "/nope", "/api/v1", "/api/v1/runs/a/b/c", "/trigger/extra"])
def test_an_unknown_path_is_a_404(client, path):
    assert_problem(client.get(path), 404, "not_found")


@pytest.mark.parametrize("query, fields", [
    ("limit=abc", ["limit"]),
    ("limit=0", ["limit"]),
    ("limit=100000", ["limit"]),
    ("status=exploded", ["status"]),
    ("sort=asc", ["sort"]),
    ("cursor=%%%", ["cursor"]),
    ("cursor=bm90LWEtY3Vyc29y", ["cursor"]),
    ("limit=1&limit=2", ["limit"]),
])
def test_a_bad_query_parameter_is_a_422_naming_it(client, query, fields):
    problem = assert_problem(client.get(f"/api/v1/runs?{query}"), 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == fields


def test_an_unexpected_failure_is_a_500_problem_without_internals(app, client, monkeypatch):
    store = app.extensions["flowgate"].store

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail at /srv/db")

    monkeypatch.setattr(store, "list", explode)
    response = client.get("/api/v1/runs")
    problem = assert_problem(response, 500, "internal_error")
    assert "secret internal detail" not in response.get_data(as_text=True)
    assert problem["instance"] == "/api/v1/runs"


@pytest.mark.parametrize("body, field", [
    ({"connector_id": "shop"}, "connector_id"),
    ({"params": "n=3"}, "params"),
    ({"wait": True, "wait_seconds": 1}, "wait_seconds"),
    ({"params": {"rows": 1}}, "params.rows"),
])
def test_the_versioned_trigger_route_refuses_bad_fields_too(client, body, field):
    problem = assert_problem(client.post("/api/v1/connectors/numbers/runs", json=body), 422, "validation_failed")
    assert field in [e["field"] for e in problem["errors"]]
    assert client.get("/api/v1/runs").json["items"] == []
