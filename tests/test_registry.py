"""connectors.yaml: validation with errors that name file, connector and field; env substitution; redaction."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from connectors.registry import ConnectorRegistry, RegistryError
from connectors.spec import ParamsError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "connectors.yaml"
    path.write_text(text)
    return path


def test_the_shipped_connectors_file_is_valid():
    registry = ConnectorRegistry.load(ROOT / "connectors.yaml")
    assert {spec.id for spec in registry} >= {"demo_orders", "demo_products"}
    orders = registry.get("demo_orders")
    assert orders.source.backend == "pyarrow" and orders.source.tables == ["orders", "customers"]
    assert orders.source.url == f"sqlite:///{ROOT / 'data' / 'demo_shop.db'}"


def test_env_references_are_substituted_with_defaults(tmp_path: Path):
    path = write(tmp_path, """
connectors:
  c:
    source: {kind: sql_database, url: "${SHOP_URL:sqlite:///default.db}", tables: ["${TABLE}"]}
""")
    spec = ConnectorRegistry.load(path, environ={"TABLE": "orders"}).get("c")
    assert spec.source.url == f"sqlite:///{tmp_path / 'default.db'}" and spec.source.tables == ["orders"]
    spec = ConnectorRegistry.load(path, environ={"TABLE": "t", "SHOP_URL": "postgresql://u:pw@db/x"}).get("c")
    assert spec.source.url == "postgresql://u:pw@db/x"


def test_a_missing_env_var_without_default_names_connector_and_field(tmp_path: Path):
    path = write(tmp_path, "connectors:\n  c:\n    source: {kind: python, ref: 'connectors.demo:numbers', "
                           "args: {n: '${ROWS}'}}\n")
    with pytest.raises(RegistryError, match=r"connector 'c'.source.args.n: environment variable ROWS is not set"):
        ConnectorRegistry.load(path, environ={})


@pytest.mark.parametrize("body, field", [
    ("source: {kind: sql_database, url: 'sqlite:///x.db', tablez: [a]}", "source.tablez"),
    ("source: {kind: ftp, url: x}", "source"),
    ("source: {kind: python}", "source.ref"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    write_disposition: upsert", "write_disposition"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    dataset: 'bad name'", "dataset"),
    ("source: {kind: python, ref: 'connectors.demo:no_such_function'}", "source.ref"),
    ("source: {kind: python, ref: 'no_such_module:f'}", "source.ref"),
    ("description: no source", "source"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    schema_contract: frozen", "schema_contract"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    schema_contract: {colums: freeze}",
     "schema_contract.colums"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    schema_contract: {tables: strict}",
     "schema_contract.tables"),
    ("source: {kind: python, ref: 'connectors.demo:numbers'}\n    schema_contract: {}", "schema_contract"),
])
def test_an_invalid_connector_is_refused_naming_file_connector_and_field(tmp_path: Path, body: str, field: str):
    path = write(tmp_path, f"connectors:\n  good:\n    source: {{kind: python, ref: 'connectors.demo:numbers'}}\n"
                           f"  bad_one:\n    {body}\n")
    with pytest.raises(RegistryError) as info:
        ConnectorRegistry.load(path)
    message = str(info.value)
    assert str(path) in message and "connector 'bad_one'" in message and f"field '{field}'" in message


@pytest.mark.parametrize("text, expected", [
    ("connectors: [a, b]", "expected a mapping"),
    ("connectors: {}\nextra: 1", "unknown top-level key"),
    ("connectors: {c: [1]", "not valid YAML"),
])
def test_a_malformed_file_is_refused_naming_the_file(tmp_path: Path, text: str, expected: str):
    path = write(tmp_path, text)
    with pytest.raises(RegistryError, match=expected) as info:
        ConnectorRegistry.load(path)
    assert str(path) in str(info.value)


def test_a_missing_file_says_which_setting_to_change(tmp_path: Path):
    with pytest.raises(RegistryError, match="FLOWGATE_CONNECTORS"):
        ConnectorRegistry.load(tmp_path / "nope.yaml")


def test_secrets_are_redacted_in_the_public_view(tmp_path: Path):
    path = write(tmp_path, """
connectors:
  c:
    source: {kind: sql_database, url: "postgresql+psycopg://loader:${DB_PASSWORD}@db:5432/shop"}
    destination: {kind: postgres, credentials: {password: hunter2, host: dwh}, api_key: abc}
""")
    public = ConnectorRegistry.load(path, environ={"DB_PASSWORD": "s3cr3t"}).get("c").public_dict()
    text = str(public)
    assert "s3cr3t" not in text and "hunter2" not in text and "abc" not in text
    assert public["source"]["url"] == "postgresql+psycopg://loader:***@db:5432/shop"
    assert public["destination"]["credentials"] == {"password": "***", "host": "dwh"}


def test_params_may_override_only_declared_fields():
    registry = ConnectorRegistry.load(ROOT / "connectors.yaml")
    numbers = registry.get("demo_numbers")
    assert numbers.with_params({"n": 5}).source.args == {"n": 5, "delay_seconds": 0}
    with pytest.raises(ParamsError) as info:
        numbers.with_params({"rows": 5})
    assert info.value.field == "params.rows"
    with pytest.raises(ParamsError, match="expected int") as info:
        numbers.with_params({"n": "five"})
    assert info.value.field == "params.n"
    orders = registry.get("demo_orders")
    assert orders.with_params({"tables": ["orders"]}).source.tables == ["orders"]
    with pytest.raises(ParamsError) as info:
        orders.with_params({"tables": []})
    assert info.value.field == "params.tables"
    with pytest.raises(ParamsError, match="overridable: tables"):
        orders.with_params({"url": "sqlite:///other.db"})


def test_a_dataset_named_like_its_duckdb_file_is_refused_naming_the_field(tmp_path: Path):
    path = write(tmp_path, "connectors:\n  orders:\n    source: {kind: python, ref: 'connectors.demo:numbers'}\n"
                           "    destination: {kind: duckdb, path: warehouse/Orders.duckdb}\n    dataset: orders\n")
    with pytest.raises(RegistryError) as info:
        ConnectorRegistry.load(path)
    assert "connector 'orders'" in str(info.value) and "field 'dataset'" in str(info.value)


def test_a_schema_contract_is_a_mode_or_a_mode_per_entity_and_a_wrong_mode_is_named(tmp_path: Path):
    source = "source: {kind: python, ref: 'connectors.demo:numbers'}"
    path = write(tmp_path, f"connectors:\n  a:\n    {source}\n    schema_contract: freeze\n"
                           f"  b:\n    {source}\n    schema_contract: {{columns: discard_value}}\n")
    registry = ConnectorRegistry.load(path)
    assert registry.get("a").schema_contract.to_dlt() == {"tables": "freeze", "columns": "freeze",
                                                          "data_type": "freeze"}
    assert registry.get("b").schema_contract.to_dlt() == {"columns": "discard_value"}
    with pytest.raises(RegistryError, match="'frozen' is not a contract mode: give one of evolve, freeze"):
        ConnectorRegistry.load(write(tmp_path, f"connectors:\n  a:\n    {source}\n    schema_contract: frozen\n"))


def test_a_python_source_is_checked_from_its_source_without_importing_it(tmp_path: Path, monkeypatch):
    """Loading connectors.yaml in a gateway worker does not run a python source's module (a source imports dlt,
    which only a run's process needs): its source says the function is there. A module whose source cannot say
    (here: it binds names through globals()) is imported to check, as before."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "quiet_source.py").write_text("raise RuntimeError('imported')\n\n\ndef rows():\n    yield {'n': 1}\n")
    (modules / "dynamic_source.py").write_text("globals()['rows'] = lambda: iter([{'n': 1}])\n")
    monkeypatch.syspath_prepend(str(modules))
    path = write(tmp_path, "connectors:\n  quiet: {source: {kind: python, ref: 'quiet_source:rows'}}\n"
                           "  dynamic: {source: {kind: python, ref: 'dynamic_source:rows'}}\n")
    assert {spec.id for spec in ConnectorRegistry.load(path)} == {"quiet", "dynamic"}
    assert "quiet_source" not in sys.modules and "dynamic_source" in sys.modules
    monkeypatch.delitem(sys.modules, "dynamic_source")
    with pytest.raises(RegistryError, match=r"connector 'q': field 'source.ref': cannot import quiet_source:nothing: "
                                            r"module 'quiet_source' has no attribute 'nothing'"):
        ConnectorRegistry.load(write(tmp_path, "connectors:\n  q: {source: {kind: python, ref: 'quiet_source:nothing'}}\n"))
