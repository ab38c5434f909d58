"""Issue 31 on a real gunicorn with the repo's gunicorn.conf.py: /health is answered by the worker's event loop
(app/gunicorn_worker.py), so a liveness probe is answered while every request thread is busy, with the bytes Flask
sends, and is still logged and counted."""
from __future__ import annotations

import json
import re
import select
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=20)

PROBE_TIMEOUT = 10.0  # a liveness bound for each answer, not a benchmark
_DATE = re.compile(rb"\r\nDate: [^\r]*(?=\r\n)")  # gunicorn's and werkzeug's: Flask's answers carry both


def connect(server: GunicornServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PROBE_TIMEOUT)


def answer(sock: socket.socket, head_only: bool = False, buffered: bytearray | None = None) -> bytes:
    """One whole HTTP/1.1 answer read from `sock` (`buffered`: bytes already read past the previous answer)."""
    data = buffered if buffered is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {bytes(data)!r}"
        data += chunk
    head, _, _ = bytes(data).partition(b"\r\n\r\n")
    length = 0 if head_only else int(re.search(rb"\r\nContent-Length: (\d+)", head, re.I).group(1))
    end = len(head) + 4 + length
    while len(data) < end:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {bytes(data)!r}"
        data += chunk
    whole = bytes(data[:end])
    del data[:end]
    return whole


def ask(server: GunicornServer, request: bytes, head_only: bool = False) -> bytes:
    with connect(server) as sock:
        sock.sendall(request)
        return answer(sock, head_only)


def without_date(response: bytes) -> bytes:
    assert _DATE.search(response), response
    return _DATE.sub(b"\r\nDate: -", response)


def header(response: bytes, name: str) -> str:
    return re.search(rb"\r\n" + name.encode() + rb": ([^\r]*)\r\n", response, re.I).group(1).decode()


def closed_by_server(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def test_health_is_answered_while_the_only_request_thread_is_held_with_the_bytes_flask_sends(workdir: Path):
    # One worker with one request thread; a rate limit, so its hooks run too (/health is exempt from it).
    server = GunicornServer(workdir, workers=1, GUNICORN_THREADS="1", FLOWGATE_RATE_LIMIT="1000/minute").start()
    try:
        get = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: probe-1\r\n\r\n"
        head = b"HEAD /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: probe-1\r\n\r\n"
        # Flask answers these: a HEAD first, then the worker's first GET /health (whose answer the loop keeps)
        flask_head = ask(server, head, head_only=True)
        flask_get = ask(server, get)
        assert flask_get.startswith(b"HTTP/1.1 200 OK\r\n") and b'"status":"healthy"' in flask_get
        # The only request thread is held: a trigger whose body comes slowly (it waits in the body's read).
        holder = connect(server)
        holder.sendall(b"POST /trigger HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 40\r\n\r\n{\"connector_id\": ")
        queued = connect(server)  # a request for Flask now waits for the thread
        queued.sendall(b"GET /api/v1/connectors HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert select.select([queued], [], [], 1.0)[0] == [], "the request thread was not held"

        loop_get = ask(server, get)
        loop_head = ask(server, head, head_only=True)
        assert without_date(loop_get) == without_date(flask_get)
        assert without_date(loop_head) == without_date(flask_head)
        made = header(ask(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"), "X-Request-ID")
        assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", made)  # a uuid4's hex, as Flask makes
        hostile = ask(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: " + b"x" * 500 + b"\r\n\r\n")
        assert re.fullmatch(r"[0-9a-f]{32}", header(hostile, "X-Request-ID"))
        assert header(ask(server, b"GET /health HTTP/1.0\r\n\r\n"), "Connection") == "close"

        # Kept alive, pipelined: two in one write, then a third on the same connection, then one that closes it
        with connect(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: pipe-1\r\n\r\n"
                         b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: pipe-2\r\n\r\n")
            buffered = bytearray()
            first, second = answer(sock, buffered=buffered), answer(sock, buffered=buffered)
            sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: pipe-3\r\n\r\n")
            third = answer(sock, head_only=True, buffered=buffered)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            last = answer(sock, buffered=buffered)
            assert not buffered and closed_by_server(sock)
        assert [header(a, "X-Request-ID") for a in (first, second, third)] == ["pipe-1", "pipe-2", "pipe-3"]
        assert all(header(a, "Connection") == "keep-alive" for a in (first, second, third))
        assert header(last, "Connection") == "close"

        # /health then a request for Flask, pipelined: /health now, the other once the thread is free
        mixed = connect(server)
        mixed.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health?via=flask HTTP/1.1\r\nHost: localhost\r\n"
                      b"X-Request-ID: after-1\r\n\r\n")
        buffered = bytearray()
        assert answer(mixed, buffered=buffered).startswith(b"HTTP/1.1 200 ")
        assert select.select([mixed], [], [], 0.5)[0] == [] and not buffered  # the second waits for the thread

        holder.sendall(b'"nope"}' + b" " * 16)  # the trigger's body completes: an unknown connector, 4xx
        assert answer(holder).startswith(b"HTTP/1.1 4")
        assert answer(queued).startswith(b"HTTP/1.1 200 ")
        behind = answer(mixed, buffered=buffered)
        assert behind.startswith(b"HTTP/1.1 200 ") and header(behind, "X-Request-ID") == "after-1"
        for sock in (holder, queued, mixed):
            sock.close()

        # Each /health is in the access log and in the request latency metric, as Flask's are
        logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        ids = {line.get("request_id") for line in logged if line.get("message") == "request"
               and line.get("path") == "/health"}
        assert {"probe-1", "pipe-1", "pipe-2", "pipe-3", made} <= ids
        metrics = httpx.get(f"{server.url}/metrics", timeout=PROBE_TIMEOUT).text
        counts = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'flowgate_http_request_duration_seconds_count\{endpoint="/health",method="(\w+)",status="200"\} (\S+)',
            metrics)}
        assert counts == {"GET": 10, "HEAD": 3}
    finally:
        server.kill()



def test_a_worker_whose_threads_all_hang_past_the_timeout_leaves_health_to_flask(workdir: Path):
    """The event loop answers /health whatever its threads do; a worker whose every request thread has been stuck
    for GUNICORN_TIMEOUT seconds serves nothing, so its liveness probe must fail as it did before: /health then
    queues for a thread like any request."""
    server = GunicornServer(workdir, workers=1, GUNICORN_THREADS="1", GUNICORN_TIMEOUT="8").start()
    get = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    probes: list[socket.socket] = []

    def probe_unanswered() -> bool:
        sock = connect(server)
        sock.sendall(get)
        probes.append(sock)
        return select.select([sock], [], [], 1.0)[0] == []

    try:
        assert ask(server, get).startswith(b"HTTP/1.1 200 ")  # Flask's, kept
        holder = connect(server)
        holder.sendall(b"POST /trigger HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 40\r\n\r\n{\"connector_id\": ")
        assert not probe_unanswered()  # the event loop's, the thread held for less than the timeout
        wait_until(probe_unanswered, timeout=60, what="/health left to the stuck thread", every=1.0)
        holder.sendall(b'"nope"}' + b" " * 16)
        assert answer(holder).startswith(b"HTTP/1.1 4")
        assert all(answer(sock).startswith(b"HTTP/1.1 200 ") for sock in probes)  # the queued ones, by Flask
        assert ask(server, get).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in probes:
            sock.close()
        server.kill()
