"""Slot classes: connectors and workflows share an executor's slots, but neither kind may take the slots kept
for the other, so four hour-long workflows cannot keep a connector queued (and the other way round)."""
from __future__ import annotations

import threading

KINDS = ("connector", "workflow")


class SlotClasses:
    """Counts one executor's runs by kind; `claimable()` says which kinds it may claim next.

    With `reserved` = 1 (FLOWGATE_RESERVED_SLOTS) and 4 slots, workflows may run in at most 3 of them and
    connectors in at most 3: each kind always finds a slot the other cannot fill. Fewer slots than kinds
    times the reservation, or 0 reserved: one shared pool, as before."""

    def __init__(self, slots: int, reserved: int):
        self.cap = slots - reserved if reserved > 0 and slots > reserved else slots
        self._kinds: dict[str, str] = {}
        self._lock = threading.Lock()

    def started(self, run_id: str, kind: str) -> None:
        with self._lock:
            self._kinds[run_id] = kind

    def ended(self, run_id: str) -> None:
        with self._lock:
            self._kinds.pop(run_id, None)

    def claimable(self) -> tuple[str, ...] | None:
        """The kinds that may take a free slot now (None: any)."""
        with self._lock:
            running = list(self._kinds.values())
        allowed = tuple(kind for kind in KINDS if running.count(kind) < self.cap)
        return None if len(allowed) == len(KINDS) else allowed
