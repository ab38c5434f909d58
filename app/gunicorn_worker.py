"""gunicorn's gthread worker with a deadline on each request's head (request line and headers).

gunicorn 27 has no header timeout. Its gthread worker gives a connection a thread as soon as the first byte arrives,
and the thread reads the head with blocking recv() calls and no timeout: a client that sends a header line every
few seconds holds a thread for ever, before any key is checked (50 such connections took /health down: security
review 2026-12, H2). A socket timeout would bound each recv(), not the whole head, and would still cost a thread per
slow client, so 100 of them would queue every other request behind them.

Here the worker's event loop gathers the head itself, a few bytes at a time and without a thread, and hands the
connection to a thread only once the head is complete (or malformed, for gunicorn to refuse). A connection whose
head is not complete within `header_timeout` seconds (GUNICORN_HEADER_TIMEOUT in gunicorn.conf.py) is answered 408
and closed. Bodies are read by the thread as before: bounding slow bodies is the reverse proxy's job
(docs/operations.md, Security).
TLS, HTTP/2 prior knowledge, the PROXY protocol and uwsgi are left to gunicorn as they are.

`/health` is answered in the event loop itself, without a thread (issue 31; the rules: app/health_answer.py).
"""
from __future__ import annotations

import re
import selectors
import socket
import time
from datetime import datetime
from functools import partial
from typing import Any, cast

from gunicorn import http
from gunicorn.http import wsgi
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.http2 import negotiation
from gunicorn.workers import gthread
from gunicorn.workers.gthread import TConn, ThreadWorker

from app import logs, metrics
from app.health_answer import HEALTH, HEALTH_HEADS, TO_FLASK, Collected, HealthAnswer, HealthCapture, plain_health

_BARE_LF = re.compile(rb"(?<!\r)\n")  # gunicorn refuses it at once: the thread answers 400 without waiting
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_CLOSED = object()  # _answer_health closed the connection
_STOP_KEEPALIVE_LINGER: float = getattr(gthread, "STOP_KEEPALIVE_LINGER", 2.0)  # not in gunicorn's type stubs
MAX_PIPELINED_IN_LOOP = 100  # /health requests answered back to back from one read; the rest wait for the next loop


class HeaderTimeoutWorker(ThreadWorker):
    """ThreadWorker whose event loop reads each request's head, within `header_timeout` seconds."""

    header_timeout = 10.0

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutWorker]:
        """This worker with its deadline set; a bad value stops the start, naming the setting."""
        if not 0 < seconds < float("inf"):
            raise ValueError(f"GUNICORN_HEADER_TIMEOUT must be a number of seconds above 0, not {seconds!r}")
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heads: dict[TConn, tuple[float, bytearray]] = {}  # still sending their head; oldest deadline first
        self.health_answer: HealthAnswer | None = None  # Flask's first answer to a plain GET /health, to replay
        self.in_threads = 0  # connections handed to the request threads and not back yet
        self.last_finished = time.monotonic()  # when a request thread last gave a connection back
        # The largest head gunicorn's parser accepts (its limit_request_* settings, as it applies them).
        line = self.cfg.limit_request_line
        fields = self.cfg.limit_request_fields
        field_size = self.cfg.limit_request_field_size
        self.max_head = ((line if 0 < line < MAX_REQUEST_LINE else MAX_REQUEST_LINE) + 2
                         + (fields if 0 < fields <= MAX_HEADERS else MAX_HEADERS)
                         * ((field_size if field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE) + 2) + 4)

    def load_wsgi(self):
        """The app, with the middleware that keeps its answer to /health (a Flask app; others are served as is)."""
        super().load_wsgi()
        if hasattr(self.wsgi, "wsgi_app"):
            self.health_answer = None  # a reloaded app answers anew
            self.wsgi.wsgi_app = HealthCapture(self.wsgi.wsgi_app, self)

    def enqueue_req(self, conn):
        """Every connection with a request to read comes here (accepted, kept alive, or with a pipelined request
        already buffered): its head is gathered first, unless it is one gunicorn must read itself."""
        if (conn.is_http2 or self.cfg.is_ssl or self.cfg.proxy_protocol != "off"
                or getattr(self.cfg, "protocol", "http") != "http"
                or negotiation.prior_knowledge_allowed(self.cfg, conn.client)):
            self._to_thread(conn)
            return
        self._gather(conn, bytearray(conn.parser.unreader.take_buffered() if conn.parser else b""))

    def _gather(self, conn, head: bytearray):
        """Serve the head if it is complete, else read the rest in the event loop."""
        if self._ready(head, 0):
            self._serve(conn, head)
            return
        self.heads[conn] = (time.monotonic() + self.header_timeout, head)
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _ready(self, head: bytearray, start: int) -> bool:
        """Whether the head is complete, malformed or too large: gunicorn's parser can take it from here without
        reading more (`start`: where the bytes not yet searched begin)."""
        start = max(start - 3, 0)
        return b"\r\n\r\n" in head[start:] or bool(_BARE_LF.search(head, start)) or len(head) > self.max_head

    def _on_head_bytes(self, conn, sock):
        try:
            data = sock.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._close(conn)
            return
        deadline, head = self.heads[conn]
        searched = len(head)
        head += data
        if not self._ready(head, searched):
            return
        self.poller.unregister(sock)
        del self.heads[conn]
        if len(head) > self.max_head and b"\r\n\r\n" not in head:
            self._close(conn, _TOO_LARGE)
        else:
            self._serve(conn, head)

    def _serve(self, conn, head: bytearray):
        """A complete head: a plain /health is answered here, then the next request on the connection is read (a
        pipelined one included); anything else goes to a thread."""
        for _ in range(MAX_PIPELINED_IN_LOOP):
            if self.health_answer is None or not head.startswith(HEALTH_HEADS) or self.threads_stalled():
                break
            after = self._answer_health(conn, head)
            if after is None:  # not one the loop answers: Flask does
                break
            if after is _CLOSED:
                return
            head = bytearray(after)
            if not head:
                self._keep_alive(conn)
                return
            if not self._ready(head, 0):
                self._gather(conn, head)
                return
        self._hand_over(conn, head)

    def _answer_health(self, conn, head: bytearray) -> Any:
        """Answer a plain /health from the kept answer: the bytes after its head (the next request's, if any), or
        _CLOSED when the connection was closed after the answer; None (nothing sent) when Flask must answer it."""
        answer = self.health_answer
        if answer is None:
            return None
        started = datetime.now()
        out = Collected()
        try:
            parser = http.RequestParser(self.cfg, iter([bytes(head)]), conn.client)
            req = next(parser)  # gunicorn's own parsing and checks (a bad request goes to the thread, refused there)
            if getattr(req, "_expected_100_continue", False) or any(name in TO_FLASK for name, _ in req.headers):
                return None
            resp, environ = wsgi.create(req, cast(Any, out), conn.client, conn.server, self.cfg)
            if not plain_health(environ):
                return None
            self.cfg.pre_request(self, req)
            environ["wsgi.multithread"] = True
            # as gunicorn's handle_request: the request count, and whether the connection is kept alive
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if not self.alive or not self.cfg.keepalive or len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            resp.start_response(answer.status, answer.headers_for(
                logs.request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))))
            for chunk in answer.body:
                resp.write(chunk)  # a HEAD's is dropped by gunicorn, as Flask's would be
            resp.close()
        except Exception:  # whatever gunicorn would say of it, it says from a thread
            return None
        after = parser.unreader.take_buffered()
        try:
            sent = conn.sock.send(out.data)  # non-blocking: an answer of a few hundred bytes fits the socket's buffer
        except OSError:
            sent = -1
        metrics.HTTP_LATENCY.labels(HEALTH, req.method, answer.status.split(" ", 1)[0]).observe(
            (datetime.now() - started).total_seconds())
        self.log.access(resp, req, environ, datetime.now() - started)
        try:
            self.cfg.post_request(self, req, environ, resp)
        except Exception:  # as gunicorn's handle_request
            self.log.exception("Exception in post_request hook")
        if sent != len(out.data) or resp.should_close():  # a client that does not read its answers is closed too
            self._close_answered(conn)
            return _CLOSED
        return after

    def _keep_alive(self, conn):
        """Back on the selector until the next request comes, as gunicorn's finish_request does."""
        conn.sock.setblocking(False)
        conn.set_timeout()
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + _STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def _close_answered(self, conn):
        """Close after an answer without waiting (gunicorn's graceful close lingers up to 2 s, in a thread): FIN
        after the answer. Its head was read whole, so nothing unread is left to turn the close into a reset, unless
        the client sent more after a `Connection: close`."""
        self.nr_conns -= 1
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    def _hand_over(self, conn, head: bytearray):
        """The head goes back in front of the parser's input; the thread then parses it without waiting."""
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)  # as TConn.init() would, for HTTP/1
        conn.parser.unreader.unread(bytes(head))
        conn.data_ready = True  # the bytes are read: the thread must not wait for the socket to be readable
        self._to_thread(conn)

    def _to_thread(self, conn):
        self.in_threads += 1
        super().enqueue_req(conn)

    def finish_request(self, conn, fs):
        """A request thread gave a connection back (gunicorn's, in the event loop)."""
        self.in_threads -= 1
        self.last_finished = time.monotonic()
        super().finish_request(conn, fs)

    def threads_stalled(self) -> bool:
        """Every request thread busy and none has finished a request for `timeout` seconds (GUNICORN_TIMEOUT): the
        worker serves nothing. /health then goes to Flask, queued behind them, so that a liveness probe fails as it
        did before the event loop answered it (the loop itself stays alive, and gunicorn only watches the loop)."""
        return self.in_threads >= self.cfg.threads and time.monotonic() - self.last_finished > self.cfg.timeout

    def _close(self, conn, answer: bytes = b""):
        self.heads.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass  # already unregistered
        if answer:
            try:
                conn.sock.send(answer)  # a courtesy: the socket is non-blocking, a full buffer drops it
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """gunicorn's sweep of idle connections, run every loop (at least once a second): heads past their
        deadline too."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads:
            conn, (deadline, _) = next(iter(self.heads.items()))
            if deadline > now:
                break
            self.log.debug("closing %s: no complete request head within %g s", conn.client, self.header_timeout)
            self._close(conn, _TIMED_OUT)
