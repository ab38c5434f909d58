"""A connector run (or a preview) in a child process of its own, so a cancel or a timeout stops it within seconds
wherever it is (a source that never answers included) without taking the calling process down with it.

Children come from a forkserver started once per process (under gunicorn: once by the master, for every worker,
connectors/shared_forkserver.py) and preloaded with dlt, so a run starts in tens of
milliseconds, and no process with threads (a gunicorn worker) ever forks. The child sends its log lines and
its outcome back over a pipe; the caller re-emits the lines in its own thread, so they carry its context. The
run's trace context goes to the child with its arguments; with an OTLP endpoint the child exports its own
step spans, and flushes them before it reports the outcome (after which it is killed).
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from opentelemetry import context as otel_context

from connectors import tracing
from connectors.failures import CRASHED, classify
from connectors.outbound import OutboundPolicy
from connectors.pipeline import (
    ConnectorPipeline,
    ConnectorRunError,
    LoadSummary,
    RunCancelled,
    Workspace,
    run_connector,
)
from connectors.preview import preview_connector
from connectors.schema_contract import SchemaContractViolation
from connectors.spec import ConnectorSpec, ParamsError

log = logging.getLogger(__name__)
PRELOAD = ["connectors.preload", "connectors.isolated"]
GRACE_SECONDS = 5.0  # after a stop is asked, how long a run may take to reach its next checkpoint before it is killed


@functools.cache
def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD + _main_module())
    return context


def _main_module() -> list[str]:
    """The module this process was started as (`python -m <module>`), to preload: multiprocessing runs it again in
    every child before the child's work, and a module that imports much (`prefect.engine`, a Prefect flow run's
    main) cost each child 4-8 s here, measured on this 2-core machine under load; preloaded, it runs on modules
    already imported. A `__main__` module (`python -m gunicorn`) multiprocessing does not run again."""
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    return [name] if name and name != "__main__" and not name.endswith(".__main__") else []


def warm_up() -> None:
    """Start the forkserver now (it imports dlt once), so the first run does not wait for it; in a gunicorn worker
    that adopted its master's (connectors/shared_forkserver.py), check that one is still there."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def run_connector_isolated(spec: ConnectorSpec, workspace: Workspace, should_stop: Callable[[], bool] = lambda: False,
                           grace_seconds: float = GRACE_SECONDS,
                           must_end: Callable[[], bool] = lambda: False,
                           steps: Sequence[str] = ConnectorPipeline.steps,
                           trace_context: tracing.Carrier | None = None) -> LoadSummary:
    """run_connector (of `steps`) in a child process. When `should_stop` turns true the child stops at its next
    checkpoint; one that has not within `grace_seconds` (stuck in a step) is killed, and the run ends as
    cancelled during that step (a killed load leaves a pipeline folder the next run recovers from). When
    `must_end` turns true (the calling process shuts down, or lost the lease on the run or its connector) the
    child is killed at once. The child's steps continue the trace `trace_context` names (connectors/tracing.py)."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    lifeline, held = context.Pipe(duplex=False)  # the child ends itself when `held` closes: this process died
    stop = context.Event()
    child = context.Process(target=_child, args=(spec, workspace, tuple(steps), stop, send, lifeline,
                                                 trace_context or {}),
                            name=f"flowgate-connector-{spec.id}", daemon=True)
    step, stop_asked_at = steps[0], None
    try:
        try:
            child.start()
        finally:
            send.close()
            lifeline.close()
        while True:
            if receive.poll(0.1):
                try:
                    kind, payload = receive.recv()
                except EOFError:
                    kind, payload = "died", None
                if kind == "log":
                    _relay(payload)
                    continue
                if kind == "step":
                    step = payload
                    continue
                if kind == "done":
                    return LoadSummary(**payload)
                if kind == "failed":
                    raise _rebuilt(spec, payload)
                child.join(5)
                raise ConnectorRunError(spec.id, step, f"the run's process ended without an outcome "
                                                       f"(exit code {child.exitcode})", failure_class=CRASHED)
            if must_end():
                child.kill()
                child.join(5)
                raise RunCancelled(step, f"stopped at once during {step}")
            if stop_asked_at is None and should_stop():
                stop.set()
                stop_asked_at = time.monotonic()
            elif stop_asked_at is not None and time.monotonic() - stop_asked_at > grace_seconds:
                child.kill()
                child.join(5)
                raise RunCancelled(step, f"stopped by force during {step}: it reached no checkpoint within "
                                         f"{grace_seconds:g} s")
            elif not child.is_alive() and not receive.poll():
                raise ConnectorRunError(spec.id, step, f"the run's process died (exit code {child.exitcode})",
                                        failure_class=CRASHED)
    finally:
        _reap(child, receive, held)


def _reap(child: Any, receive: Connection, held: Connection) -> None:
    """Close the parent's ends and make sure the child is gone (killed if it still runs)."""
    receive.close()
    if child.pid is not None:
        if child.is_alive():
            child.kill()
        child.join(5)
    held.close()


def _relay(line: dict[str, Any]) -> None:
    """Log a child's line here, as if this thread had written it (so it carries the run's context)."""
    try:
        logging.getLogger(line["name"]).handle(logging.makeLogRecord(line))
    except Exception:  # a log line must never end the run it belongs to
        log.exception("relaying a log line of a connector run failed")


def _rebuilt(spec: ConnectorSpec, payload: dict[str, Any]) -> Exception:
    kind = payload["kind"]
    if kind == "cancelled":
        return RunCancelled(payload["step"])
    if kind == "params":
        return ParamsError(payload["field"], payload["message"])
    if kind == "contract":
        return SchemaContractViolation(spec.id, payload["step"], **payload["facts"])
    return ConnectorRunError(spec.id, payload["step"], payload["message"], failure_class=payload["failure_class"])


class _PipeHandler(logging.Handler):
    """In the child: every log line goes to the parent, which logs it as its own."""

    def __init__(self, send: Callable[[Any], None]):
        super().__init__(level=logging.INFO)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        try:
            self.send(("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                               "msg": message, "created": record.created, "pathname": record.pathname,
                               "lineno": record.lineno, "funcName": record.funcName,
                               "trace_id": tracing.trace_id()}))
        except (OSError, ValueError):
            pass  # the parent is gone: nobody is listening


def _watch_lifeline(lifeline: Connection) -> None:
    """In the child: when the process that started this run dies (SIGKILL, OOM), stop at once. A run nobody
    holds a lease for must not go on writing its pipeline folder beside the next run of its connector."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _child(spec: ConnectorSpec, workspace: Workspace, steps: tuple[str, ...], stop: Any, pipe: Connection,
           lifeline: Connection, trace_context: tracing.Carrier) -> None:
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    lock = threading.Lock()
    exporting = tracing.configure()  # this process's own exporter: its step spans join the run's trace
    parent = tracing.extract(trace_context)
    if parent is not None:
        otel_context.attach(parent)

    def send(message: Any) -> None:
        if exporting and message[0] in ("done", "failed"):
            tracing.flush()  # the parent kills this process once it has the outcome: spans go first
        with lock:
            pipe.send(message)

    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(send)]
    root.setLevel(logging.INFO)
    log.info("connector %s runs in process %d", spec.id, os.getpid())
    step = steps[0]

    def on_step(name: str) -> None:
        nonlocal step
        step = name
        send(("step", name))

    try:
        summary = run_connector(spec, workspace, should_stop=stop.is_set, on_step=on_step, steps=steps)
        send(("done", summary.to_dict()))
    except RunCancelled as exc:
        send(("failed", {"kind": "cancelled", "step": exc.step}))
    except ParamsError as exc:
        send(("failed", {"kind": "params", "field": exc.field, "message": exc.message}))
    except SchemaContractViolation as exc:
        send(("failed", {"kind": "contract", "step": exc.step, "facts": exc.facts()}))
    except ConnectorRunError as exc:
        send(("failed", {"kind": "connector", "step": exc.step, "message": exc.message,
                         "failure_class": exc.failure_class}))
    except BaseException as exc:  # the parent must hear of anything at all
        failure = classify(exc)
        send(("failed", {"kind": "internal", "step": step, "message": f"{type(exc).__name__}: {exc} ({failure.reason})",
                         "failure_class": failure.failure_class}))
    finally:
        pipe.close()


class PreviewTimedOut(Exception):
    """A preview's source gave no sample within the deadline; its process was killed."""

    def __init__(self, seconds: float):
        super().__init__(f"the source gave no sample within {seconds:g} s")
        self.seconds = seconds


def preview_isolated(spec: ConnectorSpec, limit: int, outbound: OutboundPolicy,
                     deadline_seconds: float) -> dict[str, Any]:
    """preview_connector in a child process, killed past `deadline_seconds` (PreviewTimedOut): a source that hangs
    holds neither the calling thread nor anything else once the deadline passed."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    lifeline, held = context.Pipe(duplex=False)
    child = context.Process(target=_preview_child, args=(spec, limit, outbound, send, lifeline),
                            name=f"flowgate-preview-{spec.id}", daemon=True)
    try:
        try:
            child.start()
        finally:
            send.close()
            lifeline.close()
        if not receive.poll(deadline_seconds):
            raise PreviewTimedOut(deadline_seconds)
        try:
            kind, payload = receive.recv()
        except EOFError:
            child.join(5)
            raise ConnectorRunError(spec.id, "extract", f"the preview's process ended without an outcome "
                                    f"(exit code {child.exitcode})", failure_class=CRASHED) from None
        if kind == "done":
            return payload
        raise _rebuilt(spec, payload)
    finally:
        _reap(child, receive, held)


def _preview_child(spec: ConnectorSpec, limit: int, outbound: OutboundPolicy, pipe: Connection,
                   lifeline: Connection) -> None:
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    try:
        pipe.send(("done", preview_connector(spec, limit, outbound)))
    except ParamsError as exc:
        pipe.send(("failed", {"kind": "params", "field": exc.field, "message": exc.message}))
    except ConnectorRunError as exc:
        pipe.send(("failed", {"kind": "connector", "step": exc.step, "message": exc.message,
                              "failure_class": exc.failure_class}))
    except BaseException as exc:  # the parent must hear of anything at all (a sample that does not pickle)
        pipe.send(("failed", {"kind": "connector", "step": "extract", "message": f"{type(exc).__name__}: {exc}",
                              "failure_class": classify(exc).failure_class}))
    finally:
        pipe.close()
