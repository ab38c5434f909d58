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
"""
from __future__ import annotations

import re
import selectors
import time
from functools import partial

from gunicorn import http
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

_BARE_LF = re.compile(rb"(?<!\r)\n")  # gunicorn refuses it at once: the thread answers 400 without waiting
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


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
        # The largest head gunicorn's parser accepts (its limit_request_* settings, as it applies them).
        line = self.cfg.limit_request_line
        fields = self.cfg.limit_request_fields
        field_size = self.cfg.limit_request_field_size
        self.max_head = ((line if 0 < line < MAX_REQUEST_LINE else MAX_REQUEST_LINE) + 2
                         + (fields if 0 < fields <= MAX_HEADERS else MAX_HEADERS)
                         * ((field_size if field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE) + 2) + 4)

    def enqueue_req(self, conn):
        """Every connection with a request to read comes here (accepted, kept alive, or with a pipelined request
        already buffered): its head is gathered first, unless it is one gunicorn must read itself."""
        if (conn.is_http2 or self.cfg.is_ssl or self.cfg.proxy_protocol != "off"
                or getattr(self.cfg, "protocol", "http") != "http"
                or negotiation.prior_knowledge_allowed(self.cfg, conn.client)):
            super().enqueue_req(conn)
            return
        head = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        if self._ready(head, 0):
            self._hand_over(conn, head)
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
            self._hand_over(conn, head)

    def _hand_over(self, conn, head: bytearray):
        """The head goes back in front of the parser's input; the thread then parses it without waiting."""
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)  # as TConn.init() would, for HTTP/1
        conn.parser.unreader.unread(bytes(head))
        conn.data_ready = True  # the bytes are read: the thread must not wait for the socket to be readable
        super().enqueue_req(conn)

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
