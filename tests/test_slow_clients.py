"""Issue 26, H2 on a real gunicorn with the repo's gunicorn.conf.py: clients that send their request head a byte at a
time hold no request thread (/health keeps answering), and the server closes them at the header deadline."""
from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer
from tests.support.nginx_proxy import NGINX, repo_nginx
from tests.support.waiting import wait_until
from tests.support.workdir import fill_workdir

pytestmark = pytest.mark.long(seconds=30)  # started first in the parallel run (conftest.py)

SLOW_CLIENTS = 100
HEAD = b"GET /health HTTP/1.1\r\nHost: flowgate\r\nX-Slow: " + b"a" * 1000  # never finished within the test
PROBE_TIMEOUT = 5.0  # a liveness bound for each /health probe, not a benchmark


class SlowClient:
    """One connection sending a request head a byte at a time; notes what the server answers and when it closes."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sent = 0
        self.answer = b""
        self.closed = False

    def drip(self) -> None:
        if self.closed:
            return
        try:
            self.sock.send(HEAD[self.sent:self.sent + 1])
            self.sent += 1
        except OSError:  # the server closed the connection
            self.closed = True

    def read(self) -> bool:
        """Whether the server has closed the connection (what it sent before is kept in `answer`)."""
        while not self.closed and select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            self.answer += data
            self.closed = not data
        return self.closed


def hold_slow_clients(port: int, health_url: str) -> tuple[list[tuple[object, bool]], list[SlowClient]]:
    """Open SLOW_CLIENTS connections to `port` that send a head a byte every two seconds; probe `health_url` for 5 s
    meanwhile, then wait for the server to close every slow connection. Returns the probes (status or error, every
    slow client still open when answered) and the clients."""
    clients = [SlowClient(port) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def drip_every_two_seconds() -> None:
        while not stop.is_set():
            for client in clients:
                client.drip()
            stop.wait(2.0)

    dripper = threading.Thread(target=drip_every_two_seconds, daemon=True)
    dripper.start()
    probes: list[tuple[object, bool]] = []
    try:
        began = time.monotonic()
        while time.monotonic() < began + 5:
            try:
                status: object = httpx.get(health_url, timeout=PROBE_TIMEOUT).status_code
            except httpx.HTTPError as exc:
                status = repr(exc)
            probes.append((status, not any(client.read() for client in clients)))
            time.sleep(0.2)
        wait_until(lambda: all(client.read() for client in clients), timeout=30,
                   what="the server closing every slow client")
    finally:
        stop.set()
        dripper.join(5)
        for client in clients:
            client.sock.close()
    return probes, clients


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[GunicornServer]:
    """Two workers of 8 threads with the repo's header deadline (GUNICORN_HEADER_TIMEOUT: 10 s), shared by the
    tests that neither stop nor reconfigure it: without a header deadline, 16 slow clients were enough to queue
    /health."""
    server = GunicornServer(fill_workdir(tmp_path_factory.mktemp("slow-clients")), workers=2,
                            GUNICORN_THREADS="8").start()
    yield server
    server.kill()


def test_health_answers_while_100_clients_send_their_headers_a_byte_every_two_seconds(server: GunicornServer):
    probes, clients = hold_slow_clients(server.port, f"{server.url}/health")
    assert [status for status, _ in probes if status != 200] == []
    assert sum(held for _, held in probes) >= 5, "the probes did not run while the slow clients were held"
    assert all(client.answer.startswith(b"HTTP/1.1 408 ") for client in clients)
    assert all(client.sent < len(HEAD) for client in clients)  # closed by the server, mid-head


def test_a_head_sent_in_pieces_within_the_deadline_is_served_and_kept_alive(server: GunicornServer):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        time.sleep(0.5)
        sock.sendall(b"st: x\r\n\r\nPOST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2:
            data = sock.recv(4096)
            assert data, f"closed after {answers!r}"
            answers += data
    assert answers.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 405 " in answers  # both requests answered


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_the_repo_nginx_config_slow_clients_never_reach_the_gateway(workdir: Path):
    # One worker of two threads, with a header deadline of an hour: only nginx stands between them and the clients.
    server = GunicornServer(workdir, workers=1, GUNICORN_THREADS="2", GUNICORN_HEADER_TIMEOUT="3600").start()
    try:
        with repo_nginx(workdir, server.port) as url:
            probes, clients = hold_slow_clients(int(url.rsplit(":", 1)[1]), f"{url}/health")
    finally:
        server.kill()
    assert [status for status, _ in probes if status != 200] == []
    assert sum(held for _, held in probes) >= 5, "the probes did not run while the slow clients were held"
    assert all(client.sent < len(HEAD) for client in clients)  # closed by nginx (client_header_timeout), mid-head
