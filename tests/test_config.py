"""Settings: read once from the environment; a bad value stops the start naming the variable."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app import create_app
from app.config import ConfigError, Settings, load_settings


def test_defaults_work_on_a_bare_machine(monkeypatch):
    for name in ("FLOW_SERVER_PORT", "DATABASE_URL", "FLOWGATE_VAR_DIR", "FLOWGATE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.port == 5000 and settings.backend == "auto"
    assert settings.run_store_url == f"sqlite:///{Path('var/flowgate.db').resolve()}"
    assert settings.duckdb_dir == Path("var/duckdb").resolve()


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("FLOW_SERVER_PORT", "6001")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://db/flowgate")
    monkeypatch.setenv("FLOWGATE_EXECUTOR_THREADS", "4")
    settings = load_settings()
    assert (settings.port, settings.run_store_url, settings.executor_threads) == (
        6001, "postgresql+psycopg://db/flowgate", 4)


def test_only_the_documented_names_are_read_not_bare_field_names(monkeypatch):
    """A platform's own PORT, or an API_KEYS meant for something else, must not change flowgate's settings."""
    for name, value in (("PORT", "7001"), ("BACKEND", "local"), ("LEASE_SECONDS", "5"), ("API_KEYS", "x:y"),
                        ("port", "7002"), ("var_dir", "/tmp/elsewhere")):
        monkeypatch.setenv(name, value)
    for name in ("FLOW_SERVER_PORT", "FLOWGATE_BACKEND", "FLOWGATE_LEASE_SECONDS", "FLOWGATE_API_KEYS",
                 "FLOWGATE_VAR_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert (settings.port, settings.backend, settings.lease_seconds, settings.api_keys, settings.var_dir) == (
        5000, "auto", 30.0, None, Path("var"))
    assert load_settings({"lease_seconds": 12}).lease_seconds == 12  # tests and create_app pass field names


@pytest.mark.parametrize("name, value", [
    ("FLOW_SERVER_PORT", "http"), ("FLOW_SERVER_PORT", "70000"), ("FLOWGATE_BACKEND", "spark"),
    ("FLOWGATE_EXECUTOR_THREADS", "-1"), ("FLOWGATE_LEASE_SECONDS", "0"),
])
def test_a_bad_value_stops_the_start_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_an_invalid_connectors_file_stops_the_app_from_starting(tmp_path):
    (tmp_path / "c.yaml").write_text("connectors:\n  x:\n    source: {kind: nope}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: connector 'x': field 'source'"):
        create_app({"var_dir": tmp_path / "var", "connectors_file": tmp_path / "c.yaml",
                    "workflows_dir": tmp_path / "workflows"})


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_read_from_its_documented_variable(monkeypatch, name):
    """The variable the reference names (docs/operations.md) is the one read: a probe value in it is either the
    setting's value or refused naming that variable."""
    variable = Settings.env_name(name)
    monkeypatch.setenv(variable, "probe")
    try:
        value = load_settings().model_dump()[name]
    except ConfigError as exc:
        assert f"{variable}: " in str(exc)
    else:
        assert str(value) == "probe"


def test_make_stack_reads_the_gateways_variables_under_the_gateways_names_and_rules(monkeypatch):
    """flows/ cannot import the gateway's Settings: the stack's own model must read what the gateway reads alike."""
    from flows.prefect.stack import StackSettings

    shared = set(StackSettings.model_fields) & set(Settings.model_fields)
    assert {"var_dir", "port", "prefect_pool", "prefect_worker_max_age_seconds"} <= shared
    for name in shared:
        stack_field, gateway_field = StackSettings.model_fields[name], Settings.model_fields[name]
        assert (StackSettings.env_name(name), stack_field.annotation, stack_field.metadata) == (
            Settings.env_name(name), gateway_field.annotation, gateway_field.metadata), name
    monkeypatch.setenv("FLOWGATE_PREFECT_POOL", "elsewhere")
    monkeypatch.setenv("FLOWGATE_STACK_POSTGRES_URL", "")
    settings = StackSettings()
    assert (settings.prefect_pool, settings.stack_postgres_url, settings.prefect_worker_max_age_seconds) == (
        "elsewhere", "", 35)
    monkeypatch.setenv("FLOWGATE_PREFECT_WORKER_MAX_AGE_SECONDS", "soon")
    with pytest.raises(ValidationError) as caught:
        StackSettings()
    assert "FLOWGATE_PREFECT_WORKER_MAX_AGE_SECONDS: " in StackSettings.problems(caught.value)
