"""/health answered by gunicorn's event loop (app/gunicorn_worker.py): which requests, and the answer replayed.

`/health` is answered in the event loop itself, without a thread (issue 31): under load every request thread may be
busy with triggers, and a liveness probe queued behind them took 27-55 ms at p99 on a quiet 2-core machine. Its
answer is static (no database), so the event loop replays the one Flask gave: the first plain `GET /health` a
worker serves goes through Flask as any request, its status, headers and body are kept (`HealthAnswer`), and every
later plain `GET` or `HEAD /health` gets them with its own X-Request-ID (the caller's when sane, else a new one, as
app/logs.py gives), through gunicorn's own request parser, Response (status line, Date, Connection, keep-alive rules)
and access log, and counted in the request latency metric as Flask counts it. "Plain": exactly `/health` (a query
string goes to Flask), HTTP/1.0 or 1.1, no body, no conditional or range header (Flask answers those 304/200), no
Expect or Upgrade, no X-Forwarded-*/Forwarded header (with FLOWGATE_TRUSTED_PROXIES they change the access log's
address). Anything else, or anything that goes wrong before the answer is sent, goes to a thread as before. So does
every /health while the worker's request threads are all busy and none has finished a request for GUNICORN_TIMEOUT
seconds: such a worker serves nothing, and its liveness probe must fail as it did before (gunicorn watches only the
event loop, which stays alive).
Readiness (/api/v1/health/ready) stays in Flask. Not kept: a span per /health (with an OTLP endpoint, the event
loop's answers are not traced).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.http import http_date

HEALTH = "/health"
HEALTH_HEADS = (b"GET /health ", b"HEAD /health ")
_OWN = frozenset({"x-request-id", "date"})  # headers whose value each answer makes anew
# Request headers that change /health's answer, its framing or what is logged of it: such a request goes to Flask.
TO_FLASK = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "UPGRADE", "HTTP2-SETTINGS", "IF-MATCH",
                      "IF-NONE-MATCH", "IF-MODIFIED-SINCE", "IF-UNMODIFIED-SINCE", "IF-RANGE", "RANGE", "FORWARDED",
                      "X-FORWARDED-FOR", "X-FORWARDED-PROTO", "X-FORWARDED-HOST", "X-FORWARDED-PORT",
                      "X-FORWARDED-PREFIX"})
_ENVIRON_TO_FLASK = tuple("CONTENT_LENGTH" if name == "CONTENT-LENGTH" else "HTTP_" + name.replace("-", "_")
                          for name in TO_FLASK)


@dataclass(frozen=True)
class HealthAnswer:
    """What Flask answered to a plain GET /health: replayed by the event loop with each request's own id."""

    status: str
    headers: tuple[tuple[str, str | None], ...]  # None: each request has its own (X-Request-ID, Date)
    body: tuple[bytes, ...]

    @classmethod
    def of(cls, status: str, headers: list[tuple[str, str]], body: tuple[bytes, ...]) -> HealthAnswer:
        return cls(status, tuple((name, None if name.lower() in _OWN else value) for name, value in headers), body)

    def headers_for(self, request_id: str) -> list[tuple[str, str]]:
        """The headers Flask would give this request: its id, and the date werkzeug adds to a GET's answer (beside
        gunicorn's own Date header: Flask's answers carry two)."""
        own = {"x-request-id": request_id, "date": http_date()}
        return [(name, own[name.lower()] if value is None else value) for name, value in self.headers]


def plain_health(environ: Mapping[str, Any]) -> bool:
    """Whether a request (its WSGI environ) is one whose answer the event loop may replay."""
    return (environ.get("REQUEST_METHOD") in ("GET", "HEAD") and environ.get("PATH_INFO") == HEALTH
            and not environ.get("QUERY_STRING") and environ.get("SERVER_PROTOCOL") in ("HTTP/1.0", "HTTP/1.1")
            and not any(key in environ for key in _ENVIRON_TO_FLASK))


class Collected:
    """Stands for the socket while gunicorn's Response writes the answer: one send() then, not one per part."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    send = sendall


class HealthCapture:
    """WSGI middleware (outermost, around Flask's wsgi_app): keeps the worker's first answer to a plain GET /health."""

    def __init__(self, app: Any, worker: Any):
        self.app = app
        self.worker = worker

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if (self.worker.health_answer is not None or environ.get("REQUEST_METHOD") != "GET"
                or not plain_health(environ)):
            return self.app(environ, start_response)
        seen: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[:] = [status, list(headers)]
            return start_response(status, headers, exc_info)

        answer = self.app(environ, capture)
        try:
            body = tuple(bytes(chunk) for chunk in answer)
        finally:
            if hasattr(answer, "close"):
                answer.close()
        if seen and seen[0].startswith("200 "):
            status, headers = seen
            self.worker.health_answer = HealthAnswer.of(status, headers, body)
        return body
