"""Lifecycle under faults on a real gunicorn (loopback only): nothing lost, every accepted trigger answered and
every run ending in a recorded state, whatever happens to the processes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import httpx
import pytest

from tests.support.gunicorn_server import ROOT, GunicornServer, run_store
from tests.support.incremental import events_db, incremental_registry
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=110)  # started first in the parallel run (conftest.py)


class Load:
    """Clients sending triggers in a loop until stopped, as a careful backend does: each trigger carries its
    own Idempotency-Key and is retried (up to 3 times) when the connection fails, so a retry can never start a
    second run. Every final answer or error is kept, and how many retries it took."""

    def __init__(self, url: str, clients: int = 3, interval: float = 0.2, connectors: tuple[str, ...] = (
            "numbers", "events", "products")):
        self.url = url
        self.interval = interval
        self.connectors = connectors
        self.statuses: Counter[int | str] = Counter()
        self.retries = 0
        self.run_ids: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def accepted(self) -> int:
        with self._lock:
            return len(self.run_ids)

    def _client(self) -> None:
        deadline = time.monotonic() + 300  # bounded whatever happens
        with httpx.Client(base_url=self.url, timeout=30) as client:
            sent = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                key = uuid.uuid4().hex
                body = {"connector_id": self.connectors[sent % len(self.connectors)]}
                sent += 1
                for attempt in range(3):
                    try:
                        response = client.post("/trigger", json=body, headers={"Idempotency-Key": key})
                        outcome: int | str = response.status_code
                        if response.status_code == 202:
                            with self._lock:
                                self.run_ids.append(response.json()["run_id"])
                        break
                    except httpx.TransportError as exc:  # a closed keep-alive connection, a worker going away
                        outcome = type(exc).__name__
                        with self._lock:
                            self.retries += attempt < 2
                        time.sleep(0.1)
                with self._lock:
                    self.statuses[outcome] += 1
                time.sleep(self.interval)


NO_QUEUE_LIMIT = {"FLOWGATE_MAX_QUEUED_PER_TARGET": "100000"}  # the load queues faster than one DuckDB file loads


def worker_pids(server: GunicornServer) -> list[int]:
    """Every worker the master has booted so far, oldest first."""
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.log())]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sighup_reloads_under_load_without_a_single_failed_request(workdir):
    server = GunicornServer(workdir, workers=2, **NO_QUEUE_LIMIT).start()
    try:
        # Three callers trigger a run every 2 s each through the whole reload (which takes seconds): requests
        # in flight at every moment of it, without queueing more runs than a busy machine drains in seconds.
        with Load(server.url, interval=2.0) as load:
            wait_until(lambda: load.accepted() >= 6, what="triggers accepted before the reload")
            wait_until(lambda: len(worker_pids(server)) >= 2, what="both workers booted")
            old = worker_pids(server)
            os.kill(server.process.pid, signal.SIGHUP)
            wait_until(lambda: len(worker_pids(server)) >= 4, what="two new workers booted")
            wait_until(lambda: all(gone(pid) for pid in old), what="the old workers drained and exited")
            reloaded = load.accepted()
            wait_until(lambda: load.accepted() >= reloaded + 6, what="triggers accepted after the reload")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            docs = [wait_until_ended(client, f"/api/v1/runs/{run_id}", timeout=120) for run_id in load.run_ids]
    finally:
        server.kill()
    ended = [doc["status"] for doc in docs]
    print(f"\nSIGHUP under load: {dict(load.statuses)}, {load.retries} retried connection(s)")
    assert set(load.statuses) == {202} and load.statuses[202] >= 12, load.statuses
    assert Counter(ended) == {"completed": len(load.run_ids)}, [
        (doc["run_id"], doc["status"], doc["error"], doc["started_at"], doc["finished_at"]) for doc in docs
        if doc["status"] != "completed"]
    assert len(set(load.run_ids)) == len(load.run_ids)


def test_sigterm_under_load_answers_every_request_and_a_restart_ends_every_accepted_run(workdir):
    server = GunicornServer(workdir, workers=2, GUNICORN_GRACEFUL_TIMEOUT="6", **NO_QUEUE_LIMIT).start()
    with Load(server.url, connectors=("slow", "numbers", "events", "products")) as load:
        wait_until(lambda: load.accepted() >= 6, what="triggers accepted before SIGTERM")
        started = time.monotonic()
        exit_code = server.terminate(timeout=60)
        stopped_after = time.monotonic() - started
    print(f"\nSIGTERM under load: {dict(load.statuses)}, {load.retries} retried connection(s); "
          f"gunicorn exited after {stopped_after:.1f} s (graceful timeout 6 s)")
    assert exit_code == 0  # a graceful exit: the master was not killed for hanging
    # Answered, or refused once the gateway is gone; no run exists whose 202 never reached its caller.
    assert set(load.statuses) <= {202, "ConnectError", "ReadError", "RemoteProtocolError"}, load.statuses
    store = run_store(workdir)
    assert {run.id for run in store.list(limit=10_000)} == set(load.run_ids)
    statuses = Counter(store.get(run_id).status for run_id in load.run_ids)
    store.dispose()
    assert set(statuses) <= {"completed", "crashed", "queued"}  # nothing left running with nobody to run it
    again = GunicornServer(workdir, workers=2).start()  # runs still queued are taken up by the next gateway
    try:
        with httpx.Client(base_url=again.url, timeout=10) as client:
            ended = Counter(wait_until_ended(client, f"/api/v1/runs/{run_id}", timeout=180)["status"] for run_id in load.run_ids)
    finally:
        again.kill()
    print(f"accepted {len(load.run_ids)} runs, after the restart: {dict(ended)}")
    assert set(ended) <= {"completed", "crashed"} and sum(ended.values()) == len(load.run_ids)


def test_recycled_workers_lose_no_run(workdir):
    # Every 6-8 requests a worker exits after its current one: the 16 triggers alone recycle a worker (or both)
    # while the runs they accepted are queued and running. A trigger may wait for a worker to drain its runs and
    # a new one to boot: on a busy machine that is tens of seconds.
    server = GunicornServer(workdir, workers=2, GUNICORN_CMD_ARGS="--max-requests 6 --max-requests-jitter 2").start()
    store = run_store(workdir)
    try:
        with ThreadPoolExecutor(6) as pool:
            accepted = list(pool.map(lambda i: httpx.post(
                f"{server.url}/trigger", json={"connector_id": ("slow", "numbers")[i % 2],  # two run side by side
                                               "params": {"delay_seconds": 0.2, "n": 2}},
                headers={"Connection": "close"}, timeout=120).json()["run_id"], range(16)))

        # Read from the store the gateway writes: a request would recycle workers again, and a busy machine's
        # slow boots would make more requests. The deadline is on progress: 120 s for the next run to end.
        started, progress = time.monotonic(), []
        ended_so_far, deadline = 0, started + 120
        while (ended_now := sum(store.get(run_id).is_terminal for run_id in accepted)) < len(accepted):
            if ended_now > ended_so_far:
                ended_so_far, deadline = ended_now, time.monotonic() + 120
                progress.append(f"{ended_now}@{time.monotonic() - started:.0f}s")
            assert time.monotonic() < deadline, (
                f"no run ended within 120 s: {Counter(store.get(run_id).status for run_id in accepted)}\n"
                f"{server.log()[-6000:]}")
            time.sleep(0.5)
        ended = Counter(store.get(run_id).status for run_id in accepted)
        boots = server.log().count("Booting worker")
    finally:
        server.kill()
        store.dispose()
    print(f"\n16 runs across worker recycling ({boots} worker boots): {dict(ended)}; ended: {progress}")
    assert boots > 2  # workers really were recycled
    assert ended == {"completed": 16}


def run_until_killed(script: str, registry, workspace, *args: str) -> None:
    """One of the scripts below in a process of its own, on this registry and workspace: it must die by SIGKILL."""
    killed = subprocess.run([sys.executable, "-c", script, str(registry.path), str(workspace.pipelines_dir),
                             str(workspace.duckdb_dir), *args], cwd=ROOT, timeout=120)
    assert killed.returncode == -signal.SIGKILL


KILL_AFTER_NORMALIZE = """
import os, signal, sys
from connectors.pipeline import ConnectorPipeline, Workspace
from connectors.registry import ConnectorRegistry
spec = ConnectorRegistry.load(__import__("pathlib").Path(sys.argv[1])).get("inc")
pipeline = ConnectorPipeline(spec, Workspace(__import__("pathlib").Path(sys.argv[2]), __import__("pathlib").Path(sys.argv[3])))
for step in ("recover", "extract", "normalize"):
    pipeline.run_step(step)
os.kill(os.getpid(), signal.SIGKILL)  # dies with a normalized load package on disk, never loaded
"""


def test_a_run_killed_before_its_load_is_completed_by_the_next_run_without_duplicates(workdir: Path):
    from connectors.pipeline import Workspace, run_connector

    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(40)])
    registry = incremental_registry(workdir, "append")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    assert run_connector(registry.get("inc"), workspace).rows == {"events": 40}
    # (Before any load, dlt's sync with the destination drops a pending package along with the local state,
    # as its own run() does, and extracts again from the start: no duplicates either.)
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 40:02d}") for i in range(40, 45)])
    run_until_killed(KILL_AFTER_NORMALIZE, registry, workspace)
    pending = list((workspace.pipelines_dir / "flowgate_inc" / "load" / "normalized").iterdir())
    assert pending, "the killed run left no pending load package"

    events_db(workdir / "events.db", [(i, "new", f"2025-01-03T00:00:{i - 45:02d}") for i in range(45, 48)])
    summary = run_connector(registry.get("inc"), workspace)  # recover loads the package, then only new rows
    with duckdb.connect(summary.location, read_only=True) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM raw.events").fetchone()
    assert (total, distinct) == (48, 48)
    # Two loads: the killed run's package (its 5 rows) first, then this run's own 3 new rows; both counted.
    assert len(summary.load_ids) == 2 and summary.rows == {"events": 8}
    assert not list((workspace.pipelines_dir / "flowgate_inc" / "load" / "normalized").iterdir())


KILL_DURING_NORMALIZE_COMMIT = """
import os, signal, sys
from pathlib import Path
from dlt.common.storages.load_storage import LoadStorage
from connectors.pipeline import ConnectorPipeline, Workspace
from connectors.registry import ConnectorRegistry

commit = LoadStorage.commit_new_load_package
def commit_then_die(self, load_id):  # dlt logs "Committing storage, do not kill this process" just before
    commit(self, load_id)
    os.kill(os.getpid(), signal.SIGKILL)  # after the rename into load/normalized, before the extracted files go
LoadStorage.commit_new_load_package = commit_then_die
spec = ConnectorRegistry.load(Path(sys.argv[1])).get("inc")
pipeline = ConnectorPipeline(spec, Workspace(Path(sys.argv[2]), Path(sys.argv[3])))
for step in ("recover", "extract", "normalize"):
    pipeline.run_step(step)
"""


def test_a_run_killed_inside_normalizes_commit_does_not_poison_the_connector(workdir: Path):
    """Killed between dlt's two commit moves, a pipeline folder holds the package twice (extracted and
    normalized): every later normalize failed with 'Directory not empty'. The next run finishes the commit."""
    from connectors.pipeline import Workspace, run_connector

    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(40)])
    registry = incremental_registry(workdir, "append")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    assert run_connector(registry.get("inc"), workspace).rows == {"events": 40}
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 40:02d}") for i in range(40, 45)])
    run_until_killed(KILL_DURING_NORMALIZE_COMMIT, registry, workspace)
    folder = workspace.pipelines_dir / "flowgate_inc"
    (package,) = [p.name for p in (folder / "load" / "normalized").iterdir()]
    assert (folder / "normalize" / "extracted" / package).exists()  # the package is there twice

    events_db(workdir / "events.db", [(i, "new", f"2025-01-03T00:00:{i - 45:02d}") for i in range(45, 48)])
    first = run_connector(registry.get("inc"), workspace)
    events_db(workdir / "events.db", [(i, "new", f"2025-01-04T00:00:{i - 48:02d}") for i in range(48, 50)])
    second = run_connector(registry.get("inc"), workspace)
    # the killed run's 5 rows, counted at its extract (it died before its normalize's count), and 3 new ones
    assert first.rows == {"events": 8} and second.rows == {"events": 2}
    with duckdb.connect(second.location, read_only=True) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM raw.events").fetchone()
    assert (total, distinct) == (50, 50)


KILL_AFTER_A_JOB_COMMITTED = """
import os, signal, sys
from pathlib import Path
from dlt.common.storages.load_package import PackageStorage
from connectors.pipeline import ConnectorPipeline, Workspace
from connectors.registry import ConnectorRegistry

save = PackageStorage.save_pending_transition
connector, table = sys.argv[4], sys.argv[5]
def die_before_recording(self, load_id, file_name, state, message=None):
    if file_name.startswith(table + "."):  # the table's job (the state's may end first, in its own thread)
        os.kill(os.getpid(), signal.SIGKILL)  # its rows are committed in DuckDB; dlt has not noted it yet
    save(self, load_id, file_name, state, message)
PackageStorage.save_pending_transition = die_before_recording
spec = ConnectorRegistry.load(Path(sys.argv[1])).get(connector)
pipeline = ConnectorPipeline(spec, Workspace(Path(sys.argv[2]), Path(sys.argv[3])))
for step in pipeline.steps:
    pipeline.run_step(step)
"""


def test_a_run_killed_after_a_load_job_committed_does_not_land_its_rows_twice(workdir: Path):
    """Found by the chaos test: a workflow's connector node killed at shutdown mid-load; the next run's recover
    loaded its package and the row was in DuckDB twice (same _dlt_id). The window is dlt's: between a job's
    commit in the destination and the note of it in the package, which restore reads (connectors/dlt_recovery.py)."""
    from connectors.pipeline import Workspace, run_connector

    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(40)])
    registry = incremental_registry(workdir, "append")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    assert run_connector(registry.get("inc"), workspace).rows == {"events": 40}
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 40:02d}") for i in range(40, 45)])
    run_until_killed(KILL_AFTER_A_JOB_COMMITTED, registry, workspace, "inc", "events")  # a Parquet copy job
    summary = run_connector(registry.get("inc"), workspace)  # recover finishes the killed run's package
    with duckdb.connect(summary.location, read_only=True) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM raw.events").fetchone()
    assert (total, distinct) == (45, 45)  # was (50, 45): the 5 rows of the killed run's job, loaded again
    # its package finished, its 5 rows counted (first reported now: the killed run reported none); nothing new
    assert len(summary.load_ids) == 1 and summary.rows == {"events": 5}
    assert not list((workspace.pipelines_dir / "flowgate_inc" / "load" / "normalized").iterdir())


def test_a_killed_runs_committed_insert_values_job_is_not_run_again_either(workdir: Path):
    """Rows from Python objects load as INSERT VALUES (dlt's other DuckDB job): the same window, the same mark."""
    from connectors.pipeline import Workspace, run_connector
    from connectors.registry import ConnectorRegistry

    registry = ConnectorRegistry.load(workdir / "connectors.yaml")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    run_until_killed(KILL_AFTER_A_JOB_COMMITTED, registry, workspace, "numbers", "numbers")
    summary = run_connector(registry.get("numbers"), workspace)  # the killed run's 10 rows, then its own 10
    with duckdb.connect(summary.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.numbers").fetchone()[0] == 20  # 30: its job ran again
    assert len(summary.load_ids) == 2 and summary.rows == {"numbers": 20}


ISOLATED_RUN = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the child's lines, relayed
from connectors.isolated import run_connector_isolated
from connectors.pipeline import Workspace
from connectors.registry import ConnectorRegistry
spec = ConnectorRegistry.load(Path(sys.argv[1])).get("slow").with_params({"delay_seconds": 3600.0})
run_connector_isolated(spec, Workspace(Path(sys.argv[2]), Path(sys.argv[3])))
"""


def _marked(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _described(pids: list[int]) -> list[str]:
    described = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if line.startswith("State:"))
        except OSError:
            continue
        described.append(f"{pid} ({state}): {cmdline[:160]}")
    return described


def test_a_connector_run_dies_with_the_process_that_started_it(workdir: Path):
    """A gateway worker SIGKILLed mid-run: its connector's child process must not run on unheld."""
    marker = f"FLOWGATE_TEST_MARKER=isolated-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    output = workdir / "isolated-run.log"
    with output.open("w") as out:
        parent = subprocess.Popen([sys.executable, "-c", ISOLATED_RUN, str(workdir / "connectors.yaml"),
                                   str(workdir / "var" / "dlt"), str(workdir / "var" / "duckdb")], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        # The run's own first line names its process: it runs (its forkserver and the resource tracker existing
        # is not enough; on a busy machine the forkserver is still importing dlt seconds later).
        found = wait_until(lambda: re.search(r"runs in process (\d+)", output.read_text()), 120,
                           "the run's process started")
        run_pid = int(found.group(1))
        assert run_pid in _marked(marker)
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: run_pid not in _marked(marker), 30, "the run's process ended with its parent", every=0.2)
    # Its forkserver and the resource tracker follow (each notices its parent's pipe close).
    deadline = time.monotonic() + 60
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(marker) == [], _described(_marked(marker))
