"""LocalExecutor: threads in one gateway process that claim queued runs from the store and run them."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from app.logs import run_id as current_run_id
from app.metrics import observe_run_end
from app.runlogs import RunLogHandler
from app.runs.models import CANCELLED, COMPLETED, CRASHED, FAILED, Run, utcnow
from app.runs.slots import SlotClasses
from app.runs.store import RunStore
from app.runs.workflow_runs import (
    InlineConnectorRunner, record_pending_nodes, run_workflow, stored_spec, workflow_outcome,
)
from connectors.pipeline import ConnectorRunError, RunCancelled, Workspace, run_connector
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from flows.nodes import Toolbox

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs connectors and workflows in this process; the store decides who runs what, so capacity is shared by all
    processes.

    Nothing is queued in memory: a run waits in the store until some executor claims it, holds a
    lease renewed by a heartbeat while it runs, and a lapsed lease marks it crashed.
    """

    def __init__(self, store: RunStore, registry: ConnectorRegistry, workspace: Workspace,
                 slots: int, lease_seconds: float, poll_seconds: float, toolbox: Toolbox | None = None,
                 run_timeout_seconds: float = 6 * 3600, log_sink: RunLogHandler | None = None,
                 reserved_slots: int = 0):
        self.store = store
        self.registry = registry
        self.workspace = workspace
        self.toolbox = toolbox or Toolbox()
        self.run_timeout_seconds = run_timeout_seconds
        self.log_sink = log_sink
        self._deadlines: dict[str, float] = {}
        self._timed_out: set[str] = set()
        self.slots = slots
        self.slot_classes = SlotClasses(slots, reserved_slots)
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.id = ""
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_requested_at: float | None = None
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        """True between start() and shutdown()."""
        return bool(self._threads) and not self._stopping.is_set()

    @property
    def active(self) -> int:
        """Runs this process is executing right now."""
        with self._lock:
            return len(self._running)

    @property
    def heartbeat_seconds(self) -> float:
        """How often leases are renewed: three times per lease."""
        return max(self.lease_seconds / 3, 0.1)

    def start(self) -> None:
        """Start claiming (call in the process that will run the pipelines: after gunicorn forks)."""
        if self._threads or self.slots <= 0:
            return
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if self.log_sink is not None:
            self.log_sink.start()
        self._heartbeat()
        for target, name in ((self._claim_loop, "claim"), (self._heartbeat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"flowgate-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("local executor %s started with %d slots", self.id, self.slots)

    def wake(self) -> None:
        """Look for queued runs now instead of at the next poll."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Take no new runs; the ones running carry on (first step of a graceful shutdown)."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stopping.set()
        self._wake.set()

    def shutdown(self, timeout: float) -> list[str]:
        """Stop claiming, give running pipelines until `timeout` after the stop began, record the rest.

        Returns the ids of the runs that could not finish; they are recorded `crashed` (interrupted).
        """
        self.stop_claiming()
        deadline = (self._stop_requested_at or time.monotonic()) + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            unfinished = list(self._running)
        for run_id in unfinished:
            self.store.finish(run_id, self.id, CRASHED, error={
                "code": "interrupted", "message": "the gateway process shut down before the run finished"})
        if self.id:
            self.store.remove_executor(self.id)
        if self.log_sink is not None:
            self.log_sink.stop()
        if unfinished:
            log.warning("executor %s stopped with %d unfinished run(s): %s", self.id, len(unfinished), unfinished)
        return unfinished

    # --- loops ------------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            run = None
            if self.active < self.slots:
                try:
                    run = self.store.claim_next(self.id, self.lease_seconds, kinds=self.slot_classes.claimable())
                except Exception:  # a database hiccup must not kill the loop; log it and poll again
                    log.exception("claiming a run failed")
            if run is not None:
                self._launch(run)
                continue
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _launch(self, run: Run) -> None:
        cancel = threading.Event()
        with self._lock:
            self._running[run.id] = cancel
            self.slot_classes.started(run.id, run.kind)
            self._deadlines[run.id] = time.monotonic() + self.run_timeout_seconds
        thread = threading.Thread(target=self._execute, args=(run, cancel), name=f"flowgate-run-{run.id[:8]}",
                                  daemon=True)
        thread.start()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_seconds):
            try:
                self._heartbeat()
            except Exception:
                log.exception("executor heartbeat failed")

    def _heartbeat(self) -> None:
        now = time.monotonic()
        with self._lock:
            running = dict(self._running)
            overdue = [run_id for run_id, deadline in self._deadlines.items() if deadline < now and run_id in running]
            self._timed_out.update(overdue)
        for run_id in overdue:  # stopped at its next checkpoint, then recorded as failed (run_timeout)
            running[run_id].set()
        for run_id in self.store.renew_leases(self.id, list(running), self.lease_seconds):
            running[run_id].set()
        self.store.heartbeat(self.id, socket.gethostname(), os.getpid(), self.slots, len(running))
        recovered = self.store.recover_expired()
        if recovered:
            log.warning("runs whose executor died were marked crashed: %s", recovered)
        self.store.forget_stale_executors(stale_after_seconds=self.lease_seconds * 10)

    # --- one run ----------------------------------------------------------------------------

    def connector_runner(self, owner: str | None = None) -> InlineConnectorRunner:
        """Runs a workflow's connector nodes as connector runs held by `owner` (this executor by default)."""
        return InlineConnectorRunner(self.store, self.registry, self.workspace, owner or self.id, self.lease_seconds)

    def _execute(self, run: Run, cancel: threading.Event) -> None:
        current_run_id.set(run.id)  # this thread is the run's: every log line it writes carries the run id
        if run.kind == "workflow":
            return self._execute_workflow(run, cancel)
        status, result, error = FAILED, None, None
        try:
            spec = self.registry.get(run.target)
            if spec is None:
                error = {"code": "connector_not_found", "message": f"connector '{run.target}' is no longer configured"}
            else:
                # dlt state in the destination can only be newer if the connector last ran somewhere else.
                elsewhere = self.store.last_ended_elsewhere(run.kind, run.target, socket.gethostname())
                summary = run_connector(spec.with_params(run.params), self.workspace, should_stop=cancel.is_set,
                                        restore_state=elsewhere)
                status, result = COMPLETED, summary.to_dict()
        except RunCancelled as exc:
            status, error = CANCELLED, {"code": "cancelled", "message": str(exc)}
        except ConnectorRunError as exc:
            error = {"code": "connector_failed", "step": exc.step, "message": exc.message, "terminal": exc.terminal}
        except ParamsError as exc:
            error = {"code": "invalid_params", "field": exc.field, "message": exc.message}
        except Exception as exc:  # anything else still ends the run in a recorded state
            log.exception("run %s failed unexpectedly", run.id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self._record(run, status, result, error)

    def _execute_workflow(self, run: Run, cancel: threading.Event) -> None:
        status, result, error = FAILED, None, None
        try:
            record_pending_nodes(self.store, run.id, stored_spec(run))
            toolbox = replace(self.toolbox, run_connector=self.connector_runner())
            status, result, error = workflow_outcome(run_workflow(run, self.store, toolbox, cancel.is_set))
        except Exception as exc:  # anything else still ends the run in a recorded state
            log.exception("workflow run %s failed unexpectedly", run.id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self._record(run, status, result, error)

    def _record(self, run: Run, status: str, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        run_id = run.id
        with self._lock:
            timed_out = run_id in self._timed_out
            self._timed_out.discard(run_id)
            self._deadlines.pop(run_id, None)
        if timed_out and status == CANCELLED:
            status, error = FAILED, {"code": "run_timeout", "message": "not finished within "
                                                                      f"FLOWGATE_RUN_TIMEOUT_SECONDS ({self.run_timeout_seconds:g} s)"}
        logs = self.log_sink.take(run_id) if self.log_sink is not None else None  # stored with the run's end
        try:
            if self.store.finish(run_id, self.id, status, result=result, error=error, logs=logs):
                observe_run_end(run.kind, run.target, status, run.started_at, utcnow())
            else:
                log.warning("run %s was no longer held by %s when it ended as %s", run_id, self.id, status)
        except Exception:
            log.exception("recording the end of run %s failed; its lease will lapse and mark it crashed", run_id)
        finally:
            with self._lock:
                self._running.pop(run_id, None)
                self.slot_classes.ended(run_id)
            self._wake.set()
