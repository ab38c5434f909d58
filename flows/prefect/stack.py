"""`make stack`: a Prefect server, the connector deployments, a process worker with its flow-run launcher
(flows/prefect/launcher.py) and the gateway, on one machine.

The gateway is the one component the stack cannot do without: when it exits, everything stops. When a Prefect
component (server, worker or launcher) exits, the stack says so, the gateway keeps serving (runs go local), and the
component is started again with backoff. Ctrl-C (or SIGTERM) stops all of them.

Prefect's server keeps its state in PostgreSQL when one answers at FLOWGATE_STACK_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/prefect; the database is created if missing; empty: never), or when
PREFECT_API_DATABASE_CONNECTION_URL says so; otherwise in SQLite under var/prefect (which logs "database is
locked" under load). The Prefect UI is at http://127.0.0.1:$PREFECT_PORT (4200 by default).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import Field, ValidationError

from flows.runtime import RuntimeSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/prefect"
WORKER_HEARTBEAT_SECONDS = 15  # the gateway counts a worker gone after two of these and a margin


def prefect_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings the stack gives Prefect's worker and the flow runs it starts (the tests' and benchmarks'
    Prefect stack takes the same): on-demand runs first."""
    return {
        # The worker asks for work every second (Prefect's default: 10 s), so a trigger waits half a second on
        # average for its flow run to be picked up; it says it is alive every 15 s, and the gateway counts it gone
        # after 35 s without a heartbeat (Prefect itself: ~90 s).
        "PREFECT_WORKER_QUERY_SECONDS": environ.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": str(WORKER_HEARTBEAT_SECONDS),
    }


class StackSettings(RuntimeSettings):
    """What `make stack` reads from the environment: where the gateway reads the same variable, under the gateway's
    name and rules (app.config.Settings, which flows/ cannot import; tests/test_config.py checks they agree)."""

    prefect_port: int = Field(4200, ge=1, le=65535, validation_alias="PREFECT_PORT",
                              description="Port of Prefect's server and UI.")
    port: int = Field(5000, ge=1, le=65535, validation_alias="FLOW_SERVER_PORT",
                      description="Port the gateway binds to (the stack prints it).")
    prefect_pool: str = Field("flowgate", min_length=1,
                              description="The process work pool the deployments are registered in and the worker "
                                          "polls.")
    prefect_worker_max_age_seconds: float = Field(
        2 * WORKER_HEARTBEAT_SECONDS + 5, gt=0, le=3600,
        description="Passed on to the gateway: a worker that heartbeats every 15 s counts as gone after 35 s.")
    stack_postgres_url: str = Field(DEFAULT_POSTGRES,
                                    description="PostgreSQL for Prefect's server (the database is created if "
                                                "missing); empty: SQLite under FLOWGATE_VAR_DIR/prefect.")


def say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(url: str, what: str, timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(url):
            return True
        time.sleep(0.5)
    say(f"{what} did not answer at {url} within {timeout:.0f} s")
    return False


def prefect_database(environ: Mapping[str, str], url: str) -> str | None:
    """The asyncpg URL of the PostgreSQL database for Prefect's server (PREFECT_API_DATABASE_CONNECTION_URL, else
    the database of `url`, FLOWGATE_STACK_POSTGRES_URL), or None for SQLite."""
    if environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return environ["PREFECT_API_DATABASE_CONNECTION_URL"]
    if not url:
        return None
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    target = conninfo_to_dict(url)
    name = target.get("dbname") or "prefect"
    try:
        with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True, connect_timeout=2) as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        say(f"no PostgreSQL for Prefect at {url} ({str(exc).splitlines()[0]}): using SQLite under var/prefect")
        return None
    user = target.get("user") or "postgres"
    password = f":{target['password']}" if target.get("password") else ""
    return (f"postgresql+asyncpg://{user}{password}@{target.get('host', '127.0.0.1')}:{target.get('port', '5432')}"
            f"/{name}")


@dataclass
class Component:
    """One process of the stack, started again with backoff when `restart` and it exits."""

    name: str
    args: list[str]
    restart: bool
    process: subprocess.Popen | None = None
    failures: int = 0
    started_at: float = 0.0
    next_start: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        # WEB_CONCURRENCY is gunicorn's (the gateway's workers); uvicorn in Prefect's server reads it too and stops.
        env = env if self.name == "gateway" else {k: v for k, v in env.items() if k != "WEB_CONCURRENCY"}
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=env, start_new_session=True)
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def wait(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def main() -> None:
    try:
        settings = StackSettings()
    except ValidationError as exc:
        raise SystemExit(f"flowgate stack: invalid settings: {StackSettings.problems(exc)}") from None
    port, pool = str(settings.prefect_port), settings.prefect_pool
    var = (ROOT / settings.var_dir).resolve()
    env = {**os.environ, "PREFECT_HOME": str(var / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", StackSettings.env_name("var_dir"): str(var),
           **prefect_environment(os.environ),
           StackSettings.env_name("prefect_worker_max_age_seconds"): f"{settings.prefect_worker_max_age_seconds:g}"}
    (var / "prefect").mkdir(parents=True, exist_ok=True)
    database = prefect_database(env, settings.stack_postgres_url)
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    say(f"Prefect's server stores its state in {'PostgreSQL' if database else 'SQLite under ' + str(var / 'prefect')}")
    health = f"http://127.0.0.1:{port}/api/health"
    server = Component("Prefect server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", port], restart=True)
    # Started before the worker, with its env (PREFECT_HOME names the socket): flow runs that come before its
    # imports are done, or while it is down, start as `python -m prefect.engine` (flows/prefect/launch.py).
    launcher = Component("flow-run launcher", [sys.executable, "-m", "flows.prefect.launcher"], restart=True)
    worker = Component("Prefect worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type",
                                          "process"], restart=True)
    gateway = Component("gateway", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], restart=False)
    components = [server, launcher, worker, gateway]

    def stop(*_: object) -> None:
        for component in reversed(components):
            component.stop()
        for component in reversed(components):
            component.wait()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.start(env)
        launcher.start(env)
        deployed = _wait_for(health, "the Prefect server") and deploy(pool, env)
        worker.start(env)
        gateway.start(env)
        print(f"\nflowgate: http://127.0.0.1:{settings.port}   "
              f"Prefect UI: http://127.0.0.1:{port}   Ctrl-C stops everything\n", flush=True)
        supervise(components, gateway, env, lambda: deployed or (_answers(health) and deploy(pool, env)))
    except KeyboardInterrupt:
        pass
    stop()


def deploy(pool: str, env: dict[str, str]) -> bool:
    """Register the deployments (idempotent); True when it worked."""
    done = subprocess.run([sys.executable, "-m", "flows.prefect.deploy", "--pool", pool], cwd=ROOT, env=env)
    if done.returncode:
        say("registering the deployments failed; trying again once Prefect answers")
    return done.returncode == 0


def supervise(components: list[Component], gateway: Component, env: dict[str, str],
              deployed: Callable[[], bool]) -> None:
    """Until the gateway exits: restart a Prefect component that exited, waiting longer after each failure, and
    register the deployments once Prefect first answers if it did not at the start."""
    registered = False
    while gateway.running:
        time.sleep(0.5)
        if not registered:
            registered = deployed()
        now = time.monotonic()
        for component in components:
            if component.running or not component.restart:
                continue
            if component.next_start == 0.0:
                code = component.process.returncode if component.process else None
                if now - component.started_at > 60:
                    component.failures = 0  # it had been running fine: start over with a short wait
                delay = min(2 ** component.failures, 30)
                component.failures += 1
                component.next_start = now + delay
                say(f"{component.name} exited (code {code}): the gateway keeps serving and runs go local; "
                    f"starting it again in {delay:g} s (Ctrl-C stops everything)")
            elif now >= component.next_start:
                component.next_start = 0.0
                component.start(env)
                say(f"{component.name} started again")
    say(f"the gateway exited (code {gateway.process.returncode if gateway.process else None}); stopping the stack")


if __name__ == "__main__":
    main()
