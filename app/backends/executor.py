"""LocalExecutor: threads in one gateway process that claim queued runs from the store and run them.

The leases of the runs it executes are kept by one LeaseKeeper (flows/lease.py): renewed every lease/3, and a
run whose lease was taken, or not renewed in time however the renewal hangs, is stopped at once. Over 300 lines
because claiming, leases, shutdown and the record of each run's end share the executor's state."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace

from sqlalchemy.exc import DBAPIError

from app.backends.workflow_runs import InlineConnectorRunner, record_pending_nodes, run_workflow, stored_spec
from app.gateway_tracing import run_span, run_span_ended
from app.logs import run_id as current_run_id
from app.metrics import observe_run_end, observe_run_start
from app.run_log_capture import RunLogCapture
from app.runs.models import Run, utcnow
from app.runs.slots import SlotClasses
from app.runs.store import RunStore
from connectors import tracing
from connectors.isolated import run_connector_isolated, warm_up
from connectors.pipeline import Workspace
from connectors.registry import ConnectorRegistry
from flows.lease import TAKEN, LeaseKeeper
from flows.loop import Loop
from flows.nodes import Toolbox
from flows.outcome import CANCELLED, COMPLETED, CRASHED, FAILED, QUEUED, RunError, RunOutcome

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs connectors and workflows in this process; the store, shared by every process, decides who runs what.

    Nothing is queued in memory: a run waits in the store until some executor claims it, holds a lease renewed
    by a heartbeat while it runs, and a lapsed lease marks it crashed."""

    def __init__(self, store: RunStore, registry: ConnectorRegistry, workspace: Workspace,
                 slots: int, lease_seconds: float, poll_seconds: float, toolbox: Toolbox | None = None,
                 run_timeout_seconds: float = 6 * 3600, log_sink: RunLogCapture | None = None,
                 reserved_slots: int = 0, schedule_slots: int = 0):
        self.store = store
        self.registry = registry
        self.workspace = workspace
        self.toolbox = toolbox or Toolbox()
        self.run_timeout_seconds = run_timeout_seconds
        self.log_sink = log_sink
        self._deadlines: dict[str, float] = {}
        self._timed_out: set[str] = set()
        self.slots = slots
        self.slot_classes = SlotClasses(slots, reserved_slots, schedule_slots)
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.heartbeat_seconds = max(lease_seconds / 3, 0.1)  # the registry row, timeouts, recovery of others' runs
        self.id = ""
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._scheduled_queued = False  # a scheduled run was queued here since the last claim: claim, don't yield
        self._stopping = threading.Event()  # claim no more runs
        self._closed = threading.Event()  # shutdown done: leases are no longer renewed
        self._lost: set[str] = set()  # runs whose lease was taken from this executor: their outcome is dropped
        self._recording: set[str] = set()  # runs whose end is being written: no longer held, and not lost
        self._interrupted: set[str] = set()  # runs stopped because this process shuts down
        self._ending = threading.Event()  # shutdown's last second: runs' processes are killed at once
        self.leases = LeaseKeeper("executor", self._renew, lease_seconds, self._lease_lost)
        # Runs until shutdown has recorded every run: a draining worker keeps its row and its leases.
        self.heartbeat = Loop("heartbeat", self.heartbeat_seconds, self._heartbeat, first_delay=self.heartbeat_seconds)
        self._stop_requested_at: float | None = None
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        """True between start() and shutdown()."""
        return bool(self._threads) and not self._stopping.is_set()

    def loops(self) -> dict[str, bool]:
        """Whether each background loop of this executor is alive (empty before start)."""
        if not self._threads:
            return {}
        return {"claim": self._threads[0].is_alive(), "heartbeat": bool(self.heartbeat.alive),
                "leases": bool(self.leases.alive)}

    @property
    def active(self) -> int:
        """Runs this process is executing right now."""
        with self._lock:
            return len(self._running)

    def start(self) -> None:
        """Start claiming (call in the process that will run the pipelines: after gunicorn forks)."""
        if self._threads or self.slots <= 0:
            return
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        warm_up()  # connector runs start from a forkserver: start it before the first trigger waits for it
        try:  # registered before the first claim, when the database answers
            self._heartbeat()
        except DBAPIError as exc:  # a worker still boots (gunicorn's master stops when one cannot): the loop retries
            log.warning("executor %s could not register yet (%s); its heartbeat tries again in %.0f s", self.id,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self.heartbeat_seconds)
        self.leases.start()
        self.heartbeat.start()
        self._threads.append(threading.Thread(target=self._claim_loop, name="flowgate-claim", daemon=True))
        self._threads[0].start()
        log.info("local executor %s started with %d slots", self.id, self.slots)

    def wake(self, kind: str | None = None, scheduled: bool = False) -> None:
        """Look for queued runs now instead of at the next poll; for a new run of `kind`, only when this executor has
        a slot that kind may take (for a `scheduled` one, the schedule lane counts too). Otherwise the claim would find
        nothing it may start, and the end of one of its runs wakes it anyway: with the connector slots busy, every
        trigger cost a claim query (py-spy, 16 clients flooding triggers: the claim loop was 11% of the gateway
        workers' CPU). The claim a scheduled run wakes does not leave it to a less busy executor's next poll: that
        cost a slot up to a poll of fire lag."""
        if scheduled and self.slot_classes.room() is not None:
            self._scheduled_queued = True
            self._wake.set()
        elif kind is None or self._has_slot_for(kind):
            self._wake.set()

    def _has_slot_for(self, kind: str) -> bool:
        if self.active >= self.slots:
            return False
        claimable = self.slot_classes.claimable()
        return claimable is None or kind in claimable

    def stop_claiming(self) -> None:
        """Take no new runs; the ones running carry on (first step of a graceful shutdown)."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stopping.set()
        self._wake.set()

    def shutdown(self, timeout: float) -> list[str]:
        """Stop claiming, give running pipelines until `timeout` after the stop began, record the rest `crashed`
        (interrupted) and return their ids."""
        self.stop_claiming()
        deadline = (self._stop_requested_at or time.monotonic()) + timeout
        if self._threads:  # the claim loop's last claim, on its way back as the stop came, is launched before it
            self._threads[0].join(max(deadline - 1 - time.monotonic(), 0))  # ends: counted below, not left running
        # A second before the end, what still runs is stopped, its process killed: a run recorded as interrupted
        # must not go on loading beside the next run of its connector.
        while self.active and time.monotonic() < deadline - 1:
            time.sleep(0.05)
        with self._lock:
            running = dict(self._running)
            self._interrupted.update(running)
        self._ending.set()
        for cancel in running.values():
            cancel.set()
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            unfinished = list(self._running)
        for run_id in unfinished:
            self.store.finish(run_id, self.id, CRASHED, error=RunError.interrupted())
        self._closed.set()
        self.leases.stop()
        self.heartbeat.stop(timeout=5)  # one under way would write the row back after its removal
        if self.id:
            self.store.executors.remove(self.id)
        if unfinished:
            log.warning("executor %s stopped with %d unfinished run(s): %s", self.id, len(unfinished), unfinished)
        return unfinished

    # --- loops ------------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        yielded = False
        while not self._stopping.is_set():
            run = None
            try:
                room = self.slot_classes.room()
                scheduled, self._scheduled_queued = self._scheduled_queued, False
                if room is not None:  # fair shares are for triggered runs: a slot's run is claimed where it was made
                    if room == "any" and not yielded and not scheduled and self._others_less_busy():
                        yielded = True  # their next poll takes the queued run; ours takes it if nobody did
                        self._stopping.wait(self.poll_seconds)  # a wake (a trigger, a run's end) does not cut it
                        continue
                    yielded = False
                    asked = time.monotonic()  # the lease runs from no earlier than this
                    run = self.store.claim_next(self.id, self.lease_seconds, scheduled_only=room == "scheduled",
                                                kinds=self.slot_classes.claimable() if room == "any" else None)
                    if run is not None:
                        self.leases.hold(run.id, since=asked)
                if run is not None:
                    self._launch(run)
                    continue
            except Exception:  # a database hiccup must not kill the loop; log it and poll again
                log.exception("claiming a run failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _others_less_busy(self) -> bool:
        """Fair shares: the executor that accepted a trigger or ended a run hears of it first, and would take every
        next run while others only poll. A busy one leaves the claim to a less busy one for a poll."""
        active = self.active
        return active > 0 and self.store.executors.less_busy_than(
            self.id, active, self.slots, stale_after_seconds=self.heartbeat_seconds * 3)

    def _launch(self, run: Run) -> None:
        observe_run_start(run)
        cancel = threading.Event()
        with self._lock:
            self._running[run.id] = cancel
            self.slot_classes.started(run.id, run.kind, scheduled=run.scheduled_for is not None)
            self._deadlines[run.id] = time.monotonic() + self.run_timeout_seconds
        try:
            threading.Thread(target=self._execute, args=(run, cancel), name=f"flowgate-run-{run.id[:8]}",
                             daemon=True).start()
        except Exception as exc:  # e.g. no thread can be started: the claimed run must not hang on its lease
            log.exception("starting run %s failed", run.id, extra={"run_id": run.id})
            self._record(run, RunOutcome(CRASHED, error=RunError("executor_failed",
                                                                 f"could not start the run: {exc}")))

    def _renew(self, run_ids: list[str]) -> set[str]:
        """The lease keeper's renewal: extend the leases this executor holds, pass on cancel requests."""
        held, cancel = self.store.renew_leases(self.id, run_ids, self.lease_seconds)
        with self._lock:
            for run_id in cancel & set(self._running):
                self._running[run_id].set()
        return held

    def _lease_lost(self, run_id: str, why: str) -> None:
        """Another process recovered the run, or may at any moment: stop it now (its process killed), write
        nothing of its end."""
        with self._lock:
            if run_id not in self._running or run_id in self._recording:
                return  # ended meanwhile: its end's record decides
            self._lost.add(run_id)
            cancel = self._running[run_id]
        log.error("executor %s lost the lease of run %s (%s); stopping it", self.id, run_id, "recovered elsewhere"
                  if why == TAKEN else "no renewal got through in time", extra={"run_id": run_id})
        cancel.set()

    def _heartbeat(self) -> None:
        """This executor's registry row, run timeouts, and recovery of runs whose executor died."""
        now = time.monotonic()
        with self._lock:
            running = dict(self._running)
            overdue = [run_id for run_id, deadline in self._deadlines.items() if deadline < now and run_id in running]
            self._timed_out.update(overdue)
        for run_id in overdue:  # stopped at its next checkpoint, then recorded as failed (run_timeout)
            running[run_id].set()
        self.store.executors.heartbeat(self.id, socket.gethostname(), os.getpid(), self.slots, len(running))
        recovered = self.store.recover_expired()
        if recovered:
            log.warning("runs whose executor died were marked crashed: %s", recovered)
        self.store.executors.forget_stale(stale_after_seconds=self.lease_seconds * 10)

    # --- one run ----------------------------------------------------------------------------

    def connector_runner(self, owner: str | None = None) -> InlineConnectorRunner:
        """Runs a workflow's connector nodes as connector runs held by `owner` (this executor by default)."""
        return InlineConnectorRunner(self.store, self.registry, self.workspace, owner or self.id, self.lease_seconds,
                                     must_end=self._ending.is_set)

    def _execute(self, run: Run, cancel: threading.Event) -> None:
        current_run_id.set(run.id)  # this thread is the run's: every log line it writes carries the run id
        outcome = RunOutcome.failed(RunError("internal_error", "the run ended without an outcome"))
        # ... and its trace: the run's span continues the trigger's (a run stored before traces has none)
        with run_span(run) as span:
            try:
                outcome = (self._execute_workflow(run, cancel) if run.kind == "workflow"
                           else self._execute_connector(run, cancel))
            except Exception as exc:  # anything at all still ends the run in a recorded state
                if not isinstance(exc, RunError.EXPECTED):
                    log.exception("run %s failed unexpectedly", run.id)
                outcome = RunOutcome.failed(RunError.of(exc))
            finally:
                self._record(run, outcome)
                run_span_ended(span, outcome.status, outcome.error.message if outcome.error else None)

    def _execute_connector(self, run: Run, cancel: threading.Event) -> RunOutcome:
        spec = self.registry.get(run.target)
        if spec is None:
            return RunOutcome.failed(RunError("connector_not_found",
                                              f"connector '{run.target}' is no longer configured", terminal=True))
        # A lost lease kills the run's process at once: another process may already run the connector's next run.
        summary = run_connector_isolated(spec.with_params(run.params), self.workspace, should_stop=cancel.is_set,
                                         must_end=lambda: self._ending.is_set() or run.id in self._lost,
                                         trace_context=tracing.carrier())
        return RunOutcome(COMPLETED, summary.to_dict())

    def _execute_workflow(self, run: Run, cancel: threading.Event) -> RunOutcome:
        record_pending_nodes(self.store, run.id, stored_spec(run))
        toolbox = replace(self.toolbox, run_connector=self.connector_runner())
        return RunOutcome.of_workflow(run_workflow(run, self.store, toolbox, cancel.is_set))

    def _record(self, run: Run, outcome: RunOutcome) -> None:
        run_id = run.id
        with self._lock:
            timed_out, interrupted = run_id in self._timed_out, run_id in self._interrupted
            self._timed_out.discard(run_id)
            self._interrupted.discard(run_id)
            self._deadlines.pop(run_id, None)
        if timed_out and outcome.status == CANCELLED:
            outcome = RunOutcome(FAILED, outcome.result, RunError.timed_out(self.run_timeout_seconds))
        elif interrupted and outcome.status == CANCELLED:
            outcome = RunOutcome(CRASHED, outcome.result, RunError.interrupted())
        logs = self.log_sink.take(run_id) if self.log_sink is not None else None  # stored with the run's end
        with self._lock:
            lost = run_id in self._lost
            self._lost.discard(run_id)
            self._recording.add(run_id)
        self.leases.release(run_id)  # from here on, the end's record decides: a lease lost now stops nothing
        try:
            if lost:
                log.warning("run %s ended as %s after its lease was lost; nothing recorded", run_id, outcome.status)
                return
            # The store writes a failure's ERROR line on the run's own log (not on stdout: it is the run's outcome).
            written = self.store.finish(run_id, self.id, outcome.status, result=outcome.result, error=outcome.error,
                                        logs=logs)
            if written and written != QUEUED:  # queued: retried (the store's line on the run says when)
                observe_run_end(run.kind, run.target, outcome.status, run.started_at, utcnow(), outcome.result)
            elif not written:
                log.warning("run %s was no longer held by %s when it ended as %s", run_id, self.id, outcome.status)
        except Exception:
            log.exception("recording the end of run %s failed; its lease will lapse and mark it crashed", run_id)
        finally:
            with self._lock:
                self._running.pop(run_id, None)
                self._recording.discard(run_id)
                self.slot_classes.ended(run_id)
            self._wake.set()
