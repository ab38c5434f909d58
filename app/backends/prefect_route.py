"""Can Prefect take a run now? Cached probes and a circuit breaker, so a dead Prefect costs callers nothing."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from app.backends.prefect_client import PrefectClient, PrefectError, PrefectNotFound, PrefectUnavailable, count_alive
from app.metrics import PREFECT_CIRCUIT, PREFECT_PROBE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """The answer for one connector: a deployment to use, or why not."""

    deployment_id: str | None
    reason: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.deployment_id is not None


class PrefectRoute:
    """Per process: probes Prefect with short timeouts, caches the answers briefly, opens a circuit on failure.

    While the circuit is open callers skip Prefect at once; a background thread re-probes and closes it
    when Prefect answers again.
    """

    def __init__(self, client: PrefectClient, flow_name: str, work_pool: str, cache_seconds: float = 5.0,
                 reprobe_seconds: float = 5.0, worker_max_age_seconds: float = 65.0):
        self.client = client
        self.worker_max_age_seconds = worker_max_age_seconds
        self.flow_name = flow_name
        self.work_pool = work_pool
        self.cache_seconds = cache_seconds
        self.reprobe_seconds = reprobe_seconds
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._open_since: float | None = None
        self._last_error: str | None = None
        self._latency_ms: float | None = None
        self._reprober: threading.Thread | None = None
        self._closed = threading.Event()
        self._unanswered: list[float] = []  # when calls that reached Prefect went unanswered (timeouts, 5xx)

    @property
    def circuit_open(self) -> bool:
        return self._open_since is not None

    def route(self, deployment_name: str, flow_name: str | None = None) -> Route:
        """The deployment `flow/deployment_name` to run on, or the reason Prefect cannot take the run now."""
        flow_name = flow_name or self.flow_name
        if self.circuit_open:
            return Route(None, "prefect_circuit_open", self._last_error)
        try:
            deployment = self._cached(f"deployment:{flow_name}/{deployment_name}",
                                      lambda: self.client.read_deployment(flow_name, deployment_name))
            pool = deployment.get("work_pool_name")
            if not pool:
                return Route(None, "no_work_pool", f"deployment {deployment_name} has no work pool")
            if not self._cached(f"workers:{pool}",
                                lambda: count_alive(self.client.workers(pool), self.worker_max_age_seconds)):
                return Route(None, "no_worker_online", f"no worker of pool '{pool}' sent a heartbeat within "
                                                       f"{self.worker_max_age_seconds:g} s")
            return Route(str(deployment["id"]))
        except PrefectNotFound:
            return Route(None, "no_deployment", f"no deployment {flow_name}/{deployment_name}")
        except PrefectUnavailable as exc:
            self.record_failure(exc)
            return Route(None, exc.reason, exc.message)
        except PrefectError as exc:
            return Route(None, exc.reason, exc.message)

    def _cached(self, key: str, fetch: Any) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and now - hit[0] < self.cache_seconds:
            if isinstance(hit[1], PrefectNotFound):
                raise hit[1]
            return hit[1]
        try:
            value = fetch()
        except PrefectNotFound as exc:
            value = exc
        with self._lock:
            self._cache[key] = (now, value)
        if isinstance(value, PrefectNotFound):
            raise value
        return value

    def record_failure(self, exc: PrefectError) -> None:
        """Open the circuit and start re-probing in the background: at once when Prefect cannot be connected to,
        after three unanswered calls within 30 s otherwise (one slow answer is no outage)."""
        with self._lock:
            if isinstance(exc, PrefectUnavailable) and exc.maybe_done:
                now = time.monotonic()
                self._unanswered = [t for t in self._unanswered if now - t < 30] + [now]
                if len(self._unanswered) < 3:
                    return
            self._unanswered = []
            self._last_error = exc.message
            self._cache.clear()
            if self._open_since is None:
                self._open_since = time.monotonic()
                PREFECT_CIRCUIT.set(1)
                log.warning("Prefect unavailable (%s): circuit open, runs go local", exc.message)
            if self._reprober is None or not self._reprober.is_alive():
                self._reprober = threading.Thread(target=self._reprobe, name="flowgate-prefect-reprobe", daemon=True)
                self._reprober.start()

    def close(self) -> None:
        """Stop re-probing and close the client's connections."""
        self._closed.set()
        self.client.close()

    def _reprobe(self) -> None:
        # Only this thread closes the circuit, and it ends in the same locked step: a failure recorded after that
        # starts a new prober, never counts on one that is about to end.
        while not self._closed.wait(self.reprobe_seconds):
            try:
                self._latency_ms = self.client.health()
                PREFECT_PROBE.set(self._latency_ms / 1000)
            except PrefectError as exc:
                self._last_error = exc.message
                continue
            except Exception as exc:  # whatever went wrong, the circuit must not stay open for this process's life
                log.exception("re-probing Prefect failed")
                self._last_error = f"{type(exc).__name__}: {exc}"
                continue
            with self._lock:
                self._open_since, self._last_error, self._reprober = None, None, None
                PREFECT_CIRCUIT.set(0)
            log.info("Prefect answers again: circuit closed")
            return

    def status(self) -> dict[str, Any]:
        """For readiness: reachable or not and why, latency, circuit state."""
        if self.circuit_open:
            return {"status": "down", "circuit": "open", "reason": self._last_error,
                    "open_for_seconds": round(time.monotonic() - (self._open_since or 0), 1)}
        try:
            latency_ms = self._latency_ms = self.client.health()
            PREFECT_PROBE.set(latency_ms / 1000)
            workers = self.client.workers(self.work_pool)
        except PrefectNotFound:
            workers = None
        except PrefectError as exc:
            self.record_failure(exc)
            return {"status": "down", "circuit": "open" if self.circuit_open else "closed", "reason": exc.message}
        return {"status": "up", "circuit": "closed", "api_url": self.client.api_url,
                "latency_ms": round(latency_ms, 2), "work_pool": self.work_pool,
                "workers_online": count_alive(workers or [], self.worker_max_age_seconds),
                "worker_max_age_seconds": self.worker_max_age_seconds,
                "workers": [{"name": w.get("name"), "status": w.get("status"),
                             "last_heartbeat_time": w.get("last_heartbeat_time")} for w in workers or []],
                **({"reason": f"work pool '{self.work_pool}' does not exist"} if workers is None else {})}
