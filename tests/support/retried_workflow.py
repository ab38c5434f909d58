"""A workflow run whose http node fails once and is retried, for the tests of what a run's threads log."""
from __future__ import annotations

from app import create_app
from tests.support.fake_services import EchoService
from tests.support.waiting import wait_until_ended


def run_a_retried_http_node(app_config: dict) -> tuple[dict, list[dict]]:
    """A workflow whose http node fails once and is retried (the engine logs the retry from the node's thread);
    returns the finished execution and the run's stored log lines."""
    echo = EchoService()
    echo.failures = 1
    app = create_app({**app_config, "http_allowed_hosts": f"127.0.0.1:{echo.port}"})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        inline = {"nodes": [{"id": "call", "type": "http", "retries": 1, "retry_backoff_seconds": 0,
                             "config": {"url": f"{echo.url}/flaky"}}]}
        accepted = client.post("/api/workflow/logged/execute", json={"workflow": inline}).json
        done = wait_until_ended(client, accepted["statusUrl"])
        return done, client.get(f"/api/v1/runs/{accepted['executionId']}/logs").json["items"]
    finally:
        services.stop(timeout=5)
        services.store.dispose()
        echo.stop()
