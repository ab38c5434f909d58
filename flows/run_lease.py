"""A Prefect flow run's lease on its run's row in the run store: the fence between a flow run and the gateway, and
the gateway's only sign that the flow run's process is still alive.

- Taken (`take`) before the flow executes anything, in one compare-and-set: the run must still be on the prefect
  backend, unfinished, and nobody's (no lease on it). The gateway's take-back of a flow run that never started
  (app/backends/prefect_sync.py) is the mirror compare-and-set: the run must be unleased. Whichever commits first
  wins; the other changes nothing. Prefect cannot be that fence: it accepts RUNNING over CANCELLED.
- Renewed (a LeaseKeeper: every third of the lease) until the process exits, not until the flow's body ends: the
  engine reports the end to Prefect after the body, and a process that dies before that report got through (the
  Prefect server down) leaves the flow run Running in Prefect for good. A lease that was taken and then lapsed,
  under a flow run Prefect still shows unfinished, says its process is gone; the gateway ends the run (crashed).
- Lost while the body runs (a renewal answers "not held", or none got through for 2/3 of the lease): `lost` is set
  and the flow stops its work at once, as for its connector's key (flows/connector_lock.py).

The runs table is the gateway's (app/runs/models.py); the columns used here are written out so that this floor
needs nothing of the gateway's models.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import Column, DateTime, MetaData, String, Table, update

from flows.connector_lock import now_utc, run_moved_off_prefect
from flows.database import Database, rowcount
from flows.lease import TAKEN, LeaseKeeper
from flows.outcome import CANCELLING, QUEUED, RUNNING

log = logging.getLogger(__name__)

_runs = Table(  # the columns of the gateway's runs table a flow run's lease reads and writes
    "runs", MetaData(),
    Column("id", String(32), primary_key=True),
    Column("backend", String(16)),
    Column("status", String(16)),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", DateTime),  # UTC without zone, as the run store keeps times
)
_UNFINISHED = (QUEUED, RUNNING, CANCELLING)
HOLDER_PREFIX = "prefect:"  # a flow run's lease owner: prefect:<flow run id>:<one per execution>


def holder_of(flow_run_id: str, execution: str) -> str:
    """The lease owner a flow run's execution writes on its run."""
    return f"{HOLDER_PREFIX}{flow_run_id}:{execution}"


def held_by_flow_run(lease_owner: str | None, flow_run_id: str) -> bool:
    """Whether `lease_owner` (a run's) names an execution of flow run `flow_run_id`."""
    return bool(lease_owner) and str(lease_owner).startswith(f"{HOLDER_PREFIX}{flow_run_id}:")


class RunLease:
    """One flow run execution's lease on run `run_id`."""

    def __init__(self, database: Database, run_id: str, holder: str, lease_seconds: float = 30.0):
        self.database = database
        self.run_id = run_id
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._keeper: LeaseKeeper | None = None
        self._asked = time.monotonic()  # the lease runs from no earlier than the take was sent
        self._ended = threading.Event()

    def take(self) -> str | None:
        """Take the run for this execution; None when taken, else why the flow must not execute."""
        asked = time.monotonic()

        def attempt() -> bool:
            with self.database.session(write=True) as session:
                now = now_utc(session, self.database.is_sqlite)
                return rowcount(session.execute(update(_runs).where(
                    _runs.c.id == self.run_id, _runs.c.backend == "prefect", _runs.c.status.in_(_UNFINISHED),
                    _runs.c.lease_owner.is_(None))
                    .values(lease_owner=self.holder, lease_expires_at=now + timedelta(seconds=self.lease_seconds))
                )) == 1

        if not self.database.retry(attempt):
            return run_moved_off_prefect(self.database, self.run_id) or \
                f"run {self.run_id} is held by another execution (a flow run of it already took it)"
        self._asked = asked
        return None

    def renew(self) -> bool:
        """Extend the lease; False when this execution no longer holds it (the run ended or went elsewhere), or
        its lease lapsed (the gateway may be ending the run: a lapsed lease is nobody's)."""

        def attempt() -> bool:
            with self.database.session(write=True) as session:
                now = now_utc(session, self.database.is_sqlite)
                return rowcount(session.execute(update(_runs).where(
                    _runs.c.id == self.run_id, _runs.c.lease_owner == self.holder,
                    _runs.c.status.in_(_UNFINISHED), _runs.c.lease_expires_at > now)
                    .values(lease_expires_at=now + timedelta(seconds=self.lease_seconds)))) == 1

        return self.database.retry(attempt)

    def keep(self, lost: threading.Event) -> None:
        """Keep the taken lease renewed on two daemon threads until the process exits; `lost` is set when it is
        lost while the flow's body runs (`end` not called yet)."""

        def on_lost(key: str, why: str) -> None:
            if self._ended.is_set():  # the gateway recorded the run's end (or moved on): nothing left to stop
                log.info("the lease of run %s ended with its run", self.run_id)
            else:
                log.error("the lease of run %s was lost (%s); stopping its work", self.run_id,
                          "the run is no longer this flow run's" if why == TAKEN else
                          f"no renewal got through for {self.lease_seconds * 2 / 3:.1f} s of a "
                          f"{self.lease_seconds:g} s lease")
                lost.set()
            if self._keeper is not None:
                self._keeper.stop()

        self._keeper = LeaseKeeper(f"run-{self.run_id}", lambda keys: keys if self.renew() else [],
                                   self.lease_seconds, on_lost)
        self._keeper.hold(self.run_id, self._asked)
        self._keeper.start()

    def end(self) -> None:
        """The flow's body ended: the lease is still renewed (until the process exits, so the gateway sees the
        process alive while its engine reports the end to Prefect), but losing it stops nothing any more."""
        self._ended.set()
