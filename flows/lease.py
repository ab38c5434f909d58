"""LeaseKeeper: the one rule by which flowgate holds a lease (a local run's row, a connector lock, a callback
claim) while work goes on under it.

- A renewal is sent every lease/3.
- A renewal that answers "not held" loses the lease at once (another process recovered or took it).
- A lease no renewal has confirmed for 2/3 of its length is lost, whatever the renewal under way is doing: a
  database that stops answering without closing the connection (a partition, a failover) blocks a renewal for
  minutes, and the fence must not wait for it to raise. Another process may take the lease over once it has
  lapsed by the database's clock; the fence fires a third of a lease (less a tick) before that.

Renewals run on one thread, the fence check on another, so a hung renewal cannot hold the fence back. A renewal
is counted from the moment it was sent (the database extended the lease from a moment no earlier), never from
its answer. Tested with a fake clock in tests/test_lease.py.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable

from flows.loop import Loop

log = logging.getLogger(__name__)

TAKEN = "taken"  # a renewal answered that another holder has it
LAPSED = "lapsed"  # no renewal got through in time


class LeaseKeeper:
    """Keeps the leases of one holder (keys are run ids, lock keys...) renewed, and reports each lost one once.

    `renew(keys)` extends the leases of `keys` and returns those still held (it may raise: a failed renewal only
    counts against the clock). `on_lost(key, why)` is called once per lost key, `why` being TAKEN or LAPSED, from
    one of the keeper's threads. A key is kept from `hold` until `release` (call it before recording the end of
    the work: from then on the lease's fate is the end's record's business, not the keeper's)."""

    def __init__(self, name: str, renew: Callable[[list[str]], Collection[str]], lease_seconds: float,
                 on_lost: Callable[[str, str], None], clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.lease_seconds = lease_seconds
        self.renew_every = max(lease_seconds / 3, 0.05)
        self.fence_after = lease_seconds * 2 / 3
        self._renew = renew
        self._on_lost = on_lost
        self._clock = clock
        self._confirmed: dict[str, float] = {}  # key -> when the last renewal that held it was sent
        self._lock = threading.Lock()
        self._renewer = Loop(f"{name}-renewal", self.renew_every, self.renew_once, first_delay=self.renew_every)
        self._fence = Loop(f"{name}-fence", max(lease_seconds / 12, 0.02), self.check)

    # --- what the holder says ---------------------------------------------------------------

    def hold(self, key: str, since: float | None = None) -> None:
        """Keep `key`, taken at `since` (this keeper's clock; default now: pass the time the claim was sent)."""
        with self._lock:
            self._confirmed[key] = self._clock() if since is None else since

    def release(self, key: str) -> None:
        """Stop keeping `key` (its work ended, or is being recorded); it is never reported lost after this."""
        with self._lock:
            self._confirmed.pop(key, None)

    def held(self) -> list[str]:
        """The keys kept now."""
        with self._lock:
            return list(self._confirmed)

    def start(self) -> None:
        """Start renewing and fencing, on two daemon threads."""
        self._renewer.start()
        self._fence.start()

    def stop(self) -> None:
        """Stop both threads (a renewal under way is not waited for: a hung one may never return)."""
        self._renewer.stop()
        self._fence.stop()

    def close(self) -> None:
        """Release every key and stop: nothing is reported lost after this."""
        with self._lock:
            self._confirmed.clear()
        self.stop()

    @property
    def alive(self) -> bool | None:
        """Whether both threads run (None: not started)."""
        if self._renewer.alive is None:
            return None
        return bool(self._renewer.alive and self._fence.alive)

    # --- the two workloads (public for tests with a fake clock) ------------------------------

    def renew_once(self) -> None:
        """Send one renewal of every kept key and apply its answer."""
        keys = self.held()
        if not keys:
            return
        sent = self._clock()
        try:
            still = set(self._renew(keys))
        except Exception as exc:  # the lease is longer than two renewals: the next one may get through
            log.warning("renewing the leases of %s failed (%s: %s); they are fenced %.1f s after the last renewal "
                        "that got through unless one does", self.name, type(exc).__name__, exc, self.fence_after)
            return
        taken = []
        with self._lock:
            for key in keys:
                if key not in self._confirmed:
                    continue  # released (or found lost) while the renewal was under way: not ours to judge
                if key in still:
                    self._confirmed[key] = max(self._confirmed[key], sent)
                else:
                    del self._confirmed[key]
                    taken.append(key)
        self._lose(taken, TAKEN)

    def check(self) -> None:
        """Lose every key no renewal has confirmed for 2/3 of the lease."""
        now = self._clock()
        with self._lock:
            lapsed = [key for key, confirmed in self._confirmed.items() if now - confirmed > self.fence_after]
            for key in lapsed:
                del self._confirmed[key]
        self._lose(lapsed, LAPSED)

    def _lose(self, keys: Iterable[str], why: str) -> None:
        for key in keys:
            try:
                self._on_lost(key, why)
            except Exception:  # one holder's failure to stop must not keep the others' losses from being said
                log.exception("stopping the work of %s after its lease was lost failed", key)


def keep_one(name: str, renew: Callable[[], bool], lease_seconds: float, lost: threading.Event,
             since: float | None = None) -> LeaseKeeper:
    """A started keeper of a single lease: `renew()` says whether it is still held; `lost` is set when it is not."""

    def on_lost(key: str, why: str) -> None:
        log.error("the lease of %s was lost (%s); stopping its work", key,
                  "another holder has it" if why == TAKEN else
                  f"no renewal got through for {lease_seconds * 2 / 3:.1f} s of a {lease_seconds:g} s lease")
        lost.set()

    keeper = LeaseKeeper(name, lambda keys: keys if renew() else [], lease_seconds, on_lost)
    keeper.hold(name, since)
    keeper.start()
    return keeper
