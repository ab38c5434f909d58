"""Slot classes: connectors and workflows share an executor's slots, but neither kind may take the slots kept
for the other, so four hour-long workflows cannot keep a connector queued (and the other way round); and a lane of
slots on top of them is kept for scheduled runs, so a schedule's slot starts on time while triggers keep every
other slot busy."""
from __future__ import annotations

import threading
from typing import Literal

KINDS = ("connector", "workflow")

Room = Literal["any", "scheduled"]


class SlotClasses:
    """Counts one executor's runs by kind; `room()` says whether it may claim a run now, `claimable()` which kinds.

    With `reserved` = 1 (FLOWGATE_RESERVED_SLOTS) and 4 slots, workflows may run in at most 3 of them and
    connectors in at most 3: each kind always finds a slot the other cannot fill. Fewer slots than kinds
    times the reservation, or 0 reserved: one shared pool, as before.

    `schedule_lane` slots (FLOWGATE_SCHEDULE_SLOTS) come on top of `slots` and only scheduled runs take them: a
    scheduled run goes into the lane while it has room, else into a slot like any run."""

    def __init__(self, slots: int, reserved: int, schedule_lane: int = 0):
        self.slots = slots
        self.lane = schedule_lane
        self.cap = slots - reserved if reserved > 0 and slots > reserved else slots
        self._kinds: dict[str, str] = {}  # runs in the slots, by id
        self._in_lane: set[str] = set()
        self._lock = threading.Lock()

    def started(self, run_id: str, kind: str, scheduled: bool = False) -> None:
        with self._lock:
            if scheduled and len(self._in_lane) < self.lane:
                self._in_lane.add(run_id)
            else:
                self._kinds[run_id] = kind

    def ended(self, run_id: str) -> None:
        with self._lock:
            self._kinds.pop(run_id, None)
            self._in_lane.discard(run_id)

    def room(self) -> Room | None:
        """What the next claim may take: any run while a slot is free, only a scheduled one while just the lane
        has room, nothing (None) when both are full."""
        with self._lock:
            if len(self._kinds) < self.slots:
                return "any"
            return "scheduled" if len(self._in_lane) < self.lane else None

    def claimable(self) -> tuple[str, ...] | None:
        """The kinds that may take a free slot now (None: any)."""
        with self._lock:
            running = list(self._kinds.values())
        allowed = tuple(kind for kind in KINDS if running.count(kind) < self.cap)
        return None if len(allowed) == len(KINDS) else allowed
