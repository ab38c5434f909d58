"""schemathesis against the live app's OpenAPI document: every operation, valid and invalid data, keys on.

No response may be a 5xx, and every response must match what the document says. `make test` runs a bounded
number of examples per operation and mode (FLOWGATE_FUZZ_EXAMPLES, 10 by default); `make fuzz` runs many more.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.openapi import build_document

KEY = "fuzz-admin-key-0123456789"
EXAMPLES = int(os.environ.get("FLOWGATE_FUZZ_EXAMPLES", "10"))
DOCUMENT = build_document()
# Negative data needs something to break: a body or a constrained query parameter (any string is a valid id).
CASES = [(method.upper(), path, mode) for path, operations in DOCUMENT["paths"].items()
         for method, operation in operations.items()
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or "requestBody" in operation
         or any(p["in"] != "path" for p in operation.get("parameters", []))]


@pytest.fixture
def fuzzed_app(running_app):
    """The gateway with keys on and its executor running (so readiness is honestly ready)."""
    return running_app


@pytest.fixture
def app_config(app_config: dict) -> dict:
    # schemathesis probes every operation with wrong keys: more than FLOWGATE_AUTH_FAILURE_LIMIT's default allows
    # one address, after which even the right key is refused (tests/test_auth.py checks that limit).
    return {**app_config, "api_keys": f"fuzz:{KEY}:admin", "auth_failure_limit": "100000/minute"}


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_operation_answers_a_5xx_or_breaks_its_documented_shape(fuzzed_app, method, path, mode):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzzed_app, headers={"X-API-Key": KEY})
    # The key goes on every request; schemathesis' own auth check then also sends requests without it.
    schema.config.update(headers={"X-API-Key": KEY})
    schema.config.generation.update(with_security_parameters=False)
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case) -> None:
        # Schema-valid data may still be refused for what a schema cannot say (a cursor the API never issued,
        # a workflow whose nodes do not connect), so `positive_data_acceptance` is the one check left out.
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    fuzz()
