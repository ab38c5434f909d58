"""The only module that talks to the Prefect REST API: one pooled httpx client per process, short timeouts."""
from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx

from connectors.outbound import tls_context

CLAIM_MESSAGE = "taken back by flowgate: no worker picked it up"  # marks the PENDING state a gateway claims with


def count_alive(workers: list[dict[str, Any]], max_age_seconds: float) -> int:
    """How many of `workers` sent a heartbeat within `max_age_seconds`. Prefect itself counts a hung worker
    ONLINE until its heartbeat is ~90 s old; runs handed to it meanwhile would wait for nobody."""
    now = time.time()
    return sum(1 for worker in workers if worker.get("status") == "ONLINE" and worker.get("last_heartbeat_time")
               and now - datetime.fromisoformat(worker["last_heartbeat_time"].replace("Z", "+00:00")).timestamp()
               <= max_age_seconds)


def is_claim(state: dict[str, Any]) -> bool:
    """Whether `state` is a gateway's claim of its flow run (named "Reclaimed" by flowgate before 2026-12)."""
    return state.get("type") == "PENDING" and (state.get("message") == CLAIM_MESSAGE
                                               or state.get("name") == "Reclaimed")


class PrefectError(Exception):
    """Prefect refused or failed a request; `reason` is a short stable code."""

    reason = "prefect_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class PrefectUnavailable(PrefectError):
    """Prefect could not be reached or answered 5xx: a retry later may work.

    `maybe_done`: the request reached Prefect (a timeout waiting for the answer, a 5xx), so a write may have
    happened; False only when it never left (no connection), so nothing can have changed there.
    """

    reason = "prefect_unreachable"

    def __init__(self, message: str, maybe_done: bool = True):
        super().__init__(message)
        self.maybe_done = maybe_done


class PrefectNotFound(PrefectError):
    """The object asked for does not exist in Prefect."""

    reason = "not_found"


class PrefectClient:
    """Thin, typed calls on Prefect's REST API; transport errors become PrefectUnavailable."""

    def __init__(self, api_url: str, api_key: str | None = None, timeout: float = 2.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.api_url + "/", headers=headers, verify=tls_context(),
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)),
                                  limits=httpx.Limits(max_connections=20, max_keepalive_connections=10))

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        # A server that answers 5xx (e.g. its SQLite database is busy) gets two quick retries; every call
        # here is safe to repeat (reads, or creates with an idempotency key). A server that does not
        # answer at all gets none: a dead Prefect must cost the caller one timeout, not three.
        for delay in (0.2, 0.5, None):
            try:
                response = self._http.request(method, path.lstrip("/"), **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise PrefectUnavailable(f"{type(exc).__name__}: {exc or 'no connection'}", maybe_done=False) from None
            except httpx.TransportError as exc:
                raise PrefectUnavailable(f"{type(exc).__name__}: {exc or 'no answer'}") from None
            if response.status_code < 500 or delay is None:
                break
            time.sleep(delay)
        if response.status_code == 404:
            raise PrefectNotFound(f"{method} {path}: not found")
        if response.status_code >= 500:
            raise PrefectUnavailable(f"{method} {path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise PrefectError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # a proxy's HTML page, a half-written body: not Prefect's answer
            raise PrefectUnavailable(f"{method} {path}: HTTP {response.status_code} with a body that is not JSON") \
                from None

    def health(self) -> float:
        """Probe the API; returns the latency in milliseconds."""
        started = time.perf_counter()
        self._request("GET", "health")
        return (time.perf_counter() - started) * 1000

    def read_deployment(self, flow_name: str, deployment_name: str) -> dict[str, Any]:
        """The deployment `flow_name/deployment_name` (PrefectNotFound when missing)."""
        return self._request("GET", f"deployments/name/{flow_name}/{deployment_name}")

    def workers(self, work_pool: str) -> list[dict[str, Any]]:
        """The workers of `work_pool`, with their status and last heartbeat (PrefectNotFound: no such pool)."""
        return self._request("POST", f"work_pools/{work_pool}/workers/filter", json={})



    def create_flow_run(self, deployment_id: str, parameters: dict[str, Any], idempotency_key: str,
                        tags: list[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create a flow run from a deployment; the same idempotency key returns the same flow run."""
        body = {"parameters": parameters, "idempotency_key": idempotency_key, "tags": tags}
        if labels:
            body["labels"] = labels
        return self._request("POST", f"deployments/{deployment_id}/create_flow_run", json=body)

    def flow_runs_due_between(self, flow_name: str, since: datetime, until: datetime, limit: int = 200,
                              offset: int = 0) -> list[dict[str, Any]]:
        """The top-level flow runs of `flow_name` expected to start in [since, until], newest first (a page)."""
        return self._request("POST", "flow_runs/filter", json={
            "flows": {"name": {"any_": [flow_name]}},
            "flow_runs": {"expected_start_time": {"after_": since.isoformat(), "before_": until.isoformat()},
                          "parent_task_run_id": {"is_null_": True}},
            "sort": "EXPECTED_START_TIME_DESC", "limit": limit, "offset": offset})

    def find_flow_run(self, tag: str) -> dict[str, Any] | None:
        """The flow run carrying `tag`, or None (how a create whose answer was lost is found again)."""
        found = self._request("POST", "flow_runs/filter", json={"flow_runs": {"tags": {"all_": [tag]}}, "limit": 1})
        return found[0] if found else None

    def read_flow_run(self, flow_run_id: str) -> dict[str, Any]:
        """The flow run with its current state."""
        return self._request("GET", f"flow_runs/{flow_run_id}")

    def read_flow_runs(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        """Many flow runs in one call (the background sync follows all unfinished runs this way)."""
        return self._request("POST", "flow_runs/filter", json={
            "flow_runs": {"id": {"any_": flow_run_ids}}, "limit": len(flow_run_ids)})

    def read_task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The task runs of a flow run, with their states."""
        return self._request("POST", "task_runs/filter", json={
            "flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})

    def read_logs(self, flow_run_id: str, offset: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """A flow run's log lines (its tasks' included), oldest first."""
        return self._request("POST", "logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "offset": offset,
            "limit": limit})

    def claim_flow_run(self, flow_run_id: str) -> bool:
        """Take a scheduled flow run before any worker does; True when this caller has it.

        PENDING named "Pending" is what a worker claims a flow run with, and Prefect 3.8.8 refuses exactly that
        over any PENDING (it accepts another name: Pending -> Submitting), RUNNING, CANCELLING or CANCELLED: of
        two claimants one wins. It does accept it after a run's other ends (a manual retry), or reschedules the
        ended run when the deployment's slot is taken: a worker that ran the whole run before this proposal
        arrived is told apart by the state before ours, and its end put back (`keep_claim`)."""
        answer = self._request("POST", f"flow_runs/{flow_run_id}/set_state", json={
            "state": {"type": "PENDING", "name": "Pending", "message": CLAIM_MESSAGE}, "force": False}) or {}
        state_id = (answer.get("state") or {}).get("id")
        if answer.get("status") == "ACCEPT":
            return self.keep_claim(flow_run_id, state_id)
        if answer.get("status") == "REJECT" and state_id:  # rescheduled (AwaitingConcurrencySlot) in our stead
            self._restore_end_before(flow_run_id, state_id)
        return False

    def keep_claim(self, flow_run_id: str, claim_state_id: str | None) -> bool:
        """A flow run in our claim state: True when the state before it was SCHEDULED (no worker ran it: it is
        ours). Otherwise a worker ran it before the claim arrived: its state before the claim is restored, and
        False. Asked again of a run left claimed (the restore did not get through), it restores then. A claim
        not found in the flow run's history is not ours (fail closed: who ran it cannot be told)."""
        history, position = self._history_at(flow_run_id, claim_state_id)
        if position is None or position == 0:
            return False
        if history[position - 1]["type"] == "SCHEDULED":
            return True
        self._restore(flow_run_id, history, position)
        return False

    def _restore_end_before(self, flow_run_id: str, state_id: str) -> None:
        """Put back the end a run had before state `state_id` (made in answer to our claim), if it had one."""
        history, position = self._history_at(flow_run_id, state_id)
        if position and history[position - 1]["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            self._restore(flow_run_id, history, position)

    def _history_at(self, flow_run_id: str, state_id: str | None) -> tuple[list[dict[str, Any]], int | None]:
        """The flow run's states, oldest first, and the position of `state_id` among them (None: not there)."""
        history = sorted(self._request("GET", f"flow_run_states/?flow_run_id={flow_run_id}") or [],
                         key=lambda state: state["timestamp"])
        return history, next((i for i, state in enumerate(history) if state["id"] == state_id), None)

    def _restore(self, flow_run_id: str, history: list[dict[str, Any]], position: int) -> None:
        """Force the state before `history[position]` back, details (a concurrency lease) included; only while
        `history[position]` is still the flow run's latest state: whatever came after it is someone else's."""
        if position != len(history) - 1:
            return
        before = history[position - 1]
        self._request("POST", f"flow_runs/{flow_run_id}/set_state", json={"state": {
            key: before.get(key) for key in ("type", "name", "message", "data", "state_details")}, "force": True})

    def close_reclaimed_flow_run(self, flow_run_id: str, message: str) -> None:
        """End a flow run this gateway claimed (it runs locally instead)."""
        self._request("POST", f"flow_runs/{flow_run_id}/set_state", json={
            "state": {"type": "CANCELLED", "name": "Cancelled", "message": message}, "force": True})

    def crash_flow_run(self, flow_run_id: str, message: str) -> None:
        """Tell Prefect a flow run crashed (its process is gone, and nobody else can say so). Never forced: a flow
        run that ended meanwhile keeps its end, and the proposal frees the deployment's concurrency slot it held."""
        self._request("POST", f"flow_runs/{flow_run_id}/set_state", json={
            "state": {"type": "CRASHED", "name": "Crashed", "message": message}, "force": False})

    def cancel_flow_run(self, flow_run_id: str) -> str | None:
        """Ask Prefect to cancel a flow run; returns the state type it is in after: CANCELLED when no worker had
        taken it (Prefect ends it at once), CANCELLING when one has (the worker stops it; the flow cannot start
        from there), None when Prefect refused because the flow run had ended (its end stands).

        Never forced, and never CANCELLED itself: Prefect 3.8.8 accepts a CANCELLED from PENDING or RUNNING, so
        a flow run a worker was starting would be recorded cancelled and run anyway, and a forced CANCELLING is
        accepted over a COMPLETED flow run, which then never ends again."""
        answer = self._request("POST", f"flow_runs/{flow_run_id}/set_state",
                               json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": False}) or {}
        if answer.get("status") not in ("ACCEPT", "REJECT"):
            return None
        return (answer.get("state") or {}).get("type")

    def end_cancelling_flow_run(self, flow_run_id: str, message: str) -> None:
        """CANCELLED over a CANCELLING flow run (the only state Prefect lets it go to), freeing its slot."""
        self._request("POST", f"flow_runs/{flow_run_id}/set_state", json={
            "state": {"type": "CANCELLED", "name": "Cancelled", "message": message}, "force": False})

    def read_table_artifact(self, flow_run_id: str, key_prefix: str) -> list[dict[str, Any]] | None:
        """The rows of the flow run's table artifact whose key starts with `key_prefix`, or None."""
        artifacts = self._request("POST", "artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["table"]}}})
        for artifact in artifacts:
            if (artifact.get("key") or "").startswith(key_prefix):
                data = artifact.get("data")
                return json.loads(data) if isinstance(data, str) else data
        return None
