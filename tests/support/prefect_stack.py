"""A real Prefect server, process worker and flow-run launcher for the integration tests, on a free port and a temp
PREFECT_HOME."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from flows.prefect.launch import socket_path
from flows.prefect.stack import prefect_environment
from flows.runtime import RuntimeSettings
from tests.support.gunicorn_server import ROOT, free_port

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(process: subprocess.Popen | None) -> None:
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


POSTGRES_ADMIN_URL = os.environ.get("FLOWGATE_TEST_POSTGRES_ADMIN_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def fresh_postgres_database(name: str) -> str | None:
    """Create database `name`_<pid> for a Prefect server (dropped when this process exits); its asyncpg URL, or
    None without PostgreSQL.

    The process id in the name keeps two test runs on one machine (two clones, a stress run) out of each
    other's database. Prefect 3.8.8's server on SQLite stalls under concurrent writes (seen here: 503s and
    reads that time out), so the tests and benchmarks use PostgreSQL where the machine has it, as production
    should.
    """
    import sqlalchemy as sa

    name = f"{name}_{os.getpid()}"
    try:
        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2})
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception:  # no reachable server: the caller falls back to SQLite
        return None
    atexit.register(_drop_database, admin, name)
    url = sa.engine.make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


def _drop_database(admin, name: str) -> None:
    import sqlalchemy as sa

    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception:  # best effort at exit: a server gone by then keeps the database, which the next run replaces
        pass
    admin.dispose()


class PrefectStack:
    """`prefect server start` + `python -m flows.prefect.deploy` + `python -m flows.prefect.launcher` +
    `prefect worker start --type process`, as `make stack` runs them."""

    def __init__(self, workdir: Path, pool: str = "flowgate", database_url: str | None = None):
        self.workdir = workdir
        self.pool = pool
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(prefect_environment(self.env))  # as `make stack` runs them
        # Started as an operator would, `.venv/bin/prefect worker start` without activating the venv: its PATH
        # holds no interpreter with flowgate's requirements (the deployments' command must not need one there).
        venv_bin = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join(p for p in self.env.get("PATH", os.defpath).split(os.pathsep)
                                           if p != venv_bin)
        self.env.update({
            "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO",  # flow runs' INFO lines reach Prefect's logs API (runs/<id>/logs reads them)
            # Test-speed server loops: schedule runs and retry concurrency slots within seconds, not a minute.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "FLOWGATE_CONNECTORS": str(workdir / "connectors.yaml"),
            "FLOWGATE_WORKFLOWS": str(workdir / "workflows"), "FLOWGATE_VAR_DIR": str(workdir / "worker-var"),
        })
        if database_url:  # e.g. postgresql+asyncpg://...; SQLite under PREFECT_HOME otherwise
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.launcher: subprocess.Popen | None = None

    @property
    def run_store_url(self) -> str:
        """The run store the worker's flow runs use: a gateway of this stack must use it too (as in production),
        or every flow run of its runs finds no run there and ends Cancelled without executing."""
        return RuntimeSettings.of(var_dir=self.env["FLOWGATE_VAR_DIR"], database_url=self.env.get("DATABASE_URL")
                                  ).run_store_url

    def start_server(self, timeout: float = 90) -> None:
        self.server = _spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                             self.env, self.workdir / "prefect-server.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("Prefect server did not start:\n" + (self.workdir / "prefect-server.log").read_text())

    def stop_server(self) -> None:
        _stop(self.server)
        self.server = None

    def restart_server(self) -> None:
        """The server back after stop_server, and a worker polling it: the worker gives up after about 45 s of
        refused polls (Prefect's service loop), and the next tests on this stack need one."""
        self.start_server()
        if self.worker is not None and self.worker.poll() is not None:
            self.start_worker()

    def deploy(self, connectors_file: Path | None = None) -> str:
        env = dict(self.env, FLOWGATE_CONNECTORS=str(connectors_file or self.workdir / "connectors.yaml"))
        done = subprocess.run([sys.executable, "-m", "flows.prefect.deploy", "--pool", self.pool], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"deploy failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start_worker(self, timeout: float = 60) -> None:
        self.worker = _spawn([PREFECT, "worker", "start", "--pool", self.pool, "--type", "process"],
                             self.env, self.workdir / "prefect-worker.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = httpx.post(f"{self.api_url}/work_pools/{self.pool}/workers/filter", json={}, timeout=5).json()
            if any(w["status"] == "ONLINE" for w in workers):
                return
            time.sleep(0.5)
        raise RuntimeError("Prefect worker did not come online:\n" + (self.workdir / "prefect-worker.log").read_text())

    @property
    def launcher_socket(self) -> str:
        path = socket_path(self.env)
        assert path, "FLOWGATE_LAUNCHER_SOCKET is empty"
        return path

    def start_launcher(self, timeout: float = 90, **env: str) -> None:
        """The flow-run launcher (flows/prefect/launcher.py), with the worker's env (and `env`), listening when this
        returns."""
        self.launcher = _spawn([sys.executable, "-m", "flows.prefect.launcher"], {**self.env, **env},
                               self.workdir / "launcher.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.launcher.poll() is None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.launcher_socket)
                return  # a connection that sends nothing is a probe: the launcher closes it
            except OSError:
                time.sleep(0.2)
            finally:
                probe.close()
        raise RuntimeError("the flow-run launcher did not listen:\n" + (self.workdir / "launcher.log").read_text())

    def stop_launcher(self) -> None:
        _stop(self.launcher)
        self.launcher = None

    def api(self, method: str, path: str, **kwargs) -> object:
        for attempt in range(5):  # a Prefect server on SQLite answers 503 while its database is busy
            response = httpx.request(method, f"{self.api_url}/{path.lstrip('/')}", timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return response.json() if response.content else None

    def stop(self) -> None:
        _stop(self.worker)
        self.stop_launcher()
        self.stop_server()


# What the Prefect tier deploys: `numbers` and `inc` (and the workflow flow); `ticker` (a 5 s schedule) is in
# with-ticker.yaml for a test to deploy, `undeployed` only in the gateway's connectors.yaml.
DEPLOYED = """
connectors:
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 10, delay_seconds: 0}}
    dataset: raw
  inc:
    source: {kind: sql_database, url: "sqlite:///events.db", tables: [events], incremental: {cursor: updated_at}}
    destination: {path: shared/inc.duckdb}  # one file both paths write (never at once: one run at a time)
  flaky:  # refuses its first connection (transient); a trigger gives `counter`, the file that counts its runs
    source: {kind: python, ref: "tests.support.flaky_source:flaky", args: {counter: "", fail_times: 1}}
    dataset: raw
    retry: {max_attempts: 3, backoff_seconds: 0, on: [transient]}  # YAML reads a bare on as true
"""
TICKER = """
  ticker:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    dataset: raw
    schedule: {interval: 5}
"""
UNDEPLOYED = """
  undeployed:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 2}}
"""


@contextmanager
def served_stack(workdir: Path, database: str) -> Iterator[PrefectStack]:
    """A server with DEPLOYED deployed and no worker: a test proposes a worker's states itself, in the order it
    chooses (tests/test_prefect_states.py)."""
    (workdir / "deployed.yaml").write_text(DEPLOYED)
    stack = PrefectStack(workdir, database_url=fresh_postgres_database(database))
    try:
        stack.start_server()
        stack.deploy(workdir / "deployed.yaml")
        yield stack
    finally:
        stack.stop()


@contextmanager
def deployed_stack(workdir: Path, database: str, env: dict[str, str] | None = None) -> Iterator[PrefectStack]:
    """A server (on PostgreSQL database `database`_<pid> where one answers), DEPLOYED deployed, a launcher and a
    worker (with `env` on top of the stack's environment)."""
    (workdir / "deployed.yaml").write_text(DEPLOYED)  # no ticker: only a test that fires its slots needs it
    (workdir / "with-ticker.yaml").write_text(DEPLOYED + TICKER)
    (workdir / "connectors.yaml").write_text(DEPLOYED + TICKER + UNDEPLOYED)
    stack = PrefectStack(workdir, database_url=fresh_postgres_database(database))
    stack.env.update(env or {})
    try:
        stack.start_server()
        stack.deploy(workdir / "deployed.yaml")
        stack.start_launcher()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@contextmanager
def frozen_worker(stack: PrefectStack):
    """The process worker hung (SIGSTOP): Prefect still counts it online until its heartbeat ages out.

    Frozen only once no earlier test's flow run is still to run or running: one it had just picked up would hold
    the deployment's concurrency slot while frozen, and Prefect refuses every claim of the deployment's runs
    (PENDING) until the slot frees, so no run could be taken back. A scheduled one counts too: a worker frozen in
    the middle of picking it up holds the slot as well (the likely cause of a red run, where every claim of both
    stranded runs was refused for 90 s). Those that do not end within a minute are cancelled."""
    def active() -> list[dict]:
        return stack.api("POST", "flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": [
            "SCHEDULED", "PENDING", "RUNNING", "CANCELLING"]}}}})

    deadline = time.monotonic() + 60
    while active() and time.monotonic() < deadline:
        time.sleep(0.5)
    for flow_run in active():
        try:
            stack.api("POST", f"flow_runs/{flow_run['id']}/set_state", json={"state": {
                "type": "CANCELLED", "name": "Cancelled", "message": "left active by an earlier test"}, "force": True})
        except httpx.HTTPStatusError:  # Prefect refused (500 seen): the test goes on, as it did before this cleanup
            pass
    os.killpg(stack.worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(stack.worker.pid, signal.SIGCONT)


def ran_on_prefect(stack: PrefectStack, flow_run_id: str) -> bool:
    """The flow run executed its connector, all or part: it completed, or started a step (a task run). One a
    worker started after its run went local is RUNNING for a moment, finds that in the run store and ends
    Cancelled before its first step."""
    states = stack.api("GET", f"flow_run_states/?flow_run_id={flow_run_id}")
    return any(state["type"] == "COMPLETED" for state in states) or bool(
        stack.api("POST", "task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}))


def sync_gateway(stack: PrefectStack, tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """A gateway (its app and services) on the worker's run store, as in production, with its executor and its
    Prefect sync running every half second: a flow run the worker starts after its run went local finds that there
    and does not execute (without it, one did: red in a stress round). `settings` on top."""
    from app import create_app

    app = create_app({"var_dir": tmp_path / "var", "database_url": stack.run_store_url,
                      "connectors_file": stack.workdir / "connectors.yaml",
                      "workflows_dir": stack.workdir / "workflows", "prefect_api_url": stack.api_url,
                      # a lease long enough for a machine this busy: a stalled heartbeat must not free the key
                      "lease_seconds": 15.0, "poll_seconds": 0.05, **settings})
    services = app.extensions["flowgate"]
    services.executor.start()
    if services.dispatcher.prefect.route is not None:
        services.dispatcher.prefect.route.reprobe_seconds = 0.5
    services.prefect_sync.every = 0.5
    services.prefect_sync.start()
    return app, services
