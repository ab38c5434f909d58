"""The OpenAPI document describes every route the app serves, with the shared problem shape, and every view answers
the model the document names for it."""
from __future__ import annotations

import re


def test_every_route_is_documented(app, client):
    document = client.get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "openapi") or rule.endpoint.startswith("ui."):  # the dashboard's files
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented


def test_every_reference_resolves_and_errors_are_problem_documents(client):
    document = client.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', client.get("/openapi.json").get_data(as_text=True)))
    assert refs <= set(schemas)
    trigger = document["paths"]["/trigger"]["post"]
    assert set(trigger["responses"]) >= {"200", "202", "400", "404", "413", "422"}
    assert "application/problem+json" in trigger["responses"]["422"]["content"]
    assert all(set(variant["required"]) == {"connector_id"} for variant in schemas["TriggerRequest"]["oneOf"])


def test_a_connector_runs_result_and_a_previews_changes_are_described(client):
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    result = schemas["RunOut"]["properties"]["result"]
    assert {"$ref": "#/components/schemas/LoadResult"} in result["anyOf"]
    assert {"rows", "load_ids", "schema_changes", "incremental", "merge"} <= set(schemas["LoadResult"]["properties"])
    assert set(schemas["TableChanges"]["properties"]) == {"new_table", "new_columns", "variant_columns", "type_changes"}
    assert set(schemas["IncrementalWindow"]["properties"]) == {"cursor_path", "from", "to", "rows"}
    assert set(schemas["MergeCounts"]["properties"]) == {"inserted", "updated"}
    assert {"changes", "changes_unavailable"} <= set(schemas["PreviewOut"]["properties"])
    assert set(schemas["TablePreviewChanges"]["properties"]) == {"new_table", "new_columns", "refused"}


def test_a_load_summary_has_the_fields_its_documented_shape_lists():
    from dataclasses import fields

    from app.schemas import LoadResult
    from connectors.pipeline import LoadSummary

    assert {f.name for f in fields(LoadSummary)} == set(LoadResult.model_fields)


def test_a_conflict_policys_answers_are_described(client):
    document = client.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    for path, answers in (("/trigger", {"RunOut", "RunJoined", "TriggerSkipped"}),
                          ("/api/v1/connectors/{connector_id}/runs", {"RunOut", "RunJoined", "TriggerSkipped"}),
                          ("/api/workflow/{workflow_id}/execute",
                           {"WorkflowAccepted", "WorkflowJoined", "WorkflowSkipped"})):
        responses = document["paths"][path]["post"]["responses"]
        variants = responses["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert {variant["$ref"].rsplit("/", 1)[1] for variant in variants} == answers
        assert "Retry-After" in responses["200"]["headers"]  # a joined run that has not ended
        assert "run_in_progress" in responses["409"]["description"]
    for joined in ("RunJoined", "WorkflowJoined"):
        assert "joined" in schemas[joined]["required"] and schemas[joined]["properties"]["joined"]["const"] is True
    for skipped in ("TriggerSkipped", "WorkflowSkipped"):
        assert schemas[skipped]["properties"]["skipped"]["const"] == "already_active"
    assert "joined_count" in schemas["RunOut"]["required"]


SCHEDULED_CONNECTOR = """
  nightly:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}
"""
SCHEDULED_WORKFLOW = """
description: says hello every five minutes
schedule: {cron: "*/5 * * * *"}
nodes:
  - {id: start, type: trigger}
  - {id: result, type: output, config: {value: hello}}
connections:
  - {from: start, to: result}
"""


def documented_answer_errors(document: dict, path: str, method: str, response) -> list[str]:
    """Why the answer is not what the document names for its status and content type (nothing when it is)."""
    from jsonschema import Draft202012Validator, FormatChecker

    described = document["paths"][path][method]["responses"].get(str(response.status_code))
    if described is None:
        return [f"{response.status_code} is not documented"]
    content = described.get("content", {}).get(response.mimetype)
    if content is None:
        return [f"{response.mimetype} is not documented for {response.status_code}"]
    # The document's components beside the response's schema, so its #/components/schemas/... references resolve.
    validator = Draft202012Validator({**content["schema"], "components": document["components"]},
                                     format_checker=FormatChecker())
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(
        response.get_json())]


def test_every_views_answer_is_the_model_the_document_names_for_it(app_config, workdir):
    """One representative request per documented JSON operation: each answer validates against the schema of its
    status in the document (the models of app/schemas.py), and no documented operation goes without one."""
    from app import create_app

    (workdir / "connectors.yaml").write_text((workdir / "connectors.yaml").read_text() + SCHEDULED_CONNECTOR)
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "hello.yaml").write_text(SCHEDULED_WORKFLOW)
    app = create_app(app_config)  # no executor: runs stay queued, so a second trigger meets an active one
    client = app.test_client()
    document = client.get("/openapi.json").json
    asked: dict[tuple[str, str], set[int]] = {}
    errors: list[str] = []

    def ask(method: str, path: str, json: dict | None = None, **values: str):
        response = client.open(path.format(**values), method=method.upper(), json=json)
        asked.setdefault((path, method), set()).add(response.status_code)
        errors.extend(f"{method.upper()} {path} -> {error}"
                      for error in documented_answer_errors(document, path, method, response))
        return response.get_json()

    try:
        ask("get", "/health")
        ask("get", "/api/v1/health/ready")
        ask("get", "/api/v1/whoami")
        ask("get", "/api/v1/connectors")
        ask("get", "/api/v1/connectors/{connector_id}", connector_id="nightly")
        ask("get", "/api/v1/connectors/{connector_id}/stats", connector_id="numbers")
        ask("get", "/api/v1/connectors/{connector_id}/schema", connector_id="numbers")
        ask("post", "/api/v1/connectors/{connector_id}/preview", {"limit": 2}, connector_id="products")
        for kind, target in (("connectors", "nightly"), ("workflows", "hello")):
            for verb in ("pause", "resume"):
                ask("post", f"/api/v1/{kind}/{{{kind[:-1]}_id}}/schedule/{verb}", **{f"{kind[:-1]}_id": target})
        ask("get", "/api/v1/workflows")
        ask("get", "/api/v1/workflows/{workflow_id}", workflow_id="hello")
        run = ask("post", "/trigger", {"connector_id": "numbers"})
        ask("post", "/trigger", {"connector_id": "numbers", "on_conflict": "skip"})
        ask("post", "/api/v1/connectors/{connector_id}/runs", {"on_conflict": "skip"}, connector_id="numbers")
        execution = ask("post", "/api/workflow/{workflow_id}/execute", {}, workflow_id="hello")
        ask("post", "/api/workflow/{workflow_id}/execute", {"on_conflict": "skip"}, workflow_id="hello")
        ask("get", "/api/workflow/execution/{execution_id}", execution_id=execution["executionId"])
        ask("post", "/api/workflow/{workflow_id}/execute-node",
            {"nodeId": "t", "nodeType": "transform", "node": {"config": {"value": {"a": "{{ inputs.x }}"}}},
             "inputData": {"x": 1}}, workflow_id="any")
        ask("get", "/api/v1/runs")
        ask("get", "/api/v1/runs/{run_id}", run_id=run["run_id"])
        ask("get", "/api/v1/runs/{run_id}/logs", run_id=run["run_id"])
        ask("post", "/api/v1/runs/{run_id}/cancel", run_id=run["run_id"])
        ask("post", "/api/v1/runs/{run_id}/rerun", {}, run_id=run["run_id"])
        ask("post", "/api/v1/runs/rerun", {"filter": {"status": "cancelled"}, "dry_run": True})
        ask("get", "/api/v1/runs/{run_id}", run_id="0" * 32)  # a problem document, as the document says
    finally:
        app.extensions["flowgate"].store.dispose()
    assert errors == []
    json_operations = {(path, method) for path, item in document["paths"].items() for method, operation in item.items()
                       if any("application/json" in answer.get("content", {})
                              for answer in operation["responses"].values())}
    assert json_operations - set(asked) == set()
    assert asked[("/trigger", "post")] == {200, 202}  # a queued run and a skip
    assert asked[("/api/workflow/{workflow_id}/execute", "post")] == {200, 202}
