"""`make stack`: a Prefect server, the connector deployments, a process worker and the gateway, on one machine.

Ctrl-C (or SIGTERM) stops all of them. Everything keeps its state under var/ (Prefect's SQLite in
var/prefect). The Prefect UI is at http://127.0.0.1:$PREFECT_PORT (4200 by default).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait_for(url: str, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer at {url} within {timeout:.0f} s")


def main() -> None:
    port = os.environ.get("PREFECT_PORT", "4200")
    pool = os.environ.get("FLOWGATE_PREFECT_POOL", "flowgate")
    var = (ROOT / os.environ.get("FLOWGATE_VAR_DIR", "var")).resolve()
    env = {**os.environ, "PREFECT_HOME": str(var / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FLOWGATE_VAR_DIR": str(var)}
    (var / "prefect").mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        process = subprocess.Popen(list(args), cwd=ROOT, env=env, start_new_session=True)
        processes.append(process)
        return process

    def stop(*_: object) -> None:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        start(str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port)
        _wait_for(f"http://127.0.0.1:{port}/api/health", "the Prefect server")
        subprocess.run([sys.executable, "-m", "flows.prefect.deploy", "--pool", pool], cwd=ROOT, env=env, check=True)
        start(str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process")
        start(str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app")
        print(f"\nflowgate: http://127.0.0.1:{os.environ.get('FLOW_SERVER_PORT', '5000')}   "
              f"Prefect UI: http://127.0.0.1:{port}   Ctrl-C stops everything\n", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(1)
        print("a component exited; stopping the stack", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    stop()


if __name__ == "__main__":
    main()
