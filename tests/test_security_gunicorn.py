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

from tests.gunicorn_server import ROOT, GunicornServer, free_port

SLEEPY = """
  sleepy:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1, delay_seconds: 120}}
    dataset: raw
"""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


def test_health_p99_stays_under_50ms_with_50_waiting_callers(workdir: Path):
    # A connector whose runs queue behind one that takes two minutes: every `Prefer: wait=30` could wait 30 s.
    (workdir / "connectors.yaml").write_text((workdir / "connectors.yaml").read_text() + SLEEPY)
    server = GunicornServer(workdir, workers=2, GUNICORN_THREADS="8", FLOWGATE_MAX_CONCURRENT_WAITS="4",
                            FLOWGATE_MAX_QUEUED_PER_TARGET="100000", FLOWGATE_EXECUTOR_THREADS="1").start()
    stop = threading.Event()
    answers: list[tuple[int, str | None, float]] = []

    def waiting_caller() -> None:
        with httpx.Client(base_url=server.url, timeout=90) as client:
            while not stop.is_set():
                started = time.perf_counter()
                response = client.post("/trigger", json={"connector_id": "sleepy"}, headers={"Prefer": "wait=30"})
                answers.append((response.status_code, response.headers.get("Preference-Applied"),
                                time.perf_counter() - started))
                if "Preference-Applied" not in response.headers:
                    stop.wait(2.0)  # answered at once: a polite client asks again a little later

    # Four kept-alive connections, used in turn: they land on both workers, and what is timed is the server.
    probes = [httpx.Client(base_url=server.url, timeout=10) for _ in range(4)]
    turn = iter(range(10**9))

    def health() -> float:
        client = probes[next(turn) % len(probes)]
        started = time.perf_counter()
        try:
            ok = client.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        return (time.perf_counter() - started) if ok else 10.0

    try:
        for _ in range(50):  # warm-up: imports, first connections
            health()
        callers = [threading.Thread(target=waiting_caller, daemon=True) for _ in range(50)]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 30
        while sum(1 for _, applied, _ in answers if applied is None) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)  # every caller has been answered once: the waiting slots are taken
        latencies = []
        for _ in range(400):
            latencies.append(health())
            if latencies.count(10.0) >= 3:
                break  # /health is starved: no need to wait out 400 timeouts
            time.sleep(0.02)
        stop.set()
        for caller in callers:
            caller.join(60)
    finally:
        stop.set()
        for probe in probes:
            probe.close()
        server.kill()
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(f"\n/health with 50 waiting callers: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"{len(answers)} triggers answered, {sum(1 for a in answers if a[1])} waited")
    assert p99 < 0.050, f"/health p99 {p99 * 1000:.1f} ms (p50 {p50 * 1000:.1f} ms)"
    assert any(applied == "wait=30" for _, applied, _ in answers)  # up to the cap, callers do wait
    assert all(status == 202 for status, _, _ in answers)
    assert any(applied is None and seconds < 5 for _, applied, seconds in answers)  # past it: 202 at once


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
