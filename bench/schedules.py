"""Benchmark: how late a schedule fires, and what a thousand schedules cost the gateway.

1. Fire lag (a scheduled run's start minus its slot, what `flowgate_schedule_fire_lag_seconds` observes) on a real
   gunicorn (2 workers of 4 executor slots, SQLite run store; at capacity on PostgreSQL too where one is at
   127.0.0.1): two connectors scheduled every 5 s, first on a quiet machine, then at
   capacity: 16 callers each triggering one of eight connectors that run 0.3 s, again as soon as its run ended, beside one busy-looping process per core.
   The baseline is a triggered run's lag (its start minus its trigger's answer) in the same phase: what a run
   waits for an executor anyway. Printed: p50/p99 of both per phase, and the busy/quiet ratios.
2. The cost of 1,000 schedules (interval 60 s, all on the same second: the worst burst) in one gateway process:
   its scheduler loop for --window seconds, CPU seconds per wall second (share of one core), against the same
   gateway with the same 1,000 connectors unscheduled, in this run. No executor runs: the slots' runs queue (and a
   schedule's next slot is skipped while its run waits), so this is the scheduler's own cost, not the runs'.

    .venv/bin/python -m bench.schedules [--seconds 40] [--window 65]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx

from tests.support.gunicorn_server import GunicornServer
from tests.support.postgres import fresh_schema, postgres_available

SCHEDULED = 2
INTERVAL = 5  # longer than a trivial run takes at capacity (1-4 s here), so most slots find their previous run ended
PARTS: dict[str, list[tuple[float, float, float]]] = {}  # per phase, per free slot: made, claimed, ran (seconds)
OWN: dict[str, list[float]] = {}  # per phase: fire lags of the slots not behind their schedule's previous run


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _flood(url: str, i: int, stop, triggered: list, lock: threading.Lock) -> None:
    """Trigger one of the eight busy connectors, again as soon as its run ended: a steady backlog."""
    with httpx.Client(base_url=url, timeout=60) as caller:
        while not stop.is_set():
            answer = caller.post("/trigger", json={"connector_id": f"busy_{i % 8}"})
            if answer.status_code not in (200, 202):
                continue
            with lock:
                triggered.append((answer.json()["run_id"], time.time()))
            while caller.get(answer.json()["status_url"]).json()["status"] in ("queued", "running"):
                time.sleep(0.1)


def _pace(url: str, stop, triggered: list) -> None:
    """A trigger every second: the quiet phase's baseline."""
    with httpx.Client(base_url=url, timeout=60) as caller:
        while not stop.is_set():
            answer = caller.post("/trigger", json={"connector_id": f"busy_{len(triggered) % 8}"})
            triggered.append((answer.json()["run_id"], time.time()))
            time.sleep(1)


def _phase(url: str, phase: str, seconds: float, phase_name: str, spinners: int) -> tuple[list[float], list[float]]:
    """One phase on a running gateway: the scheduled runs' fire lags and the triggered runs' waits; the lags of the
    slots whose previous run of the same schedule had ended by the slot go to OWN[phase_name] too (a slot behind its
    own still-running run waits for it by design, so only these measure how late the gateway itself fires)."""
    began = time.time()
    triggered: list[tuple[str, float]] = []
    stop = multiprocessing.Event()
    spinning: list[multiprocessing.Process] = []
    callers: list[threading.Thread] = []
    if phase == "quiet":
        callers = [threading.Thread(target=_pace, args=(url, stop, triggered))]
    else:
        spinning = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(spinners)]
        lock = threading.Lock()
        callers = [threading.Thread(target=_flood, args=(url, i, stop, triggered, lock)) for i in range(16)]
    for worker in [*spinning, *callers]:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in [*callers, *spinning]:
        worker.join()
    with httpx.Client(base_url=url, timeout=60) as client:
        while client.get("/api/v1/runs", params={"status": "queued", "limit": 1}).json()["items"]:
            time.sleep(1)  # the backlog drains, the phase's last slots start
        runs = client.get("/api/v1/runs", params={"source": "schedule", "limit": 200}).json()["items"]
        started = [client.get(f"/api/v1/runs/{run_id}").json().get("started_at") for run_id, _ in triggered]
    runs = sorted((r for r in runs if r.get("started_at") and _at(r["scheduled_for"]) >= began),
                  key=lambda r: r["scheduled_for"])
    ended: dict[str, float] = {}  # each schedule's previous run's end, as the slots go by
    scheduled, own = [], []
    for run in runs:
        slot, target = _at(run["scheduled_for"]), run["connector_id"]
        lag = _at(run["started_at"]) - slot
        scheduled.append(lag)
        if ended.get(target, 0.0) <= slot:  # its previous run had ended by the slot: nothing of its own to wait for
            own.append(lag)
            PARTS.setdefault(phase_name, []).append((_at(run["created_at"]) - slot, _at(run["started_at"]) - _at(run["created_at"]),
                                                     _at(run["finished_at"]) - _at(run["started_at"]) if run.get("finished_at") else float("nan")))
        ended[target] = _at(run["finished_at"]) if run.get("finished_at") else float("inf")
    OWN[phase_name] = own
    return scheduled, [_at(at) - answered for (_, answered), at in zip(triggered, started) if at]


def _phases(runs: list, phases: dict, seconds: float, spinners: int) -> None:
    """Each (lane, database URL, phase names) on a gateway of its own, new on a new store."""
    for lane, database_url, names in runs:
        folder = Path(tempfile.mkdtemp(prefix="flowgate-bench-schedules-"))
        (folder / "workflows").mkdir()
        (folder / "connectors.yaml").write_text("connectors:\n" + "".join(
            f"  tick_{i}:\n    source: {{kind: python, ref: 'connectors.demo:numbers', args: {{n: 3}}}}\n"
            f"    schedule: {{interval: {INTERVAL}, catch_up: none}}\n" for i in range(SCHEDULED)) +
            "".join(f"  busy_{i}:\n    source: {{kind: python, ref: 'connectors.demo:numbers', "
                    f"args: {{n: 3, delay_seconds: 0.3}}}}\n" for i in range(8)))
        server = GunicornServer(folder, workers=2, FLOWGATE_EXECUTOR_THREADS="4", FLOWGATE_SCHEDULE_SLOTS=lane,
                                **({"DATABASE_URL": database_url} if database_url else {})).start()
        try:
            for name in names:
                phases[name] = _phase(server.url, "quiet" if name == "quiet" else "busy", seconds, name,
                                      spinners)
        finally:
            server.kill()


def fire_lag(seconds: float, spinners: int) -> None:
    """Quiet and at capacity with the schedule lane (FLOWGATE_SCHEDULE_SLOTS=1, the default), and at capacity
    without it (0: scheduled runs only claimed first), each gateway new on a new store."""
    phases: dict[str, tuple[list[float], list[float]]] = {}
    runs = [("0", None, ("at capacity, no lane",)), ("1", None, ("quiet", "at capacity"))]
    with ExitStack() as cleanup:
        if not postgres_available():
            runs.append(("1", cleanup.enter_context(fresh_schema("flowgate_bench")), ("at capacity, PostgreSQL",)))
        _phases(runs, phases, seconds, spinners)
    print(f"fire lag, {SCHEDULED} connectors every {INTERVAL} s, {seconds:.0f} s per phase (gunicorn, 2 workers x 4 "
          f"slots, SQLite unless named; {spinners} busy-looping processes at capacity)")
    print(f"{'phase':<22}{'slots':>7}{'lag p50':>10}{'lag p99':>10}{'free':>6}{'free p50':>10}{'free p99':>10}"
          f"{'triggers':>10}{'wait p50':>10}{'wait p99':>10}")
    for phase, (lag, wait) in phases.items():
        free = OWN[phase]
        print(f"{phase:<22}{len(lag):>7}{pct(lag, 50) * 1000:>8.0f}ms{pct(lag, 99) * 1000:>8.0f}ms"
              f"{len(free):>6}{pct(free, 50) * 1000:>8.0f}ms{pct(free, 99) * 1000:>8.0f}ms"
              f"{len(wait):>10}{pct(wait, 50) * 1000:>8.0f}ms{pct(wait, 99) * 1000:>8.0f}ms")
    for phase, parts in PARTS.items():  # where a free slot's lag goes
        fired, claimed, ran = ([p[i] for p in parts if p[i] == p[i]] for i in range(3))
        print(f"  {phase}: made (created - slot) p50 {pct(fired, 50) * 1000:.0f} ms p99 {pct(fired, 99) * 1000:.0f} ms; "
              f"claimed (started - created) p50 {pct(claimed, 50) * 1000:.0f} ms p99 {pct(claimed, 99) * 1000:.0f} ms; "
              f"the run itself p50 {pct(ran, 50) * 1000:.0f} ms")
    print("free: the slots whose previous run of the same schedule had ended by the slot (the others wait for it)")
    (quiet, _), (busy, busy_wait) = phases["quiet"], phases["at capacity"]
    no_lane, _ = phases["at capacity, no lane"]
    print(f"at capacity / quiet, fire lag p99: {pct(busy, 99) / pct(quiet, 99):.2f}x; at capacity, fire lag p99 / "
          f"a triggered run's wait p99: {pct(busy, 99) / pct(busy_wait, 99):.2f}x; lane / no lane, fire lag p99: "
          f"{pct(busy, 99) / pct(no_lane, 99):.2f}x")


def scheduler_cost(window: float, count: int = 1000) -> None:
    from app import create_app

    shares = {}
    for scheduled in (False, True):
        folder = Path(tempfile.mkdtemp(prefix="flowgate-bench-scheduler-"))
        (folder / "workflows").mkdir()
        schedule = "    schedule: {interval: 60}\n" if scheduled else ""
        (folder / "connectors.yaml").write_text("connectors:\n" + "".join(
            f"  c{i}:\n    source: {{kind: python, ref: 'connectors.demo:numbers', args: {{n: 3}}}}\n{schedule}"
            for i in range(count)))
        app = create_app({"var_dir": folder / "var", "connectors_file": folder / "connectors.yaml",
                          "workflows_dir": folder / "workflows", "executor_threads": 0})
        services = app.extensions["flowgate"]
        cpu, wall = time.process_time(), time.monotonic()
        for loop in services.loops:  # the loops a gateway process runs, the scheduler among them when scheduled
            loop.start()
        seconds = []  # CPU per wall second: the slot's burst apart from the passes between slots
        while time.monotonic() - wall < window:
            before = time.process_time()
            time.sleep(1)
            seconds.append(time.process_time() - before)
        used, elapsed = time.process_time() - cpu, time.monotonic() - wall
        for loop in services.loops:
            loop.stop(timeout=10)
        made = len(services.store.list(limit=count * 3))
        services.store.dispose()
        shares[scheduled] = used / elapsed
        burst = sorted(seconds)[-3:]  # the slot's second(s): 1,000 runs made
        between = sorted(seconds)[:-3]
        print(f"{count} connectors {'each scheduled every 60 s' if scheduled else 'unscheduled':<28}: "
              f"{used:.2f} s CPU in {elapsed:.0f} s = {used / elapsed:.2%} of a core ({made} runs made); "
              f"the busiest 3 s {sum(burst):.2f} s CPU, the other seconds {statistics.mean(between or [0.0]):.3%} of a core")
    print(f"the {count} schedules' own cost: {shares[True] - shares[False]:.2%} of a core "
          f"({shares[True] / max(shares[False], 1e-9):.1f}x the unscheduled gateway's background work)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40, help="length of each fire-lag phase")
    parser.add_argument("--window", type=float, default=65, help="seconds the 1,000 schedules are measured")
    parser.add_argument("--only", choices=("lag", "cost"), help="run one of the two parts")
    parser.add_argument("--spinners", type=int, default=multiprocessing.cpu_count(),
                        help="busy-looping processes beside the flood at capacity (default: one per core)")
    args = parser.parse_args()
    if args.only != "cost":
        fire_lag(args.seconds, args.spinners)
    if args.only != "lag":
        scheduler_cost(args.window)


if __name__ == "__main__":
    main()
