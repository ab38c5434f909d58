"""Small real HTTP servers on loopback for the workflow tests: a JSON echo/redirect service and an OpenAI-style API."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (a node's timeout) resets the connection: expected here, not news


class _Server:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"method": self.command, "path": url.path, "query": query,
                                        "headers": headers, "body": body})
                status, payload, extra = server.handle(self.command, url.path, query, headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **extra}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler


class EchoService(_Server):
    """/items/<id> answers JSON; /redirect?to=URL redirects; /flaky fails `failures` times with 500; /sleep?s= waits;
    /big?n= answers a JSON string of n characters; /gate answers once the test sets `gate` (a node held running for
    as long as the test needs, not for a guessed time)."""

    def __init__(self) -> None:
        self.failures = 0
        self.gate = threading.Event()
        super().__init__()

    def handle(self, method, path, query, headers, body):
        if path.startswith("/items/"):
            return 200, {"id": int(path.rsplit("/", 1)[1]), "name": f"item {path.rsplit('/', 1)[1]}",
                         "query": query, "echo": body}, {}
        if path == "/redirect":
            return 302, {}, {"Location": query["to"]}
        if path == "/flaky":
            if self.failures > 0:
                self.failures -= 1
                return 500, {"error": "try again"}, {}
            return 200, {"ok": True}, {}
        if path == "/gate":
            return (200, {"opened": True}, {}) if self.gate.wait(600) else (504, {"error": "never opened"}, {})
        if path == "/big":
            return 200, "x" * int(query.get("n", "0")), {}
        if path == "/sleep":
            time.sleep(float(query.get("s", "0")))
            return 200, {"slept": float(query.get("s", "0"))}, {}
        return 404, {"error": "no such path"}, {}


class FakeOpenAI(_Server):
    """POST /v1/chat/completions like OpenAI: needs the bearer key, echoes the prompt; `fail_next` answers 429s."""

    def __init__(self, api_key: str = "sk-test", latency: float = 0.0) -> None:
        self.api_key = api_key
        self.latency = latency
        self.fail_next = 0
        super().__init__()

    def handle(self, method, path, query, headers, body):
        if path != "/v1/chat/completions" or method != "POST":
            return 404, {"error": {"message": "not found"}}, {}
        if headers.get("authorization") != f"Bearer {self.api_key}":  # echoed, as some upstreams do
            presented = headers.get("authorization", "")
            return 401, {"error": {"message": f"bad key: {presented}", "got": presented.removeprefix("Bearer ")}}, {}
        if self.fail_next > 0:
            self.fail_next -= 1
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        time.sleep(self.latency)
        prompt = body["messages"][-1]["content"]
        return 200, {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {prompt}"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 3, "total_tokens": 9}}, {}


class CallbackReceiver(_Server):
    """Receives run callbacks at /hook: answers 500 `failures` times, then 204; keeps raw bodies and headers."""

    def __init__(self) -> None:
        self.failures = 0
        self.drip_seconds = 0.0  # > 0: the answer's header lines come one every drip_seconds until `release`
        self.release = threading.Event()  # is set (a slow receiver that keeps inside the sender's read timeout)
        self.raw: list[tuple[dict[str, str], bytes]] = []
        super().__init__()

    def _handler(self):
        handler = super()._handler()
        server = self

        class Raw(handler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                server.raw.append(({k.lower(): v for k, v in self.headers.items()}, raw))
                status = 500 if server.failures > 0 else 204
                server.failures = max(server.failures - 1, 0)
                self.send_response(status)
                self.flush_headers()
                line = 0
                while server.drip_seconds and not server.release.wait(server.drip_seconds):
                    self.wfile.write(f"X-Slow-{line}: 1\r\n".encode())
                    self.wfile.flush()
                    line += 1
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Raw


class SlowProxy:
    """A reverse proxy on loopback in front of a real server (Prefect) that answers requests whose path contains
    `slow_path` only `delay` seconds after the server did: the server acted, its answer is late."""

    def __init__(self, target: str, slow_path: str = "", delay: float = 0.0, fail_path: str | None = None):
        import httpx

        self.target = target.rstrip("/")
        self.slow_path = slow_path
        self.delay = delay
        self.fail_path = fail_path  # requests whose path contains it get a 503 and never reach the server
        self.slowed = 0
        forward = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                if proxy.fail_path and proxy.fail_path in self.path:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = forward.request(self.command, proxy.target + self.path, content=body, headers=headers)
                if proxy.slow_path and proxy.slow_path in self.path:
                    proxy.slowed += 1
                    time.sleep(proxy.delay)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                try:
                    self.wfile.write(answer.content)
                except OSError:
                    pass  # the client gave up waiting: that is the point

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Blackhole:
    """A TCP proxy to PostgreSQL that, once `hold` is set, neither forwards nor refuses: bytes wait."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.hold = threading.Event()
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.hold.is_set():
                    time.sleep(0.05)
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listen.close()


class LinkedPages(_Server):
    """A paginated API: each path answers one row `{"id", "served_by"}` and, while `next_url` is set, a
    `Link: <next_url>; rel="next"` header (or, with `redirect`, a 302 to it), as an upstream pointing elsewhere
    would. Records every request with its headers and query."""

    def __init__(self, next_url: str | None = None, redirect: bool = False) -> None:
        self.next_url = next_url
        self.redirect = redirect
        super().__init__()

    def handle(self, method, path, query, headers, body):
        if self.next_url and self.redirect:
            return 302, {}, {"Location": self.next_url}
        link = {"Link": f'<{self.next_url}>; rel="next"'} if self.next_url else {}
        return 200, [{"id": len(self.requests), "served_by": self.url}], link
