"""Dispatcher: turns an accepted trigger into a stored run, chooses its backend (Prefect or local) and records why.
Over 300 lines because every way a run comes to be (a trigger, an execute, a schedule's slot, a rerun) is here."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from opentelemetry import trace

from app.backends import Backend
from app.backends.local import LocalBackend
from app.backends.prefect import PrefectBackend
from app.backends.prefect_client import PrefectError
from app.config import Settings
from app.errors import Conflict, NotFound, Problem, TooManyRequests, Unavailable, ValidationFailed
from app.metrics import FALLBACKS, TRIGGERS, observe_run_end
from app.runs.models import SOURCE_PREFECT, SOURCE_RERUN, SOURCE_SCHEDULE, Run
from app.runs.store import (
    CREATED,
    INLINE_WORKFLOW_KEY,
    JOINED,
    REJOINED,
    STORED_BY_KEY,
    STORED_NEW,
    IdempotencyConflict,
    NewRun,
    QueueFull,
    RunStore,
    TargetBusy,
)
from connectors import tracing
from connectors.failures import RetryPolicy
from connectors.pipeline import Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from flows.outcome import CANCELLED, COMPLETED, QUEUED, RunError
from flows.prefect import contract
from flows.prefect.contract import FLOW_NAME, WORKFLOW_DEPLOYMENT, WORKFLOW_FLOW_NAME
from flows.workflow_registry import WorkflowRegistry
from flows.workflow_spec import WorkflowSpec

log = logging.getLogger(__name__)

NOT_CONFIGURED = "prefect_not_configured"
# A waiting caller's run is read again at most this long after the last read (one read of its flow run from
# Prefect per poll on that path, ~10 ms of the Prefect server's CPU): the caller learns of the end ~0.12 s
# later on average.
WAIT_POLL_MAX_SECONDS = 0.25


@dataclass(frozen=True)
class SlotRun:
    """A schedule's due slot, as the scheduler hands it over."""

    kind: str  # connector or workflow
    target: str
    slot: datetime
    record: dict[str, Any]  # the schedule it came from, as stored on the run
    callback_url: str | None
    done_until: datetime  # the schedule's progress as the scheduler read it
    skip_if_waiting: bool  # catch_up latest/none: a slot coming while a run waits is skipped; all: it waits too


class Triggered(NamedTuple):
    """What a trigger came to: its run, whether this call created it, and whether its conflict policy joined it
    to an active run (neither: its idempotency key named a run already stored)."""

    run: Run
    created: bool
    joined: bool = False


class Skipped(Exception):
    """A trigger with `on_conflict: skip` found its target busy: nothing was started (not an error: a 200)."""

    def __init__(self, busy: TargetBusy):
        super().__init__(str(busy))
        self.run_id = busy.run_id


class Dispatcher:
    """The one place that knows how a trigger becomes a run and which backend answers for it; views only call it."""

    def __init__(self, settings: Settings, store: RunStore, registry: ConnectorRegistry, workspace: Workspace,
                 local: LocalBackend, prefect: PrefectBackend, workflows: WorkflowRegistry | None = None):
        self.settings = settings
        self.workflows = workflows or WorkflowRegistry({})
        self.store = store
        self.registry = registry
        self.workspace = workspace
        self.local = local
        self.prefect = prefect

    # --- triggering -------------------------------------------------------------------------

    def trigger_connector(self, connector_id: str, params: dict[str, Any], backend: str | None = None,
                          idempotency_key: str | None = None, callback_url: str | None = None,
                          retry: RetryPolicy | None = None, on_conflict: str | None = None,
                          **origin: Any) -> Triggered:
        """Validate, store and dispatch a connector run; what it came to (Skipped when its conflict policy skips).
        `retry`, `on_conflict`: this call's, else the connector's; `origin`: NewRun's `source` and `rerun_of`."""
        with tracing.tracer().start_as_current_span("dispatch", attributes={"flowgate.kind": "connector",
                                                                            "flowgate.target": connector_id}):
            mode = backend or self.settings.backend
            new, deployment_id = self._connector_run(connector_id, params, mode, idempotency_key, callback_url)
            new = replace(new, retry=retry or new.retry, on_conflict=on_conflict or new.on_conflict, **origin)
            return self._store_and_dispatch(new, deployment_id, forced=mode == "prefect")

    def trigger_workflow(self, spec: WorkflowSpec, inputs: dict[str, Any], mode: str, backend: str | None = None,
                         idempotency_key: str | None = None, callback_url: str | None = None,
                         file_definition: dict[str, Any] | None = None,
                         retry: RetryPolicy | None = None, on_conflict: str | None = None,
                         **origin: Any) -> Triggered:
        """Store and dispatch a workflow run; the definition travels with the run, so any process can run it.
        What it came to, as trigger_connector says (Skipped when its conflict policy skips).

        `file_definition`: the workflow as its file says it (`${VAR}`s unresolved), stored instead of `spec`."""
        with tracing.tracer().start_as_current_span("dispatch", attributes={"flowgate.kind": "workflow",
                                                                            "flowgate.target": spec.id}):
            return self._trigger_workflow(spec, inputs, mode, backend, idempotency_key, callback_url, file_definition,
                                          retry, on_conflict, **origin)

    def _trigger_workflow(self, spec: WorkflowSpec, inputs: dict[str, Any], mode: str, backend: str | None,
                          idempotency_key: str | None, callback_url: str | None,
                          file_definition: dict[str, Any] | None, retry: RetryPolicy | None,
                          on_conflict: str | None, **origin: Any) -> Triggered:
        chosen = backend or self.settings.backend
        new, deployment_id = self._workflow_run(spec, inputs, mode, chosen, idempotency_key, callback_url,
                                                file_definition)
        new = replace(new, retry=retry or new.retry, on_conflict=on_conflict or new.on_conflict, **origin)
        return self._store_and_dispatch(new, deployment_id, forced=chosen == "prefect")

    def fire_slot(self, slot: SlotRun) -> tuple[str, Run | None]:
        """Store and dispatch the run of a schedule's slot as a trigger would be (Prefect when it can take it,
        local otherwise, the reason recorded), unless another process dealt with the slot: see
        RunStore.create_slot_run for what the answer says."""
        mode = self.settings.backend
        if slot.kind == "connector":
            new, deployment_id = self._connector_run(slot.target, {}, mode, None, slot.callback_url)
        else:
            spec = self.workflows.get(slot.target)
            if spec is None:
                raise NotFound(f"no workflow '{slot.target}'", code="workflow_not_found")
            new, deployment_id = self._workflow_run(spec, {}, "optimized", mode, None, slot.callback_url,
                                                    self.workflows.definition(spec.id))
        new = replace(new, max_queued=None, source=SOURCE_SCHEDULE, scheduled_for=slot.slot, schedule=slot.record)
        what, run = self.store.create_slot_run(new, slot.done_until, skip_if_waiting=slot.skip_if_waiting)
        if what == CREATED and run is not None:  # CREATED comes with its run
            run = self._dispatch(run, deployment_id, forced=mode == "prefect")
        return what, run

    def adopt_flow_run(self, flow_run: dict[str, Any]) -> Run | None:
        """A run for a connector flow run someone started in Prefect (its UI, CLI or API), not the gateway: found by
        its flow run id from then on, followed to its end like any Prefect run. None when it is the gateway's
        (tagged with its run), was adopted before, or names no connector this gateway has.

        The flow run's id is the run's idempotency key: two processes adopting it at once make one run."""
        if contract.tagged_run_id(list(flow_run.get("tags") or [])):
            return None
        parameters = flow_run.get("parameters") or {}
        spec = self.registry.get(str(parameters.get("connector_id")))
        if spec is None:
            return None
        flow_run_id = str(flow_run["id"])
        run, created = self.store.create_run(NewRun(
            kind="connector", target=spec.id, params=parameters.get("params") or {}, backend="prefect",
            concurrency_key=concurrency_key(spec, self.workspace), callback_url=spec.callback_url,
            idempotency_key=contract.adopted_run_key(flow_run_id), source=SOURCE_PREFECT, triggered_by="prefect",
            prefect_flow_run_id=flow_run_id))
        if not created:
            return None
        log.info("adopted flow run %s (%s), started in Prefect, as run %s", flow_run["id"], flow_run.get("name"),
                 run.id, extra={"run_id": run.id})
        return self.prefect.apply_flow_run(run, flow_run)

    def _connector_run(self, connector_id: str, params: dict[str, Any], mode: str, idempotency_key: str | None,
                       callback_url: str | None) -> tuple[NewRun, str | None]:
        spec = self.registry.get(connector_id)
        if spec is None:
            raise NotFound(f"no connector '{connector_id}'", code="connector_not_found")
        try:
            spec.with_params(params)
        except ParamsError as exc:
            raise ValidationFailed.of_field(exc.field, exc.message) from None
        deployment_id, reason = self._choose(connector_id, mode)
        return NewRun(kind="connector", target=connector_id, params=params,
                      backend="prefect" if deployment_id else "local",
                      concurrency_key=concurrency_key(spec, self.workspace), fallback_reason=reason,
                      idempotency_key=idempotency_key, callback_url=callback_url,
                      max_queued=self.settings.max_queued_per_target, trace_context=_trace_context(),
                      retry=spec.retry, on_conflict=spec.on_conflict), deployment_id

    def _workflow_run(self, spec: WorkflowSpec, inputs: dict[str, Any], mode: str, backend: str,
                      idempotency_key: str | None, callback_url: str | None,
                      file_definition: dict[str, Any] | None) -> tuple[NewRun, str | None]:
        deployment_id, reason = self._choose(WORKFLOW_DEPLOYMENT, backend, flow_name=WORKFLOW_FLOW_NAME)
        # on_conflict says how this trigger meets an active run, not what runs: an inline definition is stored (and
        # fingerprinted for its Idempotency-Key) as it was before workflows had one.
        params = {"inputs": inputs, "mode": mode, "from_file": file_definition is not None,
                  "workflow": file_definition or spec.model_dump(mode="json",
                                                                 exclude={"schedule", "callback_url", "on_conflict"})}
        return self._new_workflow_run(spec.id, params, deployment_id, reason, idempotency_key, callback_url,
                                      retry=spec.retry, on_conflict=spec.on_conflict), deployment_id

    def _new_workflow_run(self, workflow_id: str, params: dict[str, Any], deployment_id: str | None,
                          reason: str | None, idempotency_key: str | None, callback_url: str | None,
                          **more: Any) -> NewRun:
        # Workflow runs do not wait for each other: a key of their own. An inline one's says so (the queue limit).
        prefix = "workflow-run:" if params.get("from_file") else INLINE_WORKFLOW_KEY
        return NewRun(kind="workflow", target=workflow_id, params=params,
                      backend="prefect" if deployment_id else "local",
                      concurrency_key=f"{prefix}{uuid.uuid4().hex}", fallback_reason=reason,
                      idempotency_key=idempotency_key, callback_url=callback_url,
                      max_queued=self.settings.max_queued_per_target, trace_context=_trace_context(), **more)

    # --- reruns -----------------------------------------------------------------------------

    def rerun(self, source: Run, params: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
              from_failed: bool = False, idempotency_key: str | None = None,
              triggered_by: str | None = None) -> tuple[Run, bool]:
        """A new run (`source: rerun`, `rerun_of`) of what an ended run ran, with its retry policy and labels: a
        connector's params (`params` over them), a workflow's definition and inputs (`inputs` over them). With
        `from_failed`, a workflow's completed nodes are not executed again: their outputs are the source run's."""
        if not source.is_terminal:
            raise Conflict(f"run '{source.id}' has not ended ({source.status}): nothing to rerun yet",
                           code="run_not_ended", run_status=source.status)
        retry = RetryPolicy.model_validate(source.retry_policy) if source.retry_policy else None
        origin: dict[str, Any] = {"source": SOURCE_RERUN, "rerun_of": source.id, "triggered_by": triggered_by,
                                  "labels": source.labels}
        if source.kind == "connector":
            if inputs is not None or from_failed:
                field = "inputs" if inputs is not None else "from"
                raise ValidationFailed.of_field(field, "is for a workflow run; a connector run takes `params`")
            run, created, _ = self.trigger_connector(source.target, {**source.params, **(params or {})},
                                                     idempotency_key=idempotency_key, retry=retry,
                                                     on_conflict="queue", **origin)
            return run, created
        if params is not None:
            raise ValidationFailed.of_field("params", "is for a connector run; a workflow run takes `inputs`")
        run_params = {key: value for key, value in source.params.items() if key != "reuse"}
        run_params["inputs"] = {**(source.params.get("inputs") or {}), **(inputs or {})}
        if from_failed:
            if source.status == COMPLETED:
                raise Conflict(f"run '{source.id}' completed: no failed node to rerun from", code="run_not_failed")
            run_params["reuse"] = {node["id"]: node.get("output") for node in self.store.nodes.read(source.id) or ()
                                   if node.get("status") == COMPLETED}
            size = len(json.dumps(run_params["reuse"], default=str))
            if size > self.settings.max_output_bytes:
                raise ValidationFailed.of_field("from", f"the completed nodes' outputs are {size} bytes as JSON, more "
                                                        "than FLOWGATE_MAX_OUTPUT_BYTES: rerun from the start")
        mode = self.settings.backend
        deployment_id, reason = self._choose(WORKFLOW_DEPLOYMENT, mode, flow_name=WORKFLOW_FLOW_NAME)
        new = self._new_workflow_run(source.target, run_params, deployment_id, reason, idempotency_key, None,
                                     retry=retry, **origin)
        run, created, _ = self._store_and_dispatch(new, deployment_id, forced=mode == "prefect")
        return run, created

    def rerun_many(self, runs: list[Run], dry_run: bool,
                   triggered_by: str | None = None) -> list[tuple[Run, Run | Problem | None, bool]]:
        """Rerun each of `runs` (dry_run: none), at most once per source run, however often asked: the rerun's
        idempotency key names its source. Returns (source, its rerun, or why it could not be, or None; whether
        this call started it)."""
        done: list[tuple[Run, Run | Problem | None, bool]] = []
        for source in runs:
            if dry_run:
                done.append((source, None, False))
                continue
            try:
                rerun, created = self.rerun(source, idempotency_key=f"rerun-of:{source.id}",
                                            triggered_by=triggered_by)
            except Problem as problem:  # e.g. its connector is no longer configured: the others still rerun
                done.append((source, problem, False))
                continue
            done.append((source, rerun, created))
        return done

    def _choose(self, deployment: str, mode: str, flow_name: str = FLOW_NAME) -> tuple[str | None, str | None]:
        """(deployment id, None) to use Prefect, or (None, why not) to run locally."""
        if mode == "local":
            return None, None
        route = self.prefect.route
        if route is None:
            if mode == "prefect":
                raise Unavailable("backend 'prefect' was requested but PREFECT_API_URL is not set",
                                  code="prefect_unavailable", reason=NOT_CONFIGURED)
            return None, NOT_CONFIGURED
        chosen = route.route(deployment, flow_name)
        if not chosen.ok and mode == "prefect":
            raise Unavailable(f"backend 'prefect' was requested but Prefect cannot take the run: {chosen.detail}",
                              code="prefect_unavailable", reason=chosen.reason)
        return chosen.deployment_id, chosen.reason

    def _store_and_dispatch(self, new: NewRun, deployment_id: str | None, forced: bool) -> Triggered:
        """Store the run (or find the one its idempotency key names, or the active one its conflict policy joins),
        then hand a new one to its backend."""
        try:
            run, how = self.store.store_run(new)
        except IdempotencyConflict as exc:
            raise Conflict(str(exc), code="idempotency_key_reused", run_id=exc.run_id) from None
        except QueueFull as exc:
            raise TooManyRequests(f"{exc} (FLOWGATE_MAX_QUEUED_PER_TARGET)", code="queue_full",
                                  headers={"Retry-After": "30"}) from None
        except TargetBusy as exc:
            skipped = exc.policy == "skip"
            TRIGGERS.labels(new.kind, new.backend, "skipped" if skipped else "rejected").inc()
            if skipped:
                raise Skipped(exc) from None
            raise Conflict(str(exc), code="run_in_progress", run_id=exc.run_id) from None
        span = trace.get_current_span()  # the dispatch span
        span.set_attribute(tracing.RUN_ID, run.id)
        if how != STORED_NEW:
            duplicate = how in (STORED_BY_KEY, REJOINED)  # a retry: its first answer counted it already
            TRIGGERS.labels(run.kind, run.backend, "duplicate" if duplicate else "joined").inc()
            span.set_attribute("flowgate.duplicate" if duplicate else "flowgate.joined", True)
            return Triggered(run, created=False, joined=how in (JOINED, REJOINED))
        return Triggered(self._dispatch(run, deployment_id, forced), created=True)

    def _dispatch(self, run: Run, deployment_id: str | None, forced: bool) -> Run:
        """Hand a new stored run to its backend."""
        if deployment_id:
            run = self._submit_to_prefect(run, deployment_id, forced)
        else:
            run = self.local.submit(run)
        trace.get_current_span().set_attributes({"flowgate.backend": run.backend,
                                                 "flowgate.fallback_reason": run.fallback_reason or ""})
        self._accepted(run)
        return run

    def _submit_to_prefect(self, run: Run, deployment_id: str, forced: bool) -> Run:
        try:
            return self.prefect.submit(run, deployment_id)
        except PrefectError as exc:  # Prefect certainly did not create it: it may run elsewhere
            if forced:
                self.store.fail(run.id, RunError("prefect_create_failed", exc.message))
                raise Unavailable(f"Prefect failed to create the flow run: {exc.message}",
                                  code="prefect_unavailable", run_id=run.id) from None
            log.warning("creating a flow run for %s failed (%s); running it locally", run.id, exc.message)
            # A create refused at the connection (the server died since the last probe) says why: Prefect is
            # unreachable; any other failure of the create itself is prefect_create_failed.
            reason = "prefect_unreachable" if exc.reason == "prefect_unreachable" else "prefect_create_failed"
            return self.local.submit(self.store.fall_back_to_local(run.id, reason) or run)

    def _accepted(self, run: Run) -> None:
        TRIGGERS.labels(run.kind, run.backend, "accepted").inc()
        if run.fallback_reason:
            FALLBACKS.labels(run.fallback_reason).inc()
        log.info("run %s accepted: %s %s on %s%s%s", run.id, run.kind, run.target, run.backend,
                 f" ({run.fallback_reason})" if run.fallback_reason else "",
                 f", the slot of {run.scheduled_for.isoformat()}" if run.scheduled_for else "",
                 extra={"run_id": run.id})

    # --- following --------------------------------------------------------------------------

    def backend_for(self, run: Run) -> Backend:
        """The backend that answers for `run` (a run Prefect never created a flow run for is the store's alone)."""
        return self.prefect if run.backend == "prefect" and run.prefect_flow_run_id else self.local

    def refresh(self, run: Run) -> Run:
        """The run with its state brought up to date from its backend."""
        return self.backend_for(run).refresh(run)

    def cancel(self, run_id: str) -> Run | None:
        """Cancel a run on its backend; None if unknown. A queued run ends here and now: counted as ended (a
        running one is counted by whoever records its end)."""
        run = self.store.get(run_id)
        if run is None:
            return None
        cancelled = self.backend_for(run).cancel(run)
        if run.status == QUEUED and cancelled is not None and cancelled.status == CANCELLED:
            observe_run_end(run.kind, run.target, CANCELLED, None, None, backend=run.backend)
        return cancelled

    def wait_for_end(self, run_id: str, timeout: float) -> Run:
        """Poll until the run ends or `timeout` passes; returns the latest state either way."""
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            run = self.refresh(self.store.get_one(run_id))
            if run.is_terminal or time.monotonic() >= deadline:
                return run
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            interval = min(interval * 1.5, WAIT_POLL_MAX_SECONDS)


def _trace_context() -> dict[str, str]:
    """The context a new run continues: the dispatch span's (the request's trace), or a new trace when there is
    none (a trigger from outside a request)."""
    return tracing.carrier() or tracing.carrier(tracing.new_trace())
