"""A database that stops answering without closing the connection (a partition, a managed failover): the run whose
lease can no longer be renewed stops within its lease, while another gateway that still reaches the database
recovers it. Real PostgreSQL behind a proxy that holds every byte once told to."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from app.backends.executor import LocalExecutor
from app.runs.store import NewRun, RunStore
from connectors.pipeline import Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from flows.database import PG_CONNECT_TIMEOUT_SECONDS
from flows.outcome import CRASHED
from tests.support.fake_services import Blackhole
from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=60)


def test_a_run_whose_database_stops_answering_is_stopped_within_its_lease(postgres_url, workdir: Path):
    """Before the lease keeper, the renewal hung and nothing fenced: the run went on past 25 s of a 3 s lease while
    the other gateway recovered it and could start the connector's next run."""
    registry = ConnectorRegistry.load(workdir / "connectors.yaml")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    direct = RunStore(postgres_url)  # another gateway, which still reaches the database
    direct.create_schema()
    proxy = Blackhole(("127.0.0.1", 5432))
    behind = RunStore(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    spec = registry.get("slow")
    run, _ = direct.create_run(NewRun(kind="connector", target="slow", params={"delay_seconds": 3600.0},
                                      backend="local", concurrency_key=concurrency_key(spec, workspace)))
    executor = LocalExecutor(behind, registry, workspace, slots=1, lease_seconds=3.0, poll_seconds=0.05)
    executor.start()
    try:
        wait_until(lambda: direct.get(run.id).status == "running" and executor.active == 1, what="the run started")
        proxy.hold.set()
        wait_until(lambda: executor.active == 0, timeout=60, what="the run stopped, its process killed")
        wait_until(lambda: direct.recover_expired() or direct.get(run.id).status == CRASHED,
                   what="the other gateway recovered the run once its lease lapsed")
        assert direct.get(run.id).status == CRASHED and direct.get(run.id).error["code"] == "lease_expired"
    finally:
        proxy.hold.clear()  # the hung calls complete, so shutdown can write what it writes
        executor.shutdown(timeout=10)
        proxy.close()
        behind.dispose()
        direct.dispose()



def test_a_worker_that_restarts_while_the_database_hangs_does_not_take_the_gateway_down(postgres_url, workdir: Path):
    """A worker killed while the run store stopped answering boots again; before, its boot ran the migrations, timed
    out connecting, and gunicorn's master, seeing a worker fail to boot, stopped the whole gateway."""
    proxy = Blackhole(("127.0.0.1", 5432))
    gateway = GunicornServer(workdir, workers=1,
                             DATABASE_URL=postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    gateway.start()
    try:
        worker = gateway.worker_pids()[0]
        proxy.hold.set()
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: gateway.log().count("Booting worker with pid") >= 2, what="the master booted a new worker")
        time.sleep(PG_CONNECT_TIMEOUT_SECONDS * 4)  # longer than a boot waits on the database: the boot met the hang
        assert gateway.process.poll() is None, gateway.log()[-3000:]
        proxy.hold.clear()
        wait_until(lambda: httpx.get(f"{gateway.url}/api/v1/health/ready", timeout=5).status_code == 200,
                   timeout=60, what="the gateway ready again once the database answers")
        done = httpx.post(f"{gateway.url}/api/v1/connectors/numbers/runs", json={"wait": 60}, timeout=70).json()
        assert done["status"] == "completed"
    finally:
        proxy.hold.clear()
        gateway.kill()
        proxy.close()
