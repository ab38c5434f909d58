"""A real Prometheus (Debian's `prometheus` package; skipped without it) scrapes a real gunicorn with a read key,
as docker-compose.yml's does, and answers flowgate's series and every query of the Grafana dashboard."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import ROOT, GunicornServer, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=40)
KEY = "prometheus-test-key-0123456789abcdef"
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "flowgate.json").read_text())


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("FLOWGATE_REQUIRE_TOOLS"):
            pytest.fail("prometheus is required here (FLOWGATE_REQUIRE_TOOLS) but not installed")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    return found


def start_prometheus(binary: str, workdir: Path, target: str) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping `target` every second with the key, as compose's config does (a static target here)."""
    (workdir / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: flowgate
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: "{KEY}"
    static_configs:
      - targets: ["{target}"]
""")
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=(workdir / "prometheus.log").open("ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def query(url: str, expr: str) -> dict:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def test_prometheus_scrapes_flowgate_and_answers_the_dashboards_queries(workdir, prometheus_binary):
    gateway = GunicornServer(workdir, workers=2, ready_headers={"Authorization": f"Bearer {KEY}"},
                             FLOWGATE_API_KEYS=f"prometheus:{KEY}:read+trigger").start()
    prometheus = None
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(2):
            assert httpx.post(f"{gateway.url}/trigger", json={"connector_id": "numbers", "wait": 60},
                              headers=headers, timeout=90).json()["status"] == "completed"
        prometheus, url = start_prometheus(prometheus_binary, workdir, gateway.url.removeprefix("http://"))

        def ready() -> bool:  # until then its API answers a plain-text 503 (seen on a loaded machine)
            try:
                return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "Prometheus ready")

        def completed_runs() -> float:
            try:
                result = query(url, 'sum(flowgate_runs_total{job="flowgate", status="completed"})')["result"]
            except httpx.HTTPError:
                return 0
            return float(result[0]["value"][1]) if result else 0

        assert wait_until(completed_runs, 60, "Prometheus has scraped the runs") == 2
        assert query(url, 'up{job="flowgate"}')["result"][0]["value"][1] == "1"
        for panel in DASHBOARD["panels"]:
            for target in panel.get("targets", []):
                expr = (target["expr"].replace("$job", ".*").replace("$__rate_interval", "1m")
                        .replace("$__range", "5m"))
                query(url, expr)  # valid PromQL over the real series
        accepted = query(url, 'sum(flowgate_triggers_total{job=~".*", outcome="accepted"})')["result"]
        assert float(accepted[0]["value"][1]) == 2
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        gateway.kill()
