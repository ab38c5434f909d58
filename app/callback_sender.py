"""Run callbacks: when a run ends (either path), POST its document to the caller's `callback_url`, signed.

Deliveries wait in the run store, so any gateway process may send them and none is lost with a process:
each process's sender claims due deliveries, POSTs, records the attempt on the run, and retries with
backoff until the receiver answers 2xx or the attempts run out.

Signature (like Stripe's): `X-Flowgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
A receiver recomputes it over the raw body and refuses old timestamps. The POST carries the run's W3C
`traceparent`, so the receiver's trace continues the caller's.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.trace import StatusCode

from app.metrics import CALLBACKS
from app.runs.models import Run, RunCallback, utcnow
from app.runs.store import RunStore
from app.schemas import RunOut
from connectors import tracing
from connectors.nesting import NestedTooDeep
from connectors.outbound import OutboundPolicy, OutboundRefused, tls_context
from flows.lease import LeaseKeeper
from flows.loop import Loop

log = logging.getLogger(__name__)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Flowgate-Signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_seconds: float = 300) -> bool:
    """What a receiver does: the signature matches and is recent. (Used by the tests; a recipe for receivers.)"""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class Unsendable(Exception):
    """The run's document cannot be built (it nests deeper than can be shown): the callback is given up."""


class CallbackSender(Loop):
    """One per gateway process: a loop that delivers due callbacks from the store."""

    def __init__(self, store: RunStore, policy: OutboundPolicy, secret: str | None, max_attempts: int = 5,
                 backoff_seconds: float = 2.0, poll_seconds: float = 0.5, timeout_seconds: float = 10.0,
                 project: Path | None = None):
        super().__init__("callbacks", every=poll_seconds)
        self.store = store
        self.policy = policy
        self.secret = secret
        self.project = project  # paths in the run document are shown relative to it, as the API shows them
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._http: httpx.Client | None = None

    @property
    def enabled(self) -> bool:
        """Without a secret callbacks are refused at the trigger, so there is nothing to deliver."""
        return bool(self.secret)

    def start(self) -> None:
        """Start delivering (after gunicorn forks)."""
        if self.enabled:
            self._client()
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop; once its pass under way has ended, close the pooled client (its kept-alive connections)."""
        super().stop(timeout)
        if self._http is not None and not self.alive:
            self._http.close()
            self._http = None

    def _client(self) -> httpx.Client:
        """The pooled client of every delivery, made once (by start, after gunicorn forks)."""
        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout_seconds, follow_redirects=False, verify=tls_context())
        return self._http

    @property
    def claim_seconds(self) -> float:
        """How long a claim holds a delivery; it is extended while the delivery is in flight."""
        return self.timeout_seconds * 2 + 5

    def run_once(self) -> bool:
        """Deliver one due callback, if any (True: there may be more)."""
        claimed = self.store.callbacks.claim(self.owner, lease_seconds=self.claim_seconds)
        if claimed is None:
            return False
        self.deliver(*claimed)
        return True

    def deliver(self, callback: RunCallback, run: Run) -> bool:
        """One attempt, in the run's trace (the POST carries its `traceparent`); records it on the run. True when
        the receiver answered 2xx."""
        attributes: dict[str, str | int] = {tracing.RUN_ID: run.id,
                                            "flowgate.callback.attempt": len(callback.attempts or []) + 1}
        with tracing.tracer().start_as_current_span("callback", context=tracing.extract(run.trace_context),
                                                    attributes=attributes) as span:
            delivered = self._deliver(callback, run)
            span.set_attribute("flowgate.callback.delivered", delivered)
            if not delivered:
                span.set_status(StatusCode.ERROR, "not delivered")
            return delivered

    def _deliver(self, callback: RunCallback, run: Run) -> bool:
        number = len(callback.attempts or []) + 1
        started = time.perf_counter()
        attempt: dict[str, Any] = {"attempt": number, "at": utcnow().isoformat()}
        delivered = False
        # The claim outlives any delivery: it is extended while this one is in flight (a slow receiver, DNS),
        # so no other process takes it over; if this process dies, the claim lapses and another sends it.
        claim = LeaseKeeper(f"callback-{run.id[:8]}", lambda ids: ids if self.store.callbacks.extend_claim(
            run.id, self.owner, self.claim_seconds) else [], self.claim_seconds, self._claim_lost)
        claim.hold(run.id)
        claim.start()
        try:
            body = self._document(run)
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": "flowgate-callback",
                       "X-Flowgate-Signature": signature(self.secret or "", timestamp, body),
                       "X-Flowgate-Run-Id": run.id, "X-Flowgate-Delivery": run.id, "X-Flowgate-Attempt": str(number),
                       **tracing.carrier()}
            self.policy.check(callback.url)  # again at send time: the allow-list may have changed since
            # Only the status line and headers are read: a receiver dripping a body cannot hold the sender.
            with self._client().stream("POST", callback.url, content=body, headers=headers) as response:
                attempt["status_code"] = response.status_code
            delivered = 200 <= response.status_code < 300
            if not delivered:
                attempt["error"] = f"HTTP {response.status_code}"
        except OutboundRefused as exc:
            attempt["error"] = f"refused: {exc}"
            number = self.max_attempts  # a refused host will not become allowed by retrying
        except Unsendable as exc:
            attempt["error"] = str(exc)
            number = self.max_attempts  # nor a stored run become readable
        except httpx.HTTPError as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}"
        attempt["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        retry_at = None
        if not delivered and number < self.max_attempts:
            retry_at = utcnow() + timedelta(seconds=self.backoff_seconds * 2 ** (number - 1))
        try:
            self._record(run.id, attempt, delivered, retry_at)
        finally:
            claim.close()
        CALLBACKS.labels("delivered" if delivered else "retrying" if retry_at else "failed").inc()
        log.log(logging.INFO if delivered else logging.WARNING, "callback of run %s attempt %d: %s", run.id, number,
                "delivered" if delivered else attempt.get("error"), extra={"run_id": run.id})
        return delivered

    def _document(self, run: Run) -> bytes:
        """The run document the callback POSTs; Unsendable when the stored run nests too deeply to show."""
        try:
            document = RunOut.from_run(run, f"/api/v1/runs/{run.id}", self.project).model_dump(mode="json")
        except (NestedTooDeep, RecursionError) as exc:
            raise Unsendable(f"the run document cannot be built: {exc}") from None
        return json.dumps(document).encode()

    def _record(self, run_id: str, attempt: dict[str, Any], delivered: bool, retry_at: Any) -> None:
        """Record the attempt; a store error is retried while the claim is still held (the receiver has it)."""
        for delay in (0.1, 0.5, 1, 2, 4, None):
            try:
                return self.store.callbacks.record_delivery(run_id, self.owner, attempt, delivered, retry_at)
            except Exception:
                if delay is None:
                    raise
                log.warning("recording the callback attempt of %s failed; retrying", run_id, exc_info=True)
                time.sleep(delay)

    @staticmethod
    def _claim_lost(run_id: str, why: str) -> None:
        # The POST is under way or done: another process may send it again, and the receiver dedupes on the
        # delivery id. Recording this attempt then changes nothing (the claim is no longer this process's).
        log.warning("the claim of the callback of %s was lost (%s); it may be delivered again", run_id, why,
                    extra={"run_id": run_id})
