"""Chaos (issue 11): two gateways on one PostgreSQL run store, each with its own var/ (and the Prefect worker with a
third) over one destination, a Prefect server and process worker, triggers and workflow runs flooding both
gateways while gunicorn workers are SIGKILLed, one gateway is SIGTERMed and started again, the Prefect server is
killed and started again and its creates are answered after the gateways' timeout, and gateway a's database stops
answering (a proxy holds every byte, connections stay open) for longer than a lease.

Then: every run a caller got an answer for ends in a recorded state; no connector ever executes twice at once; no
trigger's token executes twice, nor after its run was recorded ended; a completed run's token ran to its end;
every ended run's callback is delivered (a repeat only ever as the same delivery). docs/operations.md: Guarantees.

`make test` runs it for FLOWGATE_CHAOS_SECONDS (default 10 s; every kind of fault comes at least once),
`make chaos` for 600 s.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import httpx
import pytest

from flows.outcome import TERMINAL
from tests.support.chaos_source import read_executions
from tests.support.fake_services import Blackhole, CallbackReceiver, SlowProxy
from tests.support.gunicorn_server import GunicornServer
from tests.support.prefect_stack import POSTGRES_ADMIN_URL, PrefectStack, fresh_postgres_database

pytestmark = [pytest.mark.long(seconds=150), pytest.mark.chaos]  # long: started first in the parallel run

CHAOS_SECONDS = float(os.environ.get("FLOWGATE_CHAOS_SECONDS", "10"))
LONG = CHAOS_SECONDS > 60
CONNECTORS = ("c0", "c1", "c2", "c3")
SCHEDULED = "s0"  # fired by the gateways' schedulers every 3 s, to Prefect or locally, its callback and retries
# connector-level (its runs are the ones a fault hits most: a slot every 2 s, whatever the load does)
SECRET = "chaos-callback-secret"
CREATE_TIMEOUT = 1.5  # the gateways' FLOWGATE_PREFECT_TIMEOUT; slowed creates answer later than two of them
FAULTS = ("kill_worker", "sigterm_gateway", "kill_worker", "kill_prefect", "kill_worker", "slow_creates",
          "partition_database")
LEASE_SECONDS = 8
# Half the requests ask for retries: a run cut off by a fault runs again, as a numbered attempt of the same run.
RETRY = {"max_attempts": 6, "backoff_seconds": 0.5, "max_backoff_seconds": 2, "on": ["transient", "crashed"]}

WORKFLOW = """
nodes:
  - {id: start, type: trigger}
  - {id: load, type: connector, timeout: 600, config: {connector_id: c3, params: {token: "{{ inputs.token }}"}}}
  - {id: out, type: output, config: {value: "{{ nodes.load.output.rows }}"}}
connections: [{from: start, to: load}, {from: load, to: out}]
"""


def connectors_yaml(executions: Path, callback_url: str) -> str:
    # Each connector's DuckDB file named outright: the gateways and the Prefect worker (its own var/) share it,
    # and with it the connector's key.
    return "connectors:\n" + "".join(
        f"  {name}:\n"
        f"    source: {{kind: python, ref: 'tests.support.chaos_source:recorded', "
        f"args: {{token: '', connector: {name}, path: '{executions}', seconds: 1.0}}}}\n"
        f"    destination: {{path: shared/{name}.duckdb}}\n"
        f"    dataset: chaos\n" for name in CONNECTORS) + (
        f"  {SCHEDULED}:\n"
        f"    source: {{kind: python, ref: 'tests.support.chaos_source:recorded', "
        f"args: {{token: '', connector: {SCHEDULED}, path: '{executions}', seconds: 0.3}}}}\n"
        f"    destination: {{path: shared/{SCHEDULED}.duckdb}}\n"
        f"    dataset: chaos\n"
        f"    schedule: {{interval: 3}}\n"
        f"    retry: {{max_attempts: 6, backoff_seconds: 0.5, max_backoff_seconds: 2, on: [transient, crashed]}}\n"
        f"    callback_url: {callback_url}\n")


@dataclass
class Answered:
    """A request a gateway answered 2xx: the run it named and the token its connector execution carries."""

    run_id: str
    token: str
    kind: str
    gateway: str
    retried: bool  # asked with a retry policy on crashed and transient failures


@dataclass
class Load:
    """Callers flooding one gateway with triggers and workflow executions, each with its own token (and
    Idempotency-Key: a request whose connection failed is sent again under it, as a careful caller does). Each
    caller sends again as soon as fewer than `in_flight` of its runs are unfinished: as fast as the gateways
    absorb, with a backlog that drains within the test's time on a busy machine."""

    name: str
    url: str
    callback_url: str
    clients: int = 2
    in_flight: int = 3
    answered: list[Answered] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _request(self, rng: random.Random) -> tuple[str, str, dict]:
        token = uuid.uuid4().hex
        backend = {} if rng.random() < 0.4 else {"backend": "local"}  # auto: Prefect while it can take runs
        retry = {"retry": RETRY} if rng.random() < 0.5 else {}
        if rng.random() < 0.25:
            return "workflow", "/api/workflow/chaos/execute", {"inputs": {"token": token}, **backend, **retry,
                                                               "callback_url": self.callback_url}
        return "connector", "/trigger", {"connector_id": rng.choice(CONNECTORS[:3]), "params": {"token": token},
                                         **backend, **retry, "callback_url": self.callback_url}

    def _unfinished(self, client: httpx.Client, run_ids: list[str]) -> list[str]:
        unfinished = []
        for run_id in run_ids:
            try:
                if client.get(f"/api/v1/runs/{run_id}").json()["status"] in TERMINAL:
                    continue
            except httpx.TransportError:
                pass  # not known to have ended
            unfinished.append(run_id)
        return unfinished

    def _client(self, seed: int) -> None:
        rng = random.Random(f"{self.name}-{seed}")
        pending: list[str] = []
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                while len(pending) >= self.in_flight and not self.stop.wait(0.5):
                    pending = self._unfinished(client, pending)
                kind, path, body = self._request(rng)
                token = (body.get("params") or body.get("inputs"))["token"]
                for _attempt in range(3):
                    try:
                        response = client.post(path, json=body, headers={"Idempotency-Key": token})
                        outcome: int | str = response.status_code
                        break
                    except httpx.TransportError as exc:  # a killed worker, a gateway going away
                        outcome = type(exc).__name__
                        self.stop.wait(0.5)
                with self._lock:
                    self.outcomes[outcome] += 1
                    if isinstance(outcome, int) and outcome < 300:
                        doc = response.json()
                        self.answered.append(Answered(doc.get("run_id") or doc["executionId"], token, kind,
                                                      self.name, "retry" in body))
                        pending.append(self.answered[-1].run_id)
                self.stop.wait(rng.uniform(0.05, 0.2))


def worker_pids(server: GunicornServer) -> list[int]:
    """The gunicorn workers (not the forkserver and resource tracker the master also starts)."""
    return server.worker_pids()


class Faults:
    """Injects the faults in turn, a pause between them, until the time is up and each kind happened once."""

    def __init__(self, gateways: dict[str, GunicornServer], stack: PrefectStack, proxy: SlowProxy, seconds: float,
                 database: Blackhole):
        self.gateways, self.stack, self.proxy, self.database = gateways, stack, proxy, database
        self.seconds = seconds
        self.pause = 1.5 if not LONG else 5.0
        self.injected: Counter = Counter()
        self.prefect_down_seconds = 0.0  # the longest time Prefect's server was gone
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="chaos-faults", daemon=True)
        self.rng = random.Random(11)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(self.seconds + 600)
        assert not self._thread.is_alive(), "the fault thread did not end"

    def _loop(self) -> None:
        deadline = time.monotonic() + self.seconds
        step = 0
        while time.monotonic() < deadline or set(FAULTS) - set(self.injected):
            fault = FAULTS[step % len(FAULTS)]
            step += 1
            try:
                started = time.monotonic()
                getattr(self, fault)()
                self.injected[fault] += 1
                progress(f"{fault} ({time.monotonic() - started:.1f} s)")
            except Exception as exc:  # reported by the test: a fault that could not be injected is a failure
                self.errors.append(f"{fault}: {type(exc).__name__}: {exc}")
                return
            time.sleep(self.pause)

    def kill_worker(self) -> None:
        name = self.rng.choice(sorted(self.gateways))
        pids = worker_pids(self.gateways[name])
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)

    def sigterm_gateway(self) -> None:
        """Gateway b: SIGTERM (it drains, records what it could not finish), then started again, same port."""
        gateway = self.gateways["b"]
        gateway.terminate(timeout=60)
        gateway.start(timeout=120)

    def kill_prefect(self) -> None:
        killed_at = time.monotonic()
        os.killpg(self.stack.server.pid, signal.SIGKILL)
        self.stack.server.wait(10)
        self.stack.start_server()
        self.prefect_down_seconds = max(self.prefect_down_seconds, time.monotonic() - killed_at)
        if self.stack.worker.poll() is not None:  # the worker gave up while its server was gone
            self.injected["prefect_worker_restarts"] += 1
            self.stack.start_worker()

    def partition_database(self) -> None:
        """Gateway a's run store stops answering, its connections left open, for longer than a lease: gateway b
        recovers a's runs; a's must be fenced (their processes killed), not go on beside b's next runs."""
        self.database.hold.set()
        time.sleep(LEASE_SECONDS * 1.5)
        self.database.hold.clear()

    def slow_creates(self) -> None:
        """Prefect creates the flow runs, its answers arrive after two of the gateways' timeouts."""
        self.proxy.delay, self.proxy.slow_path = CREATE_TIMEOUT * 2 + 1, "/create_flow_run"
        time.sleep(6 if not LONG else 15)
        self.proxy.slow_path = ""


def _finished_at(doc: dict) -> float:
    at = datetime.fromisoformat(doc["finished_at"].replace("Z", "+00:00"))
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()


def progress(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_until_all_ended(client: httpx.Client, run_ids: list[str], timeout: float) -> dict[str, dict]:
    """GET every run until each has an ended status; the documents by run id."""
    docs: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(docs) < len(run_ids) and time.monotonic() < deadline:
        for run_id in run_ids:
            if run_id not in docs:
                doc = client.get(f"/api/v1/runs/{run_id}").json()
                if doc["status"] in TERMINAL:
                    docs[run_id] = doc
        time.sleep(0.5)
    unfinished = {run_id: client.get(f"/api/v1/runs/{run_id}").json() for run_id in run_ids if run_id not in docs}
    assert not unfinished, f"{len(unfinished)} answered run(s) not ended after {timeout} s: " + "; ".join(
        f"{d['run_id']} {d['kind']} {d['backend']} {d['status']} {d['prefect_state']}" for d in unfinished.values())
    return docs


def wait_until_delivered(client: httpx.Client, docs: dict[str, dict], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = [run_id for run_id, doc in docs.items() if doc["callback"]["status"] != "delivered"]
    while pending and time.monotonic() < deadline:
        time.sleep(0.5)
        pending = [run_id for run_id in pending
                   if client.get(f"/api/v1/runs/{run_id}").json()["callback"]["status"] != "delivered"]
    assert not pending, f"callbacks not delivered after {timeout} s: " + "; ".join(
        f"{run_id} {client.get(f'/api/v1/runs/{run_id}').json()['callback']}" for run_id in pending[:5])


@pytest.fixture
def chaos_stack(workdir: Path, postgres_url: str):
    """Prefect's server (on its own PostgreSQL database) with a slow-create proxy in front of it, and a callback
    receiver; the test deploys and starts the worker (sharing the run store, for the connector keys) while its
    gateways start."""
    executions = workdir / "executions.log"
    receiver = CallbackReceiver()
    (workdir / "connectors.yaml").write_text(connectors_yaml(executions, f"{receiver.url}/hook"))
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "chaos.yaml").write_text(WORKFLOW)
    prefect_db = f"flowgate_test_chaos_{os.getpid()}"
    stack = PrefectStack(workdir, database_url=fresh_postgres_database(prefect_db))
    stack.env["DATABASE_URL"] = postgres_url
    proxy = SlowProxy(stack.api_url.removesuffix("/api"))
    try:
        stack.start_server()
        progress("Prefect server up")
        yield stack, proxy, receiver, executions
    finally:
        stack.stop()
        proxy.stop()
        receiver.stop()
        import sqlalchemy as sa

        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{prefect_db}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.timeout(900 + 3 * CHAOS_SECONDS)
def test_every_answered_run_executes_at_most_once_and_ends_recorded_under_chaos(workdir, postgres_url, chaos_stack,
                                                                                  request):
    stack, proxy, receiver, executions_log = chaos_stack
    env = {"PREFECT_API_URL": f"{proxy.url}/api",
           "FLOWGATE_PREFECT_TIMEOUT": str(CREATE_TIMEOUT), "FLOWGATE_LEASE_SECONDS": str(LEASE_SECONDS),
           "FLOWGATE_PREFECT_PICKUP_SECONDS": "20", "FLOWGATE_PREFECT_WORKER_MAX_AGE_SECONDS": "30",
           "FLOWGATE_CALLBACK_SECRET": SECRET, "FLOWGATE_CALLBACK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.port}",
           "FLOWGATE_CALLBACK_BACKOFF_SECONDS": "0.5", "FLOWGATE_CALLBACK_MAX_ATTEMPTS": "20",
           "FLOWGATE_MAX_QUEUED_PER_TARGET": "100000", "GUNICORN_GRACEFUL_TIMEOUT": "5"}
    database = Blackhole(("127.0.0.1", 5432))  # gateway a's way to the run store; b's is direct
    urls = {"a": postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{database.port}"), "b": postgres_url}
    # Each gateway with its own var/ (pipeline folders), as on separate hosts: the DuckDB files are shared.
    gateways = {name: GunicornServer(workdir, workers=2, PROMETHEUS_MULTIPROC_DIR=str(workdir / f"metrics-{name}"),
                                     FLOWGATE_VAR_DIR=str(workdir / f"var-{name}"), DATABASE_URL=urls[name], **env)
                for name in ("a", "b")}
    callback_url = f"{receiver.url}/hook"
    loads = [Load(name, gateway.url, callback_url) for name, gateway in gateways.items()]
    faults = Faults(gateways, stack, proxy, CHAOS_SECONDS, database)
    try:
        with ThreadPoolExecutor(3) as pool:
            started = [pool.submit(gateway.start, timeout=180) for gateway in gateways.values()]
            started.append(pool.submit(lambda: (stack.deploy(), stack.start_worker())))
            for future in started:
                future.result()
        progress("gateways, deployments and Prefect worker up; load and faults start")
        for load in loads:
            load.start()
        faults.start()
        faults.join()
        for load in loads:
            load.join()
        assert not faults.errors, faults.errors
        answered = [a for load in loads for a in load.answered]
        progress(f"faults and load stopped: {dict(faults.injected)}; waiting for {len(answered)} runs to end")
        with httpx.Client(base_url=gateways["a"].url, timeout=30) as client:
            docs = wait_until_all_ended(client, [a.run_id for a in answered], timeout=240 if not LONG else 900)
            # No slot fires after this: every gateway reads the pause at the schedule's next due slot.
            assert client.post(f"/api/v1/connectors/{SCHEDULED}/schedule/pause").status_code == 200
            time.sleep(3)  # a pass that read the state just before the pause fires at most one more slot
            slots = client.get("/api/v1/runs", params={"connector_id": SCHEDULED, "limit": 200}).json()["items"]
            progress(f"every answered run ended, and {len(slots)} slots of {SCHEDULED}; waiting for their ends "
                     "and callbacks")
            slot_docs = wait_until_all_ended(client, [slot["run_id"] for slot in slots], timeout=240)
            wait_until_delivered(client, {**docs, **slot_docs}, timeout=120)
            # The senders' next sweep: a run ended now on each gateway has its callback delivered, after every
            # delivery that was still due before it.
            sweep = [httpx.post(f"{gateway.url}/trigger", timeout=30, json={
                "connector_id": "c0", "backend": "local", "params": {"token": uuid.uuid4().hex},
                "callback_url": callback_url}).json()["run_id"] for gateway in gateways.values()]
            wait_until_delivered(client, wait_until_all_ended(client, sweep, timeout=120), timeout=60)
    finally:
        database.hold.clear()
        for gateway in gateways.values():
            gateway.kill()
        database.close()

    executions = read_executions(executions_log)
    by_token = defaultdict(list)
    for execution in executions:
        if execution.connector != SCHEDULED:  # a slot's execution has no token (counted per slot below)
            by_token[execution.token].append(execution)
    deliveries = defaultdict(list)
    for headers, _ in receiver.raw:
        deliveries[headers["x-flowgate-run-id"]].append(headers["x-flowgate-delivery"])

    retried = {a.token for a in answered if a.retried}
    statuses = Counter((docs[a.run_id]["kind"], docs[a.run_id]["backend"], docs[a.run_id]["status"]) for a in answered)
    outcomes = sum((load.outcomes for load in loads), Counter())
    summary = (f"\nchaos for {CHAOS_SECONDS:g} s; faults: {dict(faults.injected)}; Prefect gone for up to "
          f"{faults.prefect_down_seconds:.0f} s"
          f"\nanswers: {dict(outcomes)} ({len(answered)} runs answered 2xx)"
          f"\nruns by (kind, backend, final status): {dict(sorted(statuses.items()))}"
          f"\nwith retries: {len(retried)} runs, attempts: "
          f"{dict(Counter(docs[a.run_id]['attempt'] for a in answered if a.retried))}"
          f"\nexecutions: {len(executions)}, ran to their end: {sum(e.ended for e in executions)}, cut off: "
          f"{sum(not e.ended for e in executions)}; tokens executed twice: "
          f"{sum(len(v) > 1 for v in by_token.values())}"
          f"\ncallbacks: {len(receiver.raw)} POSTs for {len(deliveries)} runs, repeated: "
          f"{sum(len(v) - len(set(v)) for v in deliveries.values())}")
    # Through the terminal reporter: the counts show in `make test`'s report too, not only with -s.
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(summary)

    # Every answered run ended, in a recorded state; a completed one's token ran to its end, exactly once.
    assert len({a.run_id for a in answered}) == len(answered)  # a token (idempotency key) names one run
    # Never executed twice: a crashed run is not run again. The one exception (docs/operations.md, Guarantees): a create
    # whose answer was lost while Prefect stayed unreachable past the settle deadline (60 s) goes local.
    excused = {a.token for a in answered if docs[a.run_id]["fallback_reason"] == "prefect_create_failed"
               and faults.prefect_down_seconds > 55}
    twice = {token: runs for token, runs in by_token.items() if len(runs) > 1 and token not in retried}
    assert set(twice) <= excused, twice  # the tokens of requests whose answer was lost too
    for a in answered:
        doc, runs = docs[a.run_id], by_token[a.token]
        assert all(e.started < _finished_at(doc) for e in runs), (doc, runs)  # nor after its end was recorded
        if a.retried:  # at most one execution per attempt, one after another; the last one's end is the run's
            assert len(runs) <= doc["attempt"] + (a.token in excused), (doc, runs)
            assert all(e.last_seen <= later.started for e, later in zip(runs, runs[1:])), runs
            assert doc["status"] == "completed", ("a run with retries did not complete", doc, runs)
            assert runs[-1].ended, (doc, runs)
            continue
        if doc["status"] == "completed":
            assert len(runs) == 1 and runs[0].ended, (doc, runs)
        if runs and not runs[0].ended:  # cut off (its process killed): its run says so
            assert doc["status"] in ("crashed", "failed", "cancelled"), (doc, runs)

    # No connector ever executing twice at once, on whichever path and process.
    last_seen: dict[str, tuple[float, object]] = {}
    for execution in executions:
        before = last_seen.get(execution.connector)
        assert before is None or before[0] < execution.started, ("overlap", before, execution)
        if before is None or execution.last_seen > before[0]:
            last_seen[execution.connector] = (execution.last_seen, execution)

    # Data lands once: no token's row twice in its destination; every completed connector run's row there.
    landed = Counter()
    for name in CONNECTORS:
        location = workdir / "shared" / f"{name}.duckdb"
        if location.exists():
            with duckdb.connect(str(location), read_only=True) as con:
                landed.update(token for (token,) in con.execute("SELECT token FROM chaos.executions").fetchall())
    # A retried run lands its row once per attempt at most: an attempt killed after its load committed but before
    # its end was written is retried and loads again (docs/operations.md, Guarantees: between the work and its
    # record), so a retried token may land as often as it executed.
    assert not [token for token, count in landed.items() if count > 1 and token not in retried]
    assert not [token for token in retried if landed[token] > len(by_token[token])]
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"retried runs whose row landed more than once: {sum(landed[token] > 1 for token in retried)}")
    assert all(landed[a.token] >= 1 for a in answered if docs[a.run_id]["status"] == "completed")

    # Every ended run's callback delivered; a repeat (its sender died before recording it) only as the same delivery.
    for a in answered:
        assert len(set(deliveries[a.run_id])) == 1, (a, deliveries[a.run_id])

    # The schedule: one run per slot, whoever fired it (four gateway processes, workers killed, a gateway
    # SIGTERMed, Prefect gone and back), each a scheduled run that completes (its connector retries what a fault
    # cut off); each slot executed at most once per attempt, to its end on the last; its callback delivered once.
    fired = sorted(slot_docs.values(), key=lambda doc: doc["scheduled_for"])
    assert fired and all(doc["source"] == "schedule" for doc in fired), fired
    assert len({doc["scheduled_for"] for doc in fired}) == len(fired), [doc["scheduled_for"] for doc in fired]
    assert all(doc["status"] == "completed" for doc in fired), [(doc["status"], doc["error"]) for doc in fired]
    scheduled_runs = [e for e in executions if e.connector == SCHEDULED]
    excused_slots = sum(doc["fallback_reason"] == "prefect_create_failed" for doc in fired) \
        if faults.prefect_down_seconds > 55 else 0  # as for the answered runs above
    attempts = sum(doc["attempt"] for doc in fired)
    assert len(fired) <= sum(e.ended for e in scheduled_runs) <= len(scheduled_runs) <= attempts + excused_slots, (
        scheduled_runs, fired)
    for doc in fired:
        assert len(set(deliveries[doc["run_id"]])) == 1, (doc, deliveries[doc["run_id"]])
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"schedule {SCHEDULED}: {len(fired)} slots, by (backend, status): "
        f"{dict(Counter((doc['backend'], doc['status']) for doc in fired))}, attempts: "
        f"{dict(Counter(doc['attempt'] for doc in fired))}; executions: {len(scheduled_runs)}")
