"""Keep-alive under a real gunicorn: pooled clients keep their connections past the old 5 s, and idle ones cost no
thread."""
from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import ROOT, GunicornServer

pytestmark = pytest.mark.long(seconds=60)

# The client's port in gunicorn's access log tells requests that shared one connection apart.
PORT_LOG = {"FLOWGATE_LOG_FORMAT": "text",
            "GUNICORN_CMD_ARGS": "--access-logformat 'remote_port=%({remote_port}e)s %(m)s %(U)s %(s)s'"}

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
    assert "FLOWGATE_KEEPALIVE_SECONDS: Input should be a valid integer" in resolved.stderr, resolved.stderr[-2000:]


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


@pytest.fixture(scope="module")
def jdk_triggers(tmp_path_factory) -> list[str]:
    """The command that runs tests/support/KeepAliveTriggers.java, compiled here with javac."""
    if not (shutil.which("javac") and shutil.which("java")):
        pytest.skip("javac/java not found: the JDK HttpClient keep-alive test needs a JDK 11 or later")
    classes = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests" / "support" / "KeepAliveTriggers.java")], check=True,
                   timeout=120)
    return ["java", "-cp", str(classes), "KeepAliveTriggers"]


def post_triggers(command: list[str], server: GunicornServer, clients: int, posts: int,
                  gaps_ms: str) -> tuple[Counter, int]:
    """Run the JDK clients against the server: how each POST ended (`status=202`, `error=...`), and how many
    connections the answered ones came on."""
    done = subprocess.run([*command, server.url, "numbers", str(clients), str(posts), gaps_ms],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcomes = Counter(line.split(" ", 2)[2] for line in done.stdout.splitlines())
    assert sum(outcomes.values()) == clients * posts, done.stdout
    connections = set(re.findall(r"remote_port=(\d+) POST /trigger", server.log()))
    return outcomes, len(connections)


def gateway(workdir: Path, **env: str) -> GunicornServer:
    """Two workers that only accept triggers (runs queue; no pipelines compete for the CPU), ports logged."""
    return GunicornServer(workdir, workers=2, ready_path="/health", FLOWGATE_EXECUTOR_THREADS="0",
                          FLOWGATE_MAX_QUEUED_PER_TARGET="1000", **PORT_LOG, **env).start()


def test_pooled_jdk_clients_posting_every_five_seconds_lose_no_post_and_keep_their_connection(workdir, jdk_triggers):
    """12 JDK HttpClients (HTTP/1.1, one pooled connection each) POST a trigger 6 times, 4.9 and 5.1 s apart
    after each answer: 72 POSTs, 60 of them on a connection idle right at the old keep-alive (5 s), where
    gunicorn used to close it as the client reused it (with keepalive 5, 3 of 96 and 4 of 72 POSTs at these gaps
    failed here: "HTTP/1.1 header parser received no bytes"). Sixty POSTs from one client would take 5
    minutes; twelve clients in parallel make the same 60 reuses in about 25 s. A failure is a race, so a clean
    run alone proves little: each client keeping one connection (one client port in the access log) shows
    every POST after a gap went on a connection the server had kept, where no race can happen."""
    server = gateway(workdir)
    try:
        outcomes, connections = post_triggers(jdk_triggers, server, clients=12, posts=6, gaps_ms="4900,5100")
    finally:
        server.kill()
    assert outcomes == {"status=202": 72}, outcomes
    assert connections == 12


def test_at_the_old_keep_alive_the_jdk_clients_need_a_new_connection_after_each_gap(workdir, jdk_triggers):
    """The control: with FLOWGATE_KEEPALIVE_SECONDS=5 the server closes before an 8 s gap ends, so each POST
    comes on a new connection; the count above would catch the old setting."""
    server = gateway(workdir, FLOWGATE_KEEPALIVE_SECONDS="5")
    try:
        outcomes, connections = post_triggers(jdk_triggers, server, clients=2, posts=2, gaps_ms="8000")
    finally:
        server.kill()
    assert outcomes == {"status=202": 4}, outcomes
    assert connections == 4
