"""Following Prefect runs in the background: one batched call brings every unfinished run up to date, runs no
worker picked up (or started) are taken back, runs whose flow run's process is gone are ended, runs whose flow run
is unconfirmed are settled, overdue runs are ended."""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from app.backends.prefect import WORKER_RUN_STORE_MISMATCH, PrefectBackend
from app.backends.prefect_client import PrefectError, is_claim
from app.metrics import FALLBACKS, observe_run_end
from app.runs.models import SOURCE_PREFECT, Run, utcnow
from flows.loop import Loop
from flows.outcome import CANCELLED, CRASHED, QUEUED, RunError
from flows.prefect import contract
from flows.prefect.contract import FLOW_NAME, WORKFLOW_DEPLOYMENT, WORKFLOW_FLOW_NAME
from flows.run_lease import held_by_flow_run

log = logging.getLogger(__name__)

ADOPT_PAGE, ADOPT_PAGES = 200, 10  # flow runs read per call, and calls at most per adoption pass
ADOPT_OVERLAP = timedelta(seconds=60)
_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")  # Prefect's terminal state types


class PrefectSync(Loop):
    """One per gateway process, every `every` seconds; every process's sync may act on any run, each change is a
    store transition."""

    def __init__(self, backend: PrefectBackend, pickup_seconds: float = 30.0, give_up_seconds: float = 60.0,
                 every: float = 2.0, adopt: Callable[[dict[str, Any]], Run | None] | None = None,
                 adopt_every: int = 5, adopt_within_seconds: float = 3600.0, start_seconds: float = 300.0):
        super().__init__("prefect-sync", every)
        self.backend = backend
        self.store = backend.store
        self.pickup_seconds = pickup_seconds
        # A flow run a worker claimed (Pending) that has not started this long after is taken back.
        self.start_seconds = start_seconds
        # A run whose flow run Prefect neither confirms nor denies for this long (it is unreachable) runs locally.
        self.give_up_seconds = give_up_seconds
        # Flow runs of the connector flow that someone started in Prefect: looked for every `adopt_every` passes,
        # among those due in the last `adopt_within_seconds` (a gateway down longer does not adopt older ones).
        self.adopt = adopt
        self.adopt_every = adopt_every
        self.adopt_within = timedelta(seconds=adopt_within_seconds)
        self._passes = 0
        self._adopted_until: datetime | None = None  # flow runs due before this were looked at

    @property
    def enabled(self) -> bool:
        """Follow unfinished Prefect runs in the background, so their records end even if nobody asks; only where
        Prefect is configured."""
        return self.backend.route is not None

    def run_once(self) -> None:
        try:
            self._passes += 1
            if (self._passes - 1) % self.adopt_every == 0:  # the first pass, then every adopt_every-th
                self.adopt_once()
            self.sync_once()
        except PrefectError as exc:
            log.info("syncing Prefect runs failed: %s", exc.message)

    def adopt_once(self) -> list[Run]:
        """A run for each connector flow run started in Prefect (not by a gateway) that has none yet; returns the
        runs made. A flow run due later (scheduled ahead in Prefect's UI) is adopted once it is due."""
        if self.adopt is None or not self.backend.available:
            return []
        now = utcnow()
        # After the first pass, only what came due since the last one (a minute's overlap for a slow pass); paged,
        # so a busy hour of the gateway's own flow runs cannot hide one started by hand.
        since = max(now - self.adopt_within, self._adopted_until - ADOPT_OVERLAP) if self._adopted_until else \
            now - self.adopt_within
        flow_runs = []
        for page in range(ADOPT_PAGES):
            found = self.backend.client.flow_runs_due_between(FLOW_NAME, since, now, limit=ADOPT_PAGE,
                                                              offset=page * ADOPT_PAGE)
            flow_runs += [run for run in found if not contract.tagged_run_id(list(run.get("tags") or []))]
            if len(found) < ADOPT_PAGE:
                break
        keyed = {(str((flow_run.get("parameters") or {}).get("connector_id")),
                  contract.adopted_run_key(str(flow_run["id"]))): flow_run for flow_run in flow_runs}
        taken = self.store.keys_taken("connector", list(keyed))
        adopted = [self.adopt(flow_run) for (_, key), flow_run in keyed.items() if key not in taken]
        self._adopted_until = now
        return [run for run in adopted if run is not None]

    def end_overdue_runs(self) -> list[Run]:
        """Prefect runs unfinished past FLOWGATE_RUN_TIMEOUT_SECONDS end as failed here (and are cancelled there,
        if Prefect answers): a Prefect that vanished for good must not leave runs open forever."""
        timeout = self.backend.run_timeout_seconds
        overdue = self.store.fail_overdue("prefect", utcnow() - timedelta(seconds=timeout), RunError.timed_out(timeout))
        for run in overdue:
            log.warning("Prefect run %s timed out after %g s", run.id, timeout, extra={"run_id": run.id})
            if run.prefect_flow_run_id and self.backend.available:
                try:
                    self.backend.client.cancel_flow_run(run.prefect_flow_run_id)
                except PrefectError as exc:
                    log.info("cancelling timed-out flow run %s failed: %s", run.prefect_flow_run_id, exc.message)
        return overdue

    def sync_once(self) -> int:
        """Bring every unfinished Prefect run up to date with one call to Prefect; returns how many changed."""
        self.end_overdue_runs()
        timeout = self.backend.client.timeout if self.backend.route is not None else 2.0
        # An answer still on its way is given its worst case (two creates of three tries each) before the run is
        # looked for.
        self.settle_undispatched(older_than_seconds=2 * (3 * timeout + 0.7) + 1)
        runs = {run.prefect_flow_run_id: run for run in self.store.unfinished("prefect") if run.prefect_flow_run_id}
        if not runs or not self.backend.available:
            return 0
        changed = 0
        now = utcnow()
        picked_up_before = now - timedelta(seconds=self.pickup_seconds)
        started_before = now - timedelta(seconds=self.start_seconds)
        for flow_run in self.backend.client.read_flow_runs(list(runs)):
            run = runs.get(str(flow_run["id"]))
            if run is None:
                continue
            waiting_since = run.next_attempt_at or run.created_at  # a retry's flow run is made when it is due
            if run.status == QUEUED and waiting_since < picked_up_before and _unpicked(flow_run):
                changed += self._reclaim(run, flow_run)
            elif _process_gone(run, flow_run, now):
                changed += self._end_gone(run, flow_run)
            elif (run.status == QUEUED and run.lease_owner is None and run.source != SOURCE_PREFECT
                  and _unstarted(flow_run, started_before)):  # an adopted flow run takes no lease: no fence
                changed += self._take_back_unstarted(run, flow_run)
            elif self.backend.apply_flow_run(run, flow_run) is not run:
                changed += 1
        return changed

    def _end_gone(self, run: Run, flow_run: dict[str, Any]) -> int:
        """The flow run took its run's lease and let it lapse, and Prefect still shows it unfinished: its process
        is gone (killed, or exited while the Prefect server was down), and nobody will report its end. The run ends
        crashed, as a flow run Prefect saw crash does (or its retry policy queues the next attempt; one asked to
        cancel ends cancelled); Prefect is told, best effort. Only a fresh read of the flow run counts (a Prefect
        that cannot be read leaves the run as it is: only Prefect knows whether it completed before its process
        went)."""
        flow_run_id = str(flow_run["id"])
        state = flow_run.get("state") or {}
        message = (f"the flow run's process is gone: its lease on the run lapsed at {run.lease_expires_at:%H:%M:%S} "
                   f"UTC while Prefect still showed it {state.get('name') or state.get('type')}, and nobody reported "
                   f"its end")
        cancelled = run.cancel_requested or state.get("type") == "CANCELLING"  # asked to stop, and stopped
        ended = self.store.end_lapsed_flow_run(run.id, str(run.lease_owner), RunError("cancelled", message)
                                               if cancelled else RunError("prefect_crashed", message,
                                                                          failure_class="crashed"),
                                               status=CANCELLED if cancelled else CRASHED)
        if ended is None:  # renewed, ended or moved meanwhile
            return 0
        log.warning("run %s: %s; %s", run.id, message, "its next attempt is queued" if ended.status == QUEUED
                    else f"ended {ended.status}", extra={"run_id": run.id})
        if ended.is_terminal:
            observe_run_end(ended.kind, ended.target, ended.status, ended.started_at, ended.finished_at,
                            backend="prefect")
        try:
            if state.get("type") == "CANCELLING":  # the only way Prefect lets it go
                self.backend.client.end_cancelling_flow_run(flow_run_id, f"flowgate: {message}")
            else:
                self.backend.client.crash_flow_run(flow_run_id, f"flowgate: {message}")
        except PrefectError as exc:
            log.info("marking flow run %s crashed failed: %s", flow_run_id, exc.message)
        return 1

    def _take_back_unstarted(self, run: Run, flow_run: dict[str, Any]) -> int:
        """A worker claimed the flow run (PENDING) and it did not start within FLOWGATE_PREFECT_START_SECONDS: the
        worker died or froze, or the Prefect server lost the submission. The run goes local under the same run id,
        only while no flow run took its lease (the fence: a flow run starting now finds its run local and does not
        execute; one that took the lease first keeps it); the flow run is closed in Prefect second, best effort."""
        flow_run_id = str(flow_run["id"])
        moved = self.store.fall_back_to_local(run.id, "prefect_not_started", prefect_state="Cancelled")
        if moved is None:
            log.info("run %s started on Prefect (or changed) as its start deadline passed; it stays there", run.id)
            return 0
        FALLBACKS.labels("prefect_not_started").inc()
        log.warning("run %s: flow run %s was claimed by a worker but not started within %g s; running it locally",
                    run.id, flow_run_id, self.start_seconds, extra={"run_id": run.id})
        try:
            self.backend.client.close_reclaimed_flow_run(
                flow_run_id, f"claimed by a worker but not started within {self.start_seconds:g} s; flowgate runs "
                             f"it locally")
        except PrefectError as exc:
            log.warning("closing flow run %s failed (%s); a worker that starts it finds its run local and does not "
                        "execute it", flow_run_id, exc.message)
        return 1

    def _reclaim(self, run: Run, flow_run: dict[str, Any]) -> int:
        """No worker picked the flow run up within FLOWGATE_PREFECT_PICKUP_SECONDS: claim it the way a worker
        would (PENDING, which Prefect grants once), close it, and run it locally under the same run id. When a
        worker wins the claim, the run stays on Prefect."""
        flow_run_id = str(flow_run["id"])  # the run's
        # A gateway claimed it, then died (or lost Prefect) before closing it: ours now (Prefect refuses a worker's
        # PENDING over it), unless the claim had come after a worker's whole run, whose end was never restored.
        state = flow_run.get("state") or {}
        if is_claim(state):
            ours = self.backend.client.keep_claim(flow_run_id, state.get("id"))
        else:
            ours = self.backend.client.claim_flow_run(flow_run_id)
        if not ours:
            log.info("a worker picked up %s as its pickup deadline passed; it stays on Prefect", run.id)
            return 0
        # Ours now (no worker can take a flow run out of PENDING): the run goes local first, so nothing that reads
        # the flow run meanwhile can record it as cancelled; closing it in Prefect comes second, best effort.
        moved = self.store.fall_back_to_local(run.id, "prefect_not_picked_up", prefect_state="Cancelled")
        if moved is not None:
            FALLBACKS.labels("prefect_not_picked_up").inc()
        log.warning("run %s: no worker picked up flow run %s within %g s; running it locally", run.id, flow_run_id,
                    self.pickup_seconds, extra={"run_id": run.id})
        try:
            self.backend.client.close_reclaimed_flow_run(
                flow_run_id, f"no worker picked it up within {self.pickup_seconds:g} s; flowgate runs it locally")
        except PrefectError as exc:
            log.warning("closing reclaimed flow run %s failed (%s); it stays pending in Prefect, where no worker can "
                        "take it", flow_run_id, exc.message)
        return int(moved is not None)

    def awaiting_pickup(self) -> dict[str, Any]:
        """For readiness: Prefect runs no worker has picked up yet, and the oldest one's wait."""
        waiting = [run for run in self.store.unfinished("prefect") if run.status == QUEUED]
        oldest = min((run.created_at for run in waiting), default=None)
        return {"runs_awaiting_pickup": len(waiting),
                "oldest_wait_seconds": round((utcnow() - oldest).total_seconds(), 1) if oldest else None,
                "pickup_deadline_seconds": self.pickup_seconds, "start_deadline_seconds": self.start_seconds}

    def run_store_warning(self) -> dict[str, Any]:
        """For readiness: a warning when a flow run of the last hour found no run in its worker's run store, which
        this gateway's holds: the workers' DATABASE_URL is not this gateway's, and their flows refuse every run."""
        run = self.store.last_ended_with(WORKER_RUN_STORE_MISMATCH, utcnow() - timedelta(hours=1))
        if run is None:
            return {}
        return {"warning": f"the Prefect workers' run store is not this gateway's (their DATABASE_URL): the flow run "
                           f"of run {run.id} found no such run there and did not execute "
                           f"({run.finished_at:%Y-%m-%d %H:%M:%S} UTC)"}

    def settle_undispatched(self, older_than_seconds: float) -> list[Run]:
        """Runs accepted for Prefect without a flow run on record (their create went unanswered, or the process
        died between storing and creating): find the flow run by the run's tag, or create it (same idempotency
        key, so never twice); a run Prefect cannot take goes local. Returns the runs that changed."""
        settled = []
        now = utcnow()
        for run in self.store.undispatched("prefect", now - timedelta(seconds=older_than_seconds)):
            # A retry's flow run carries its attempt's tag: the run's own tag also finds the failed attempts'.
            tag = contract.attempt_tag(run.id, run.attempt) if (run.attempt or 1) > 1 else contract.run_tag(run.id)
            waited_since = run.next_attempt_at or run.created_at
            try:
                flow_run = self.backend.client.find_flow_run(tag) if self.backend.route is not None else None
                if flow_run is not None:
                    settled.append(self.backend.record_flow_run(run, flow_run))
                    continue
                deployment, flow_name = (run.target, FLOW_NAME) if run.kind == "connector" else \
                    (WORKFLOW_DEPLOYMENT, WORKFLOW_FLOW_NAME)
                route = self.backend.route.route(deployment, flow_name) if self.backend.route is not None else None
                if route is not None and route.deployment_id is not None:  # route.ok
                    settled.append(self.backend.submit(run, deployment_id=route.deployment_id))
                    continue
                reason = (route.reason if route is not None else None) or "prefect_not_configured"
                if (now - waited_since).total_seconds() < self.give_up_seconds:
                    continue  # a create still in flight may yet land: only a run this old goes local
            except PrefectError as exc:
                self.backend.note_failure(exc)
                if (now - waited_since).total_seconds() < self.give_up_seconds:
                    continue  # Prefect may hold it: ask again on the next sync
                reason = "prefect_create_failed"
            changed = self.store.fall_back_to_local(run.id, reason)
            if changed is None:  # a flow run of it took its lease (it executes there), or it ended meanwhile
                log.info("run %s stays on Prefect: a flow run of it holds it (or it ended meanwhile)", run.id,
                         extra={"run_id": run.id})
                continue
            log.warning("run %s was never handed to Prefect (%s); running it locally", run.id, reason,
                        extra={"run_id": run.id})
            settled.append(changed)
        return settled


def _process_gone(run: Run, flow_run: dict[str, Any], now: datetime) -> bool:
    """The flow run took its run's lease, which then lapsed (by this host's clock: the store checks the database's),
    while Prefect shows the flow run unfinished."""
    state_type = (flow_run.get("state") or {}).get("type")
    return (state_type not in _ENDED and held_by_flow_run(run.lease_owner, str(flow_run["id"]))
            and run.lease_expires_at is not None and run.lease_expires_at < now)


def _unstarted(flow_run: dict[str, Any], claimed_before: datetime) -> bool:
    """Claimed by a worker (PENDING, not a gateway's claim) before `claimed_before` and not running since."""
    state = flow_run.get("state") or {}
    if state.get("type") != "PENDING" or is_claim(state) or not state.get("timestamp"):
        return False
    return datetime.fromisoformat(str(state["timestamp"]).replace("Z", "+00:00")) < claimed_before


def _unpicked(flow_run: dict[str, Any]) -> bool:
    """Scheduled (Late included) and never claimed by a worker; or claimed by a gateway that then died."""
    state = flow_run.get("state") or {}
    return state.get("type") == "SCHEDULED" or is_claim(state)

