"""Per-run log capture: lines logged by a run's threads (they carry its run id) are kept in the run store.

A logging handler in each gateway process buffers such lines and a loop writes them in batches, so any process
can serve GET /api/v1/runs/<id>/logs; the executor writes a run's last lines with the run's end.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from app.logs import run_id as current_run_id
from app.runs.store import RunStore
from connectors.secrets import public_error
from flows.loop import Loop

MAX_MESSAGE = 4000
_IGNORED = ("sqlalchemy", "app.run_log_capture")  # the store's own lines, written while flushing, must not loop back


class RunLogCapture(Loop):
    """Buffers INFO+ lines that belong to a run (through `handler`, on the root logger while started) and writes
    them every `interval` seconds."""

    def __init__(self, store: RunStore, interval: float = 0.5, max_lines_per_run: int = 5000):
        super().__init__("run-logs", every=interval)
        self.store = store
        self.max_lines_per_run = max_lines_per_run
        self.handler = _Handler(self)
        self._buffer: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def start(self) -> None:
        """Attach to the root logger and start writing (in the process that runs the pipelines)."""
        if self.alive is None:
            logging.getLogger().addHandler(self.handler)
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """Detach, stop the loop, write what is left."""
        logging.getLogger().removeHandler(self.handler)
        super().stop(timeout)
        self.flush()

    def run_once(self) -> None:
        self.flush()

    def add(self, record: logging.LogRecord) -> None:
        """Buffer `record` if a run logged it."""
        run = getattr(record, "run_id", None) or current_run_id.get()
        if run is None or record.name.startswith(_IGNORED):
            return
        with self._buffer_lock:
            count = self._counts.get(run, 0) + 1
            self._counts[run] = count
            if count > self.max_lines_per_run:
                return
            # Callers read these lines: the message only, secrets scrubbed, never a traceback (server paths, code).
            message = (public_error(record.getMessage()) if count < self.max_lines_per_run
                       else "(more lines were dropped)")
            self._buffer.append({"run_id": run, "at": datetime.fromtimestamp(record.created, timezone.utc),
                                 "level": record.levelname, "logger": record.name[:200],
                                 "message": message[:MAX_MESSAGE]})

    def flush(self) -> None:
        """Write what is buffered now."""
        with self._flush_lock:
            with self._buffer_lock:
                lines, self._buffer = self._buffer, []
            try:
                self.store.logs.add(lines)
            except Exception:  # a log sink must never break the run it records; the lines are lost, not the run
                logging.getLogger("app.run_log_capture").exception("writing %d run log lines failed", len(lines))

    def take(self, run: str) -> list[dict[str, Any]]:
        """A run ended: hand over its buffered lines (the executor writes them with the run's end) and stop
        counting them."""
        with self._buffer_lock:
            taken = [line for line in self._buffer if line["run_id"] == run]
            if taken:
                self._buffer = [line for line in self._buffer if line["run_id"] != run]
            self._counts.pop(run, None)
        return taken


class _Handler(logging.Handler):
    """The logging side of RunLogCapture."""

    def __init__(self, capture: RunLogCapture):
        super().__init__(level=logging.INFO)
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        self.capture.add(record)
