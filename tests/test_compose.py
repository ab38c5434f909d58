"""docker-compose.yml, checked without a Docker engine: the services are wired to each other and to real files."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_it_runs_postgresql_redis_the_prefect_server_a_worker_the_gateway_a_proxy_and_prometheus():
    assert set(SERVICES) == {"postgres", "redis", "prefect-server", "prefect-deploy", "prefect-worker", "gateway",
                             "proxy", "prometheus"}
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").exists()


def test_the_gateway_and_worker_share_one_run_store_and_prefect():
    gateway, worker = SERVICES["gateway"]["environment"], SERVICES["prefect-worker"]["environment"]
    assert gateway["DATABASE_URL"] == worker["DATABASE_URL"] and "@postgres:5432/" in gateway["DATABASE_URL"]
    assert gateway["PREFECT_API_URL"] == worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "@postgres:5432/prefect" in SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "CREATE DATABASE prefect" in COMPOSE["configs"]["create-prefect-database"]["content"]
    assert gateway["FLOWGATE_RATE_LIMIT_STORAGE"].startswith("redis://redis:")
    volumes = lambda name: {v.split(":")[0] for v in SERVICES[name].get("volumes", [])}  # noqa: E731
    assert "flowgate-var" in volumes("gateway") & volumes("prefect-worker")  # DuckDB files and dlt state


def test_the_gateway_cannot_start_without_api_keys():
    assert SERVICES["gateway"]["environment"]["FLOWGATE_API_KEYS"].startswith("${FLOWGATE_API_KEYS:?")


def test_commands_name_modules_that_exist():
    assert SERVICES["prefect-deploy"]["command"][:3] == ["python", "-m", "flows.prefect.deploy"]
    assert importlib.util.find_spec("flows.prefect.deploy") is not None
    assert SERVICES["prefect-worker"]["command"][:3] == ["prefect", "worker", "start"]


def nginx_directives(text: str) -> dict[str, list[str]]:
    """Every `name value;` of an nginx config, by name (comments dropped)."""
    found: dict[str, list[str]] = {}
    for name, value in re.findall(r"^\s*([a-z_]+)\s+([^;{]*);", re.sub(r"#.*", "", text), re.MULTILINE):
        found.setdefault(name, []).append(value.strip())
    return found


def test_the_gateway_is_reached_only_through_a_buffering_proxy():
    gateway, proxy = SERVICES["gateway"], SERVICES["proxy"]
    assert "ports" not in gateway  # gunicorn is not published: slow clients would hold its threads
    assert proxy["ports"] == ["5000:8080"] and proxy["image"].startswith("nginx:")
    assert proxy["depends_on"]["gateway"]["condition"] == "service_healthy"
    [config] = proxy["configs"]
    assert config["target"] == "/etc/nginx/nginx.conf"
    path = ROOT / COMPOSE["configs"][config["source"]]["file"]
    directives = nginx_directives(path.read_text())
    assert directives["listen"] == ["8080"]
    assert directives["server"] == ["gateway:5000"] and directives["proxy_pass"] == ["http://flowgate"]
    assert "upstream flowgate" in path.read_text()
    for timeout in ("client_header_timeout", "client_body_timeout"):
        [value] = directives[timeout]
        assert value.endswith("s") and 0 < int(value[:-1]) <= 30, f"{timeout} {value}"
    assert directives["proxy_buffering"] == ["on"] and directives["proxy_request_buffering"] == ["on"]
    assert "X-Forwarded-For $remote_addr" in directives["proxy_set_header"]
    # Longer than the longest wait the gateway may hold a request for (FLOWGATE_MAX_WAIT_SECONDS, 300 s by default).
    assert int(directives["proxy_read_timeout"][0][:-1]) > 300


def test_prometheus_scrapes_every_gateway_replicas_metrics_with_a_read_key():
    prometheus = SERVICES["prometheus"]
    mount = next(c for c in prometheus["configs"] if c["source"] == "prometheus-config")
    assert f"--config.file={mount['target']}" in prometheus["command"]
    config = yaml.safe_load(COMPOSE["configs"]["prometheus-config"]["content"])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials": "${FLOWGATE_METRICS_KEY:-}"}
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["gateway"] and str(discovery["port"]) in SERVICES["gateway"]["expose"]


def test_the_gateway_and_the_flow_runs_read_the_otlp_endpoint():
    for name in ("gateway", "prefect-worker"):
        assert SERVICES[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert SERVICES["prefect-worker"]["environment"]["PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER"] == "json"


def test_only_the_proxy_is_published_beyond_the_host():
    """Prefect's API and Prometheus have no authentication (review C1: anyone reaching Prefect's could start flow
    runs): the host reaches them on loopback, the other services on the compose network."""
    published = {name: service.get("ports", []) for name, service in SERVICES.items() if service.get("ports")}
    assert set(published) == {"prefect-server", "proxy", "prometheus"}
    for name, ports in published.items():
        for port in ports:
            if name != "proxy":
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert SERVICES["gateway"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
