"""Logging: one JSON object per line on stdout, each with the request id, run id and trace id it belongs to.

The ids live in context variables: a request sets its id for the request's thread, an executor thread sets
the run id (and the run's trace) for the run it executes, and a filter copies them onto every record.
"""
from __future__ import annotations

import logging
import random
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from flask import Flask, Response, g, request
from pythonjsonlogger.json import JsonFormatter

from connectors import secrets, tracing
from connectors.secrets import redact_text

request_id: ContextVar[str | None] = ContextVar("flowgate_request_id", default=None)
run_id: ContextVar[str | None] = ContextVar("flowgate_run_id", default=None)

_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"


class ContextFilter(tracing.TraceIdFilter):
    """Puts `request_id`, `run_id` and `trace_id` on every record (None when there is none), and scrubs the
    secrets the process resolved from `${VAR}`s out of its message and traceback (connectors.secrets)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "run_id"):
            record.run_id = run_id.get()
        super().filter(record)
        scrub_record(record)
        return True


def scrub_record(record: logging.LogRecord) -> None:
    """Remove remembered secrets from a record's message and traceback, in place (every handler sees the result)."""
    if not secrets.known() or getattr(record, "_flowgate_scrubbed", False):
        return
    message = record.getMessage()
    scrubbed = secrets.scrub_text(message)
    if scrubbed != message:
        record.msg, record.args = scrubbed, ()
    if record.exc_info:
        record.exc_text = secrets.scrub_text(record.exc_text or logging.Formatter().formatException(record.exc_info))
        record.exc_info = None  # formatters then print exc_text, the scrubbed one
    record._flowgate_scrubbed = True


class JsonLines(JsonFormatter):
    """python-json-logger with flowgate's fields, timestamps in ISO 8601 UTC."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fmt", FIELDS)
        kwargs.setdefault("rename_fields", {"asctime": "time", "levelname": "level", "name": "logger",
                                            "process": "pid"})
        kwargs.setdefault("timestamp", False)
        super().__init__(*args, **kwargs)
        self.default_time_format = "%Y-%m-%dT%H:%M:%S"
        self.default_msec_format = "%s.%03dZ"

    converter = staticmethod(time.gmtime)


class AccessJsonLines(JsonLines):
    """gunicorn's access log as JSON: gunicorn passes its atoms as the record's args."""

    ATOMS = {"remote": "h", "method": "m", "path": "U", "query": "q", "status": "s", "bytes": "B",
             "duration_ms": "M", "user_agent": "a", "request_id": "{x-request-id}o"}

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        atoms = record.args if isinstance(record.args, dict) else {}
        log_data["message"] = "request"
        for field, atom in self.ATOMS.items():
            value = atoms.get(atom)
            if field in ("path", "query") and isinstance(value, str):
                value = redact_text(value)  # `?api_key=...` (refused, yet logged) and the like
            if value not in (None, "-"):
                log_data[field] = int(value) if field in ("status", "bytes", "duration_ms") and str(value).isdigit() \
                    else value


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stdout for the root logger, unless someone (gunicorn's logconfig, pytest) configured it."""
    root = logging.getLogger()
    if not root.handlers:
        stdout = logging.StreamHandler(sys.stdout)
        stdout.setFormatter(JsonLines())
        root.addHandler(stdout)
        root.setLevel(level)
    for handler in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
    for name in ("app", "flows", "connectors"):  # flowgate's own INFO lines exist even under a quieter root
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(level)


def request_id_for(incoming: str) -> str:
    """A request's id: the caller's X-Request-ID when it is sane, else a new one (a uuid4's 32 hex digits, from
    `random`: an id is no secret, and os.urandom's system call lets the GIL go, which a request answered in
    gunicorn's event loop, app/gunicorn_worker.py, must not wait to take back under load)."""
    return incoming if _INCOMING_ID.match(incoming) else uuid.UUID(int=random.getrandbits(128), version=4).hex


def init_app(app: Flask) -> None:
    """Give every request an id: the caller's X-Request-ID when it is sane, a new one otherwise; echo it back."""

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = request_id_for(request.headers.get("X-Request-ID", ""))
        g.request_id_token = request_id.set(g.request_id)

    @app.after_request
    def echo_request_id(response: Response) -> Response:
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response

    @app.teardown_request
    def forget_request_id(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            request_id.reset(token)
