"""Work done inside the request (execute-node, preview) takes one of a few slots per process, answered 429 when none
is free, and a preview has a deadline: trigger keys cannot take every request thread (review M2)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer

DELAY_NODE = {"nodeId": "d0", "nodeType": "delay", "node": {"timeout": 30, "config": {"seconds": 6}}, "inputData": {}}


@pytest.fixture
def app_config(app_config: dict) -> dict:
    return {**app_config, "preview_timeout_seconds": 3.0}


def test_without_a_free_slot_execute_node_and_preview_are_a_429_with_retry_after(app_config):
    from app import create_app

    app = create_app({**app_config, "max_concurrent_inline": 0})
    client = app.test_client()
    node = {**DELAY_NODE, "node": {"timeout": 30, "config": {"seconds": 0}}}
    for path, body in (("/api/workflow/x/execute-node", node), ("/api/v1/connectors/numbers/preview", {"limit": 1})):
        response = client.post(path, json=body)
        assert response.status_code == 429 and response.mimetype == "application/problem+json", response.json
        assert response.json["code"] == "inline_slots_full" and response.headers["Retry-After"] == "2"
        assert "FLOWGATE_MAX_CONCURRENT_INLINE" in response.json["detail"]
    app.extensions["flowgate"].store.dispose()


def test_a_preview_whose_source_hangs_is_stopped_at_its_deadline_and_gives_back_its_slot(client):
    started = time.monotonic()
    response = client.post("/api/v1/connectors/numbers/preview", json={"limit": 1, "params": {"delay_seconds": 60}})
    assert response.status_code == 504 and response.json["code"] == "preview_timeout", response.json
    assert "FLOWGATE_PREVIEW_TIMEOUT_SECONDS" in response.json["detail"]
    assert time.monotonic() - started < 30  # the deadline (3 s) and the forkserver's start, not the source's 60 s
    quick = client.post("/api/v1/connectors/numbers/preview", json={"limit": 2})
    assert quick.status_code == 200 and len(quick.json["resources"]["numbers"]["rows"]) == 2


def test_a_preview_that_fails_in_its_process_is_still_a_422(client):
    response = client.post("/api/v1/connectors/broken/preview", json={"limit": 1})
    assert response.status_code == 422 and response.json["code"] == "preview_failed"


def test_health_answers_while_trigger_keys_send_more_execute_nodes_than_threads(workdir: Path):
    # One worker of 4 threads, 2 for inline work: 6 six-second nodes at once, and /health is probed meanwhile.
    server = GunicornServer(workdir, workers=1, GUNICORN_THREADS="4", FLOWGATE_MAX_CONCURRENT_INLINE="2").start()
    answers: list[tuple[int, float]] = []
    try:
        def execute_node() -> None:
            started = time.monotonic()
            response = httpx.post(f"{server.url}/api/workflow/x/execute-node", json=DELAY_NODE, timeout=60)
            answers.append((response.status_code, time.monotonic() - started))

        callers = [threading.Thread(target=execute_node) for _ in range(6)]
        for caller in callers:
            caller.start()
        time.sleep(1.5)  # the nodes have their slots, or their 429
        probes = []
        for _ in range(4):
            started = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            probes.append(time.monotonic() - started)
            time.sleep(0.5)
        for caller in callers:
            caller.join(60)
        assert sorted(status for status, _ in answers) == [200, 200, 429, 429, 429, 429], answers
        assert all(seconds < 3 for status, seconds in answers if status == 429), answers  # at once, not queued
        assert max(probes) < 1.0, probes
    finally:
        server.terminate()
