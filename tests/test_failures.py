"""Failure classes on real failures: each connector below really fails (a real SQLite file, PostgreSQL, a local HTTP
API, a DuckDB file locked by another process, a python source), and its class decides whether a retry may follow."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from connectors.demo import build_shop_db
from connectors.failures import CRASHED, TERMINAL, TRANSIENT, RetryPolicy, classify
from connectors.outbound import OutboundPolicy
from connectors.pipeline import ConnectorRunError, Workspace, duckdb_path, run_connector
from connectors.spec import ConnectorSpec
from flows.outcome import RunError


class StatusServer:
    """Answers GET /<status> with that status (GET /slow answers after 3 s)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.strip("/").split("?")[0]
                if name == "slow":
                    time.sleep(3)
                status = int(name) if name.isdigit() else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def http() -> StatusServer:
    server = StatusServer()
    yield server
    server.httpd.shutdown()


def rest(url: str, path: str) -> dict:
    return {"kind": "rest_api", "config": {"client": {"base_url": f"{url}/"}, "resources": [
        {"name": "items", "endpoint": {"path": path, "paginator": "single_page"}}]}}


PG = "postgresql+psycopg2://{who}@{where}/test"
# (case, source, expected class, words the error must contain)
CASES = [
    ("a missing table in a sql_database source", lambda d, u: {
        "kind": "sql_database", "url": f"sqlite:///{d / 'shop.db'}", "tables": ["nothing_here"]}, TERMINAL,
     "table not found"),
    ("a missing SQLite file", lambda d, u: {
        "kind": "sql_database", "url": f"sqlite:///{d / 'nope.db'}", "tables": ["orders"]}, TERMINAL,
     "nope.db does not exist"),
    ("a missing folder", lambda d, u: {"kind": "filesystem", "bucket_url": str(d / "no-folder")}, TERMINAL,
     "no-folder does not exist"),
    ("a missing file", lambda d, u: {"kind": "filesystem", "bucket_url": str(d), "file_glob": "gone.csv"}, TERMINAL,
     "gone.csv does not exist"),
    ("a file a python source cannot find", lambda d, u: {
        "kind": "python", "ref": "tests.test_failures:reads_a_missing_file"}, TERMINAL, "file not found"),
    ("bad credentials", lambda d, u: {
        "kind": "sql_database", "url": PG.format(who="nobody_here:pw", where="127.0.0.1:5432"), "tables": ["x"]},
     TERMINAL, "credentials refused"),
    ("an unknown host", lambda d, u: {
        "kind": "sql_database", "url": PG.format(who="postgres", where="no-such-host.invalid:5432"), "tables": ["x"]},
     TERMINAL, "unknown host"),
    ("connection refused", lambda d, u: {
        "kind": "sql_database", "url": PG.format(who="postgres", where="127.0.0.1:1"), "tables": ["x"]},
     TRANSIENT, "connection refused"),
    ("a timeout", lambda d, u: rest(u, "slow"), TRANSIENT, "timeout"),
    ("HTTP 401 from a rest_api source", lambda d, u: rest(u, "401"), TERMINAL, "HTTP 401"),
    ("HTTP 404 from a rest_api source", lambda d, u: rest(u, "404"), TERMINAL, "HTTP 404"),
    ("HTTP 429 from a rest_api source", lambda d, u: rest(u, "429"), TRANSIENT, "HTTP 429"),
    ("HTTP 503 from a rest_api source", lambda d, u: rest(u, "503"), TRANSIENT, "HTTP 503"),
    ("a Python error in a source", lambda d, u: {"kind": "python", "ref": "tests.test_failures:divides_by_zero"},
     TERMINAL, "ZeroDivisionError"),
]


def divides_by_zero():
    import dlt

    @dlt.resource(name="broken")
    def rows():
        yield {"ratio": 1 / 0}

    return rows


def reads_a_missing_file():
    import dlt

    @dlt.resource(name="broken")
    def rows():
        yield {"text": Path("/no/such/file.csv").read_text()}

    return rows


@pytest.fixture
def folder(tmp_path: Path, monkeypatch) -> Path:
    build_shop_db(tmp_path / "shop.db", customers=2, orders=2)
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_ATTEMPTS", "1")  # dlt's own retries would only slow the 429 and 503
    monkeypatch.setenv("RUNTIME__REQUEST_TIMEOUT", "1")
    return tmp_path


@pytest.mark.parametrize("case, source, expected, words", CASES, ids=[case[0] for case in CASES])
def test_each_real_failure_has_the_right_class(folder, http, case, source, expected, words):
    spec = ConnectorSpec.model_validate({"id": "failing", "source": source(folder, http.url)})
    allowed = OutboundPolicy.parse(http.url.removeprefix("http://"))  # the rest_api cases call it
    with pytest.raises(ConnectorRunError) as caught:
        run_connector(spec, Workspace(folder / "dlt", folder / "duckdb", allowed))
    error = RunError.of(caught.value)
    assert (error.failure_class, error.terminal) == (expected, expected == TERMINAL), error.message
    assert words in error.message and error.step == "extract", error.message


def test_a_missing_sqlite_file_fails_terminal_and_is_not_created(folder):
    spec = ConnectorSpec.model_validate({"id": "failing", "source": {
        "kind": "sql_database", "url": f"sqlite:///{folder / 'nope.db'}"}})
    with pytest.raises(ConnectorRunError) as caught:
        run_connector(spec, Workspace(folder / "dlt", folder / "duckdb"))
    assert caught.value.terminal and "nope.db" in caught.value.message
    assert not (folder / "nope.db").exists()


def test_a_destination_locked_by_another_process_is_transient(folder):
    spec = ConnectorSpec.model_validate({"id": "locked", "source": {
        "kind": "sql_database", "url": f"sqlite:///{folder / 'shop.db'}", "tables": ["orders"]}})
    workspace = Workspace(folder / "dlt", folder / "duckdb")
    path = duckdb_path(spec, workspace)
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); "
                                                     "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConnectorRunError) as caught:
            run_connector(spec, workspace)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert caught.value.failure_class == TRANSIENT and "database locked" in caught.value.message


def test_cut_off_runs_are_crashed_and_a_lost_lease_is_transient():
    assert RunError.process_died(123).failure_class == CRASHED
    assert RunError.interrupted().failure_class == CRASHED
    assert RunError.lease_expired("x").failure_class == CRASHED
    assert RunError("lock_lost", "the lease on the key lapsed").failure_class == TRANSIENT
    assert RunError("cancelled", "cancelled").failure_class is None
    from flows.connector_lock import LockLost

    assert classify(LockLost("lapsed")).failure_class == TRANSIENT


def test_a_policy_retries_only_its_classes_and_backs_off_to_its_cap():
    policy = RetryPolicy.model_validate({"max_attempts": 4, "backoff_seconds": 30, "max_backoff_seconds": 100,
                                         "on": ["crashed"]})
    assert [policy.delay_after(n) for n in (1, 2, 3)] == [30, 60, 100]
    assert policy.retries(CRASHED, 1) and policy.retries(CRASHED, 3) and not policy.retries(CRASHED, 4)
    assert not policy.retries(TRANSIENT, 1) and not policy.retries(TERMINAL, 1) and not policy.retries(None, 1)
    with pytest.raises(ValueError):
        RetryPolicy.model_validate({"on": ["terminal"]})


def test_a_policy_written_in_yaml_with_a_bare_on_key_reads_as_written(tmp_path: Path):
    """PyYAML (YAML 1.1) reads `on:` as the boolean true: the policy a user writes in a connector file still means
    what it says (it was refused as "field 'retry.1': Keys should be strings")."""
    from connectors.registry import ConnectorRegistry

    (tmp_path / "connectors.yaml").write_text("""
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    retry: {max_attempts: 2, on: [transient]}
""")
    assert ConnectorRegistry.load(tmp_path / "connectors.yaml").get("numbers").retry.on == ["transient"]
