"""Request ids (honoured, echoed, generated) and JSON log lines that carry the request and run ids."""
from __future__ import annotations

import json
import logging

import pytest

from app.logs import ContextFilter, JsonLines
from tests.support.retried_workflow import run_a_retried_http_node


class Capture(logging.Handler):
    """Collects records as the JSON formatter renders them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []
        self.addFilter(ContextFilter())
        self.setFormatter(JsonLines())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def captured():
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(previous)


def test_an_incoming_request_id_is_echoed_and_a_missing_one_is_made(client):
    assert client.get("/health", headers={"X-Request-ID": "spring-42"}).headers["X-Request-ID"] == "spring-42"
    made = client.get("/health").headers["X-Request-ID"]
    assert len(made) == 32 and made != client.get("/health").headers["X-Request-ID"]
    hostile = client.get("/health", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"]
    assert hostile != "x" * 500  # an id we would not log as is is replaced
    assert client.get("/api/v1/runs/nope", headers={"X-Request-ID": "r-1"}).headers["X-Request-ID"] == "r-1"


def test_a_line_logged_while_handling_a_request_carries_its_id(client, captured):
    run = client.post("/trigger", json={"connector_id": "numbers"}, headers={"X-Request-ID": "req-7"}).json
    lines = [line for line in captured if line.get("request_id") == "req-7"]
    assert lines, captured
    assert lines[0]["message"].startswith(f"run {run['run_id']} accepted: connector numbers on local")
    assert lines[0]["run_id"] == run["run_id"] and lines[0]["level"] == "INFO"
    assert {"time", "logger", "pid"} <= set(lines[0])


def test_lines_logged_by_a_runs_threads_carry_the_run_id(app_config, captured):
    done, _ = run_a_retried_http_node(app_config)
    assert done["status"] == "completed"
    retried = [line for line in captured if "attempt 1 failed" in line["message"]]
    assert retried and retried[0]["run_id"] == done["executionId"], captured


def test_a_key_in_the_query_string_is_scrubbed_from_the_access_log():
    from app.logs import AccessJsonLines

    atoms = {"h": "127.0.0.1", "m": "GET", "U": "/api/v1/runs", "q": "api_key=guessed-key-0123456789&limit=5",
             "s": "401", "B": "120", "M": "3", "a": "curl"}
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(h)s", (), None)
    record.args = atoms  # gunicorn passes its atoms as the record's args
    line = json.loads(AccessJsonLines().format(record))
    assert line["query"] == "api_key=***&limit=5" and line["status"] == 401
    assert "guessed-key-0123456789" not in json.dumps(line)
