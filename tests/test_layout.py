"""The import contract: each floor imports only the floors below it, and Prefect stays on its side.

connectors/ (floor 1) imports neither flows/ nor app/; flows/ (floor 2) does not import app/; only flows/prefect/
and the gateway's Prefect backend may import `prefect`; views (app/api/) import no dlt. No two product modules
import each other, however indirectly (imports inside functions aside: Flask's factory imports its blueprints).
No test file imports another or conftest.py: what tests share is in tests/support/ (fixtures: conftest.py).
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("connectors", "flows", "app")
# (where, the top-level modules it must not import, except in these paths)
RULES = [
    ("connectors/", {"flows", "app"}, ()),
    ("flows/", {"app", "flask"}, ()),
    ("", {"prefect"}, ("flows/prefect/", "app/backends/prefect")),
    ("flows/prefect/contract.py", {"prefect"}, ()),
    ("app/api/", {"dlt", "duckdb"}, ()),
]
MAX_LINES = 300


def imported_modules(path: Path) -> set[str]:
    """The absolute modules a file imports, anywhere in it (functions included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as "<file>: imports <module>"."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            for module in sorted(imported_modules(path)):
                top = module.split(".")[0]
                for where, forbidden, allowed in RULES:
                    if relative.startswith(where) and top in forbidden and not relative.startswith(allowed or ("\0",)):
                        found.append(f"{relative}: imports {module}")
    return found


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each product module's imports of other product modules at module level (`if TYPE_CHECKING:` included)."""
    paths = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for package in PACKAGES for path in (root / package).rglob("*.py")}

    def at_module_level(body: list[ast.stmt]) -> set[str]:
        found = set()
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update({node.module, *(f"{node.module}.{alias.name}" for alias in node.names)})
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for field in ("body", "orelse", "finalbody"):
                    found |= at_module_level([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])
                found |= at_module_level([n for h in getattr(node, "handlers", []) for n in h.body])
        return found

    return {name: {module for module in at_module_level(ast.parse(path.read_text()).body)
                   if module in paths and module != name} for name, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected components of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_product_modules_import_each_other():
    assert import_cycles(module_imports(ROOT)) == []


def test_the_cycle_check_catches_a_circle_behind_type_checking(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    sync = tmp_path / "app" / "backends" / "prefect_sync.py"
    sync.write_text(sync.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import app.backends.executor\n")
    executor = tmp_path / "app" / "backends" / "executor.py"
    executor.write_text(executor.read_text() + "\nfrom app.backends.prefect_sync import PrefectSync\n")
    assert import_cycles(module_imports(tmp_path)) == [["app.backends.executor", "app.backends.prefect_sync"]]


def test_every_floor_imports_only_the_floors_below_it():
    assert violations(ROOT) == []


def test_the_contract_catches_a_flow_that_imports_the_gateway(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    engine = tmp_path / "flows" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom app.config import Settings\n")
    views = tmp_path / "app" / "api" / "runs.py"
    views.write_text(views.read_text() + "\nimport dlt\n")
    assert sorted(violations(tmp_path)) == ["app/api/runs.py: imports dlt", "flows/engine.py: imports app.config"]


def test_a_prefect_flow_run_loads_nothing_of_the_gateway():
    """What a Prefect worker imports to run a flow: nothing of app/, no Flask."""
    code = ("import sys, json, flows.prefect.connector_flow, flows.prefect.workflow_flow, flows.prefect.deploy; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'flask'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# A gateway process: the app created, a request of each kind served (a trigger queued, no executor started)
GATEWAY_PROCESS = """
import json, sys
from app import create_app
app = create_app({"var_dir": sys.argv[1], "connectors_file": sys.argv[2], "workflows_dir": sys.argv[3]})
client = app.test_client()
run = client.post("/trigger", json={"connector_id": "numbers"})
answers = [run.status_code] + [client.get(path).status_code for path in (
    "/health", "/api/v1/health/ready", "/api/v1/connectors", "/api/v1/runs/" + run.json["run_id"], "/metrics")]
exec(sys.argv[4])
print(json.dumps([answers, sorted(m for m in sys.modules if m.split(".")[0] in ("dlt", "duckdb", "pyarrow"))]))
"""


def gateway_imports(workdir: Path, extra: str = "") -> tuple[list[int], list[str]]:
    done = subprocess.run([sys.executable, "-c", GATEWAY_PROCESS, str(workdir / "var"),
                           str(workdir / "connectors.yaml"), str(workdir / "workflows"), extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answers, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return answers, modules


def test_a_gateway_process_imports_no_dlt_until_a_run_needs_it(workdir):
    """A gunicorn worker holds no dlt, DuckDB or pyarrow (issue 31: tens of MB per worker): only a run's process
    needs them, and it forks from a forkserver that imported them once (connectors/isolated.py)."""
    answers, modules = gateway_imports(workdir)
    assert answers[0] == 202 and answers[1] == 200 and answers[3:] == [200, 200, 200]
    assert modules == []


def test_the_gateway_import_check_sees_dlt(workdir):
    _, modules = gateway_imports(workdir, extra="import connectors.preload")
    assert "dlt" in modules and "duckdb" in modules


def test_a_module_over_300_lines_says_why_in_its_docstring():
    long = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            lines = path.read_text().count("\n")
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            if lines > MAX_LINES and "300 lines" not in docstring:
                long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert long == []


def test_the_runtime_settings_are_enough_for_what_a_prefect_flow_builds():
    """A Prefect flow reads RuntimeSettings only: everything the toolbox and pipelines read must be there."""
    from flows.nodes import make_toolbox
    from flows.runtime import RuntimeSettings

    settings = RuntimeSettings.of(max_output_bytes=4096, max_delay_seconds=5)
    toolbox = make_toolbox(settings)
    assert toolbox is not None and settings.run_store_url and settings.pipelines_dir and settings.duckdb_dir


def environment_reads(path: Path) -> list[str]:
    """The flowgate variables a file reads from the environment itself (os.environ[...], .get(...), getenv)."""
    def ours(node: ast.AST) -> str | None:
        value = node.value if isinstance(node, ast.Constant) else None
        return value if isinstance(value, str) and (value.startswith("FLOWGATE_") or value == "FLOW_SERVER_PORT") \
            else None

    def environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
            (isinstance(node, ast.Name) and node.id == "environ")

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and environ(node.value) and ours(node.slice):
            found.append(ours(node.slice))
        elif isinstance(node, ast.Call) and node.args and ours(node.args[0]) and (
                (isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault", "pop")
                 and environ(node.func.value))
                or (isinstance(node.func, (ast.Attribute, ast.Name))
                    and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getenv")):
            found.append(ours(node.args[0]))
    return found


def test_settings_are_the_only_reader_of_flowgate_variables():
    """gunicorn.conf.py, app/, flows/ (make stack included) and connectors/ (its command line included) read
    FLOWGATE_* through a settings model only (validated, named in errors): a second reader drifts (gunicorn's
    loopback guard once missed keys the app saw)."""
    readers = {str(path.relative_to(ROOT)): names
               for path in [ROOT / "gunicorn.conf.py", *(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))]
               if (names := environment_reads(path))}
    # The one exception: each Prefect flow run starts the launch script, which imports the standard library only
    # (no pydantic: it must start in milliseconds), and the launcher takes its socket's path from it.
    assert readers == {"flows/prefect/launch.py": ["FLOWGATE_LAUNCHER_SOCKET"]}


def test_the_reader_guard_sees_each_way_of_reading_a_variable(tmp_path: Path):
    reader = tmp_path / "reader.py"
    reader.write_text("import os\nfrom os import environ, getenv\n"
                      "a = os.environ.get('FLOWGATE_A', '')\nb = environ['FLOWGATE_B']\nc = getenv('FLOW_SERVER_PORT')\n"
                      "def f(environ):\n    return environ.get('FLOWGATE_D')\nok = os.environ.get('PATH')\n")
    assert sorted(environment_reads(reader)) == ["FLOWGATE_A", "FLOWGATE_B", "FLOWGATE_D", "FLOW_SERVER_PORT"]


def test_no_two_product_modules_share_a_name():
    """A name says what a module holds: two `logs` (or `schema`, `store`...) modules make a reader guess which."""
    stems: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py") and "migrations" not in path.parts:
                stems.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert {stem: paths for stem, paths in stems.items() if len(paths) > 1} == {}


def imports_of_test_modules(root: Path) -> list[str]:
    """Every import of a test module or of conftest.py by a file under tests/ or bench/, as "<file>: imports
    tests.<module>" (a test file's own module aside: a connector's `ref` may name it)."""
    found = set()
    for path in [*(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        relative = path.relative_to(root)
        itself = ".".join(relative.with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = relative.parent.parts[:len(relative.parent.parts) + 1 - node.level] if node.level else ()
                base = ".".join([*package, *([node.module] if node.module else [])])
                modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for parts in (module.split(".") for module in modules):
                named = ".".join(parts[:2])
                if parts[0] == "tests" and len(parts) > 1 and named != itself \
                        and (parts[1].startswith("test_") or parts[1] == "conftest"):
                    found.add(f"{relative.as_posix()}: imports {named}")
    return sorted(found)


def test_no_test_file_imports_another_or_conftest():
    """A test file reads alone: what it needs from elsewhere is in tests/support/, and fixtures come from
    conftest.py by name, not by import."""
    assert imports_of_test_modules(ROOT) == []


def test_the_test_import_rule_catches_a_test_that_imports_another(tmp_path):
    (tmp_path / "tests" / "support").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests" / "test_one.py").write_text("from tests.support.waiting import wait_until\n"
                                                   "REF = 'tests.test_one:source'\n")
    (tmp_path / "tests" / "test_two.py").write_text("import tests.test_one\nfrom tests.conftest import X\n"
                                                   "from . import test_one\nfrom .test_one import source\n")
    (tmp_path / "tests" / "support" / "helper.py").write_text("from tests.test_one import source\n")
    (tmp_path / "bench" / "run.py").write_text("from tests import conftest\n")
    assert imports_of_test_modules(tmp_path) == [
        "bench/run.py: imports tests.conftest",
        "tests/support/helper.py: imports tests.test_one",
        "tests/test_two.py: imports tests.conftest",
        "tests/test_two.py: imports tests.test_one"]
