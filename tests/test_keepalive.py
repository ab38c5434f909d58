"""Keep-alive under a real gunicorn: pooled clients keep their connections past the old 5 s, and idle ones cost no
thread."""
from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gunicorn_server import ROOT, GunicornServer

pytestmark = pytest.mark.long(seconds=10)

READ_KEEPALIVE = """
import sys
from gunicorn.app.wsgiapp import WSGIApplication
sys.argv = ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
print(WSGIApplication("%(prog)s").cfg.keepalive)
"""


def keepalive_setting(workdir: Path, **env: str) -> subprocess.CompletedProcess:
    """gunicorn's resolved `keepalive` for gunicorn.conf.py under this environment (the app is not loaded)."""
    base = {k: v for k, v in GunicornServer(workdir).env.items()
            if k not in ("FLOWGATE_KEEPALIVE_SECONDS", "GUNICORN_CMD_ARGS")}
    return subprocess.run([sys.executable, "-c", READ_KEEPALIVE], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, seconds", [
    ({}, 75),
    ({"FLOWGATE_KEEPALIVE_SECONDS": "90"}, 90),
    ({"FLOWGATE_KEEPALIVE_SECONDS": "90", "GUNICORN_CMD_ARGS": "--keep-alive 30"}, 30),
])
def test_the_keep_alive_is_75_seconds_unless_the_environment_or_gunicorn_cmd_args_say_otherwise(workdir, env,
                                                                                                 seconds):
    resolved = keepalive_setting(workdir, **env)
    assert resolved.returncode == 0, resolved.stderr
    assert int(resolved.stdout) == seconds


def test_a_keep_alive_that_is_not_whole_seconds_stops_the_start_naming_the_variable(workdir):
    resolved = keepalive_setting(workdir, FLOWGATE_KEEPALIVE_SECONDS="5s")
    assert resolved.returncode != 0
    assert "FLOWGATE_KEEPALIVE_SECONDS='5s' is not a whole number of seconds" in resolved.stderr


def test_fifty_idle_keep_alive_connections_hold_no_thread_and_health_still_answers(workdir):
    """One worker with 8 threads: were an idle connection to hold a thread, the ninth would already wait."""
    server = GunicornServer(workdir, workers=1, ready_path="/health", GUNICORN_THREADS="8").start()
    idle = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(50)]
    try:
        for connection in idle:
            connection.request("GET", "/health")
            assert connection.getresponse().read() and connection.sock is not None  # kept open
        ports = [connection.sock.getsockname()[1] for connection in idle]
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # a new connection is served
        for connection in idle:
            connection.request("GET", "/health")
            assert connection.getresponse().status == 200
        assert [connection.sock.getsockname()[1] for connection in idle] == ports  # each answered on its own
    finally:
        for connection in idle:
            connection.close()
        server.kill()
