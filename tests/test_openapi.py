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
