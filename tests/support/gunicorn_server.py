"""A real gunicorn serving flowgate on a free loopback port, for the tests that need processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.runs.store import RunStore

ROOT = Path(__file__).resolve().parents[2]


def run_store(workdir: Path) -> RunStore:
    """The run store of a GunicornServer run in `workdir`: its SQLite file under var/, as the gateway defaults."""
    return RunStore(f"sqlite:///{(workdir / 'var' / 'flowgate.db').resolve()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GunicornServer:
    """`gunicorn -c gunicorn.conf.py wsgi:app` with the test's settings; stop() or kill() ends it."""

    def __init__(self, workdir: Path, workers: int = 3, ready_headers: dict[str, str] | None = None,
                 ready_path: str = "/api/v1/health/ready", root: Path = ROOT, **env: str):
        self.root = root  # the checkout whose code it serves (a benchmark may compare another one)
        self.port = free_port()
        self.ready_headers = ready_headers or {}  # e.g. an API key, when the gateway has keys
        self.ready_path = ready_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gunicorn-{self.port}.log"
        self.env = {**os.environ, "FLOWGATE_BIND": f"127.0.0.1:{self.port}", "WEB_CONCURRENCY": str(workers),
                    "FLOWGATE_VAR_DIR": str(workdir / "var"), "FLOWGATE_CONNECTORS": str(workdir / "connectors.yaml"),
                    "FLOWGATE_WORKFLOWS": str(workdir / "workflows"),
                    "PYTHONUNBUFFERED": "1", **env}  # the executors poll at the default interval (0.5 s)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> GunicornServer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", headers=self.ready_headers, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"gunicorn did not become ready in {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children but the forkserver and the resource tracker it starts for
        their runs (connectors/shared_forkserver.py)."""
        pid = self.process.pid if self.process else None
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        workers = []
        for child in children:
            try:
                if b"multiprocessing." not in Path(f"/proc/{child}/cmdline").read_bytes():
                    workers.append(int(child))
            except OSError:
                continue
        return workers

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the master (graceful shutdown); returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
