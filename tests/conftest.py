"""Shared fixtures: each test gets its own var/ folder, demo data and connectors.yaml in a temp dir."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import create_app
from app.runs.store import RunStore
from connectors import secrets
from tests.support.postgres import postgres_schema
from tests.support.workdir import fill_workdir


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked `long(seconds=...)` first, longest first; the rest after, in pytest-randomly's order.

    `make test` hands whole files to its processes in collection order (xdist `--dist loadfile
    --no-loadscope-reorder`): a long file started last would run alone at the end. The sort is stable, so each
    file's tests keep their random order and one seed still gives one order."""
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return (mark.kwargs.get("seconds") or (mark.args or [0])[0]) if mark else 0

    items.sort(key=seconds, reverse=True)


def pytest_itemcollected(item: pytest.Item) -> None:
    """Each test's tier markers, as it is collected: before `-m` selects on them."""
    for tier in tiers(item):
        item.add_marker(tier)


# What a test uses that makes it a tier of its own (pytest.ini declares the markers): a real gunicorn, a Prefect
# server and worker, a PostgreSQL schema (a module's shared one too). Derived, not written on each test, so a new test cannot miss its tier.
_TIER_OF_HELPER = {"GunicornServer": "gunicorn", "PrefectStack": "prefect", "postgres_schema": "postgres"}


def tiers(item: pytest.Item) -> set[str]:
    """The tier markers a test gets from what it uses: the helpers it reaches (in its body, its fixtures, or the
    functions and classes of the tests' own modules these call, however deep), a PostgreSQL fixture. Per test, not
    per module: a file's Flask-client tests stay in `make test-fast` beside its one gunicorn test."""
    roots: list[object] = [getattr(item, "function", None)]
    for name in getattr(item, "fixturenames", ()):
        roots.extend(definition.func for definition in item._fixtureinfo.name2fixturedefs.get(name, ()))
    found = {tier for helper in _reached_helpers(roots) if (tier := _TIER_OF_HELPER.get(helper))}
    params = getattr(item, "callspec", None)
    if "postgres_url" in getattr(item, "fixturenames", ()) or (
            params is not None and "postgresql" in params.params.values()):
        found.add("postgres")
    return found


def _reached_helpers(roots: list[object]) -> set[str]:
    """The names of _TIER_OF_HELPER that the code of `roots` refers to, directly or through the functions and
    classes of tests/ it refers to (an over-approximation: a name is enough, called or not)."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        thing = todo.pop()
        if thing is None or id(thing) in seen:
            continue
        seen.add(id(thing))
        if isinstance(thing, type):
            todo.extend(vars(thing).values())
            continue
        function = getattr(thing, "__func__", thing)  # a bound method, a staticmethod or classmethod
        function = getattr(function, "__wrapped__", function)
        code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", None)
        if code is None or scope is None:
            continue
        codes = [code]
        while codes:
            current = codes.pop()
            codes.extend(const for const in current.co_consts if hasattr(const, "co_names"))
            for name in current.co_names:
                if name in _TIER_OF_HELPER and name in scope:
                    found.add(name)
                value = scope.get(name)
                if (callable(value) or isinstance(value, (staticmethod, classmethod))) and \
                        str(getattr(value, "__module__", "")).startswith("tests"):
                    todo.append(value)
    return found


@pytest.fixture(autouse=True)
def _secrets_remembered_by_the_test_are_forgotten_after_it(monkeypatch):
    """`${VAR}` values are remembered as secrets for the life of a process; a test's (e.g. `TABLE=orders`) must
    not blank the word out of every later test's results in the same process."""
    monkeypatch.setattr(secrets, "_values", secrets.known())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with a small shop database, CSV and JSONL files, and a connectors.yaml that uses them."""
    return fill_workdir(tmp_path)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite run store at the newest migration, made once per test process: a test's store starts as a copy of
    it (`copy_store`) instead of running every migration again."""
    path = tmp_path_factory.mktemp("migrated") / "flowgate.db"
    store = RunStore(f"sqlite:///{path}")
    store.create_schema()
    store.dispose()
    return path


def copy_store(template: Path, path: Path) -> Path:
    """`template`'s SQLite database (with its write-ahead log, if one is left) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        if Path(f"{template}{suffix}").exists():
            shutil.copyfile(f"{template}{suffix}", f"{path}{suffix}")
    return path


@pytest.fixture
def app_config(workdir: Path, migrated_sqlite: Path) -> dict:
    """Settings for a test app: everything under the test's folder, fast polling. Leases of 20 s: renewed every
    6.7 s and fenced when no renewal got through for 13.3 s, whatever the renewal is doing; a busy machine's stalls
    (a renewal waiting on SQLite's write lock behind other test processes) do not fence them (10 s leases did, once,
    at a load average of 11). The run store is a copy of a migrated one."""
    copy_store(migrated_sqlite, workdir / "var" / "flowgate.db")
    return {"var_dir": workdir / "var", "connectors_file": workdir / "connectors.yaml",
            "workflows_dir": workdir / "workflows",
            "lease_seconds": 20.0, "poll_seconds": 0.05, "executor_threads": 2}


@pytest.fixture
def app(app_config: dict):
    """The gateway without a running executor (runs stay queued): pytest-flask's `client` uses it."""
    app = create_app(app_config)
    app.config["TESTING"] = True
    yield app
    app.extensions["flowgate"].store.dispose()


@pytest.fixture
def running_app(app):
    """The gateway with its loops and executor running, as in a gunicorn worker."""
    services = app.extensions["flowgate"]
    services.start()
    yield app
    services.stop(timeout=10)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards; skips without a server."""
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path, migrated_sqlite: Path) -> Iterator[RunStore]:
    """A fresh run store on each database flowgate supports (on SQLite, a copy of a migrated one)."""
    url = (f"sqlite:///{copy_store(migrated_sqlite, tmp_path / 'runs.db')}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = RunStore(url)
    store.create_schema()
    yield store
    store.dispose()
