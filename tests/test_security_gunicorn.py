"""Issue 16 on a real gunicorn: waiting callers never starve /health (item 5), one slot class never starves the
other (item 6), and the loopback guard checks the addresses gunicorn actually binds (item 7)."""
from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import ROOT, GunicornServer, free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=45)  # started first in the parallel run (conftest.py)

SLEEPY = """
  sleepy:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1, delay_seconds: 120}}
    dataset: raw
"""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


def waits_in_flight(at: float, waits: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(began, ended) for began, ended in waits if began < at < ended]


def answered_while_waits_held(began: float, ended: float, waits: list[tuple[float, float]]) -> bool:
    """A request asked while waits held their threads, and answered before any of them ended: it did not queue
    for a thread a wait gave back (a starved one is answered only once a wait ends)."""
    held = waits_in_flight(began, waits)
    return bool(held) and all(wait_ended > ended for _, wait_ended in held)


def test_health_is_answered_while_50_waiting_callers_hold_their_waits(workdir: Path):
    # A connector whose runs queue behind one that takes two minutes: every `Prefer: wait=30` waits 30 s.
    (workdir / "connectors.yaml").write_text((workdir / "connectors.yaml").read_text() + SLEEPY)
    server = GunicornServer(workdir, workers=2, GUNICORN_THREADS="8", FLOWGATE_MAX_CONCURRENT_WAITS="4",
                            FLOWGATE_MAX_QUEUED_PER_TARGET="100000", FLOWGATE_EXECUTOR_THREADS="1").start()
    stop = threading.Event()
    answers: list[tuple[int, str | None, float, float]] = []  # status, Preference-Applied, asked, answered

    def waiting_caller() -> None:
        with httpx.Client(base_url=server.url, timeout=90) as client:
            while not stop.is_set():
                asked = time.monotonic()
                response = client.post("/trigger", json={"connector_id": "sleepy"}, headers={"Prefer": "wait=30"})
                answers.append((response.status_code, response.headers.get("Preference-Applied"), asked,
                                time.monotonic()))
                if "Preference-Applied" not in response.headers:
                    stop.wait(2.0)  # answered at once: a polite client asks again a little later

    # Four kept-alive connections, used in turn: they land on both workers.
    probes = [httpx.Client(base_url=server.url, timeout=60) for _ in range(4)]
    turn = iter(range(10**9))

    def health() -> tuple[bool, float, float]:
        client = probes[next(turn) % len(probes)]
        asked = time.monotonic()
        try:
            ok = client.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        return ok, asked, time.monotonic()

    try:
        for _ in range(50):  # warm-up: imports, first connections
            health()
        callers = [threading.Thread(target=waiting_caller, daemon=True) for _ in range(50)]
        callers_started = time.monotonic()
        for caller in callers:
            caller.start()
        # Every caller has been answered once (the waiting slots are taken, the rest turned away): 8 are waiting.
        wait_until(lambda: sum(1 for _, applied, _, _ in answers if applied is None) >= 50, what="the slots taken")
        # Probes inside the first waits only: none of those ends before 30 s after the callers started (the runs
        # they wait for take two minutes), so a probe asked by then and answered after a wait ended was starved.
        # Later, waits end and begin again, and a probe asked as one ends could not tell starved from unlucky.
        probed = []
        while len(probed) < 200 and time.monotonic() < callers_started + 25:
            probed.append(health())
            if not probed[-1][0]:
                break
            time.sleep(0.02)
        stop.set()
        for caller in callers:
            caller.join(60)  # every wait ends (30 s at most): the record of which waits were in flight is whole
    finally:
        stop.set()
        for probe in probes:
            probe.close()
        server.kill()
    latencies = [ended - asked for _, asked, ended in probed]
    waits = [(asked, answered) for _, applied, asked, answered in answers if applied == "wait=30"]
    print(f"\n/health with 50 waiting callers: p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, {len(answers)} triggers answered, {len(waits)} waited")
    assert len(probed) >= 20, f"only {len(probed)} probes while the first waits were held"
    assert all(ok for ok, _, _ in probed), "a /health probe failed"
    assert all(answered_while_waits_held(asked, ended, waits) for _, asked, ended in probed), \
        "a /health probe waited for a waiting caller's thread"
    assert max(len(waits_in_flight(asked, waits)) for _, asked, _ in probed) >= 4  # a worker's slots were full
    assert all(status == 202 for status, _, _, _ in answers)
    assert any(applied is None and answered_while_waits_held(asked, answered, waits)
               for _, applied, asked, answered in answers)  # past the cap: 202 at once, not after a wait


def run_gunicorn_briefly(workdir: Path, until: str | None = None, seconds: float = 60,
                         **env: str) -> tuple[int | None, str]:
    """Start gunicorn with `env`; (exit code, output) once it exits, or (None, output) once its output shows
    `until` (then it is killed). Fails when neither happens within `seconds`."""
    server = GunicornServer(workdir, workers=1, **env)
    log = server.log_path.open("ab")
    server.process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                      cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                return code, server.log()
            if until is not None and until in server.log():
                return None, server.log()
            time.sleep(0.1)
        raise AssertionError(f"gunicorn neither exited nor logged {until!r} in {seconds} s:\n{server.log()[-2000:]}")
    finally:
        server.kill()


@pytest.mark.parametrize("bind", ["0.0.0.0", "[::]"])
def test_without_keys_an_exposed_bind_from_gunicorn_cmd_args_refuses_to_start(workdir: Path, bind: str):
    port = free_port()
    code, output = run_gunicorn_briefly(workdir, FLOWGATE_HOST="0.0.0.0", GUNICORN_CMD_ARGS=f"--bind {bind}:{port}")
    assert code == 1, output[-2000:]
    assert "refusing to start" in output and f"{bind.strip('[]')}" in output
    assert "serving on 127.0.0.1" not in output and "Booting worker" not in output


def test_without_keys_a_loopback_bind_from_gunicorn_cmd_args_starts_and_names_it(workdir: Path):
    port = free_port()
    code, output = run_gunicorn_briefly(workdir, until=f"anyone who reaches 127.0.0.1:{port} can trigger runs",
                                        GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}")
    assert code is None, output[-2000:]  # serving, and saying where


def test_with_keys_an_exposed_bind_starts(workdir: Path):
    port = free_port()
    code, output = run_gunicorn_briefly(workdir, until=f"listening on 0.0.0.0:{port}",
                                        GUNICORN_CMD_ARGS=f"--bind 0.0.0.0:{port}",
                                        FLOWGATE_API_KEYS="ops:ops-key-0123456789abcdef:admin")
    assert code is None, output[-2000:]
