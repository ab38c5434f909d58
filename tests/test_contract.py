"""The API contract: strict types, inputs bounded to what the run store holds, and a document true as configured."""
from __future__ import annotations

import re

import pytest

from app import create_app

INT32_MAX = 2**31 - 1


def _problem_fields(response) -> list[str]:
    assert response.mimetype == "application/problem+json", response.get_data(as_text=True)
    return [error["field"] for error in response.json.get("errors") or []]


@pytest.mark.parametrize("after", ["23543078186969772032", str(INT32_MAX + 1), "-1", "1.5", "true", "0x10", " 7"])
def test_a_log_cursor_the_column_cannot_hold_or_not_an_integer_is_a_422_naming_after(client, after):
    run_id = client.post("/trigger", json={"connector_id": "numbers"}).json["run_id"]
    response = client.get(f"/api/v1/runs/{run_id}/logs", query_string={"after": after})
    assert response.status_code == 422 and _problem_fields(response) == ["after"]


def test_a_log_cursor_up_to_the_columns_maximum_is_accepted_and_documented(client):
    run_id = client.post("/trigger", json={"connector_id": "numbers"}).json["run_id"]
    for after in (str(INT32_MAX), "3.0"):
        response = client.get(f"/api/v1/runs/{run_id}/logs", query_string={"after": after})
        assert response.status_code == 200 and response.json["items"] == []
    parameters = client.get("/openapi.json").json["paths"]["/api/v1/runs/{run_id}/logs"]["get"]["parameters"]
    after = next(p for p in parameters if p["name"] == "after")
    assert after["schema"]["type"] == "integer" and after["schema"]["maximum"] == INT32_MAX


@pytest.mark.parametrize("path, body, field", [
    ("/trigger", {"connector_id": "numbers", "wait": False}, "wait"),
    ("/trigger", {"connector_id": "numbers", "wait": "1"}, "wait"),
    ("/api/v1/connectors/numbers/runs", {"wait": True}, "wait"),
    ("/api/v1/connectors/numbers/preview", {"limit": True}, "limit"),
    ("/api/v1/connectors/numbers/preview", {"limit": "5"}, "limit"),
    ("/api/v1/connectors/numbers/preview", {"limit": 2.5}, "limit"),
    ("/api/workflow/fan_out/execute", {"wait": False}, "wait"),
    ("/trigger", {"connector_id": 7}, "connector_id"),
])
def test_a_bool_or_a_string_is_never_taken_as_a_number(client, path, body, field):
    response = client.post(path, json=body)
    assert response.status_code == 422 and _problem_fields(response) == [field]
    assert client.get("/api/v1/runs").json["items"] == []


def test_a_number_without_a_fraction_is_an_integer_as_json_schema_says(client):
    response = client.post("/api/v1/connectors/numbers/preview", json={"limit": 2.0})
    assert response.status_code == 200 and len(response.json["resources"]["numbers"]["rows"]) == 2
    assert client.get("/api/v1/runs?limit=2.0").status_code == 200


@pytest.mark.parametrize("text", ['{"connector_id": "numbers", "wait": NaN}',
                                  '{"connector_id": "numbers", "wait": Infinity}'])
def test_nan_and_infinity_are_not_json(client, text):
    response = client.post("/trigger", data=text, content_type="application/json")
    assert response.status_code == 400 and response.json["code"] == "malformed_json"


def test_a_cursor_is_documented_by_a_pattern_and_every_match_is_accepted(client):
    for connector_id in ("shop", "numbers", "shop"):
        client.post("/trigger", json={"connector_id": connector_id})
    parameters = client.get("/openapi.json").json["paths"]["/api/v1/runs"]["get"]["parameters"]
    pattern = next(p for p in parameters if p["name"] == "cursor")["schema"]["pattern"]
    cursor = client.get("/api/v1/runs?limit=1").json["next_cursor"]
    assert re.search(pattern, cursor)
    for matching in (cursor, "0.00000000000000000000000000000000", "9999999999999999.ffffffffffffffffffffffffffffffff"):
        assert re.search(pattern, matching)
        assert client.get("/api/v1/runs", query_string={"cursor": matching}).status_code == 200
    for other in ("", "abc", "12.XYZ", "1" * 17 + "." + "0" * 32):
        assert not re.search(pattern, other)
        response = client.get("/api/v1/runs", query_string={"cursor": other})
        assert response.status_code == 422 and _problem_fields(response) == ["cursor"]


def _document(app_config: dict, **settings) -> dict:
    app = create_app({**app_config, **settings})
    try:
        return app.test_client().get("/openapi.json", headers={"X-API-Key": "contract-key-0123456789"}).json
    finally:
        app.extensions["flowgate"].store.dispose()


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_without_keys_the_document_declares_no_security_and_no_401(app_config):
    document = _document(app_config)
    assert "security" not in document and "securitySchemes" not in document["components"]
    for path, method, operation in _operations(document):
        assert "security" not in operation and "401" not in operation["responses"], (path, method)
        # 403 only as another web page's request refused (app/same_origin.py), never a scope
        assert "403" not in operation["responses"] or "another web page" in operation["responses"]["403"][
            "description"], (path, method)


def test_with_keys_every_operation_but_health_declares_them_and_their_401_and_403(app_config):
    document = _document(app_config, api_keys="contract:contract-key-0123456789:admin")
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert document["security"] == [{"bearer": []}, {"apiKey": []}]
    for path, method, operation in _operations(document):
        if path == "/health":
            assert operation["security"] == [] and "401" not in operation["responses"]
        else:
            assert {"401", "403"} <= set(operation["responses"]), (path, method)


def test_callback_url_is_documented_only_when_callbacks_are_on(app_config):
    def has_callback(document: dict) -> bool:
        schemas = document["components"]["schemas"]
        return any("callback_url" in schemas[name]["properties"] for name in ("RunOptions", "WorkflowExecuteRequest"))

    assert not has_callback(_document(app_config))
    assert has_callback(_document(app_config, callback_secret="s" * 32))


def test_trigger_params_are_documented_per_connector_from_what_each_declares(client):
    document = client.get("/openapi.json").json
    variants = {v["properties"]["connector_id"]["const"]: v
                for v in document["components"]["schemas"]["TriggerRequest"]["oneOf"]}
    assert set(variants) == {"shop", "products", "events", "numbers", "slow", "broken"}
    numbers = variants["numbers"]["properties"]["params"]
    assert numbers["additionalProperties"] is False
    assert set(numbers["properties"]) == {"n", "delay_seconds"}  # full_refresh: only where a connector allows it
    assert numbers["properties"]["n"]["type"] == ["number", "null"]
    assert set(variants["shop"]["properties"]["params"]["properties"]) == {"tables"}
    assert set(variants["products"]["properties"]["params"]["properties"]) == {"file_glob"}
    runs = document["paths"]["/api/v1/connectors/{connector_id}/runs"]["post"]
    connector_id = next(p for p in runs["parameters"] if p["name"] == "connector_id")
    assert connector_id["schema"]["enum"] == list(variants)


@pytest.mark.parametrize("params, field", [({"n": "5"}, "params.n"), ({"n": True}, "params.n"),
                                           ({"tables": ["orders"]}, "params.tables"),
                                           ({"full_refresh": 1}, "params.full_refresh")])
def test_params_outside_the_documented_ones_are_a_422_naming_the_key(client, params, field):
    response = client.post("/trigger", json={"connector_id": "numbers", "params": params})
    assert response.status_code == 422 and _problem_fields(response) == [field]


def test_node_types_are_documented_as_an_enum(client):
    document = client.get("/openapi.json").json
    node_type = document["components"]["schemas"]["ExecuteNodeRequest"]["properties"]["nodeType"]
    assert {"http", "transform", "llm", "output"} <= set(node_type["enum"])
    response = client.post("/api/workflow/w/execute-node", json={"nodeId": "a", "nodeType": "nope"})
    assert response.status_code == 422 and _problem_fields(response) == ["nodeType"]


@pytest.mark.parametrize("body", [{}, {"idempotency_key": "body-key"}])
def test_an_idempotency_key_header_outside_its_pattern_is_a_422_even_beside_a_body_key(client, body):
    response = client.post("/trigger", json={"connector_id": "numbers", **body}, headers={"Idempotency-Key": "é"})
    assert response.status_code == 422 and _problem_fields(response) == ["Idempotency-Key"]


def test_execute_node_documents_its_workflow_id_as_any_text_because_it_takes_any(client):
    operation = client.get("/openapi.json").json["paths"]["/api/workflow/{workflow_id}/execute-node"]["post"]
    assert operation["parameters"][0]["schema"] == {"type": "string"}
    response = client.post("/api/workflow/%17q1%C2%AA/execute-node", json={"nodeType": "trigger", "nodeId": "0"})
    assert response.status_code == 200 and response.json["success"] is True
