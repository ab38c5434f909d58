"""Loop: the one shape of every background thread in flowgate (a named workload called every few seconds until
stopped), after Prefect's `critical_service_loop` (prefect/utilities/services.py).

A loop is built where its service is built (create_app), started after gunicorn forks and stopped at the
worker's exit, both by walking `Services.loops`; readiness reports every loop by name, so a dead one is seen.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Loop:
    """A daemon thread calling `run_once` every `every` seconds; an exception is logged and the loop goes on.

    `run_once` returns True when there may be more work at once (the next call comes without waiting). `wake()`
    cuts the current wait short; `stop()` ends the loop at its next wake-up."""

    def __init__(self, name: str, every: float, work: Callable[[], bool | None] | None = None,
                 first_delay: float = 0.0):
        self.name = name
        self.every = every
        self.work = work  # the workload, where it is not a subclass's run_once
        self._first_delay = first_delay
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether this loop has work in this configuration (a disabled loop is never started nor reported)."""
        return True

    def run_once(self) -> bool | None:
        """One pass of the workload."""
        if self.work is None:
            raise NotImplementedError
        return self.work()

    def first_delay(self) -> float:
        """How long after start the first pass comes (at once by default)."""
        return self._first_delay

    def next_delay(self) -> float:
        """How long after a pass the next one comes."""
        return self.every

    def start(self) -> None:
        """Start the thread (in the process that does the work: after gunicorn forks); once."""
        if self._thread is not None or not self.enabled:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"flowgate-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop at its next wake-up; with `timeout`, wait that long for the pass under way to end."""
        self._stop.set()
        self._wake.set()
        if timeout is not None and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run the next pass now instead of after the current wait."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """stop() was called: a pass under way should end soon."""
        return self._stop.is_set()

    @property
    def alive(self) -> bool | None:
        """Whether the thread runs (None: not started in this process)."""
        return self._thread.is_alive() if self._thread is not None else None

    def _run(self) -> None:
        delay = self.first_delay()
        while not self._stop.is_set():
            if delay > 0:
                self._wake.wait(delay)
                self._wake.clear()
                if self._stop.is_set():
                    return
            try:
                more = self.run_once()
            except Exception:  # a database or network hiccup must not end the loop; the next pass does the work
                log.exception("background loop %s failed; it goes on", self.name)
                more = False
            delay = 0.0 if more else self.next_delay()
