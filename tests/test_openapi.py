"""The OpenAPI document describes every route the app serves, with the shared problem shape."""
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
