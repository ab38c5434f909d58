"""Per-run log capture: lines logged by a run's threads (they carry its run id) are kept in the run store.

A logging handler in each gateway process buffers such lines and writes them in batches, so any process
can serve GET /api/v1/runs/<id>/logs; the executor writes a run's last lines with the run's end.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from app.logs import run_id as current_run_id
from connectors.secrets import public_error
from app.runs.store import RunStore

MAX_MESSAGE = 4000
_IGNORED = ("sqlalchemy", "app.runlogs")  # the store's own lines, written while flushing, must not loop back


class RunLogHandler(logging.Handler):
    """Buffers INFO+ lines that belong to a run; a thread writes them every `interval` seconds."""

    def __init__(self, store: RunStore, interval: float = 0.5, max_lines_per_run: int = 5000):
        super().__init__(level=logging.INFO)
        self.store = store
        self.interval = interval
        self.max_lines_per_run = max_lines_per_run
        self._buffer: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Attach to the root logger and start writing (in the process that runs the pipelines)."""
        if self._thread is None:
            logging.getLogger().addHandler(self)
            self._thread = threading.Thread(target=self._loop, name="flowgate-run-logs", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool | None:
        """Whether the writing thread runs (None: not started in this process)."""
        return self._thread.is_alive() if self._thread is not None else None

    def stop(self) -> None:
        logging.getLogger().removeHandler(self)
        self._stop.set()
        self.flush()

    def emit(self, record: logging.LogRecord) -> None:
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
                logging.getLogger("app.runlogs").exception("writing %d run log lines failed", len(lines))

    def take(self, run: str) -> list[dict[str, Any]]:
        """A run ended: hand over its buffered lines (the executor writes them with the run's end) and stop
        counting them."""
        with self._buffer_lock:
            taken = [line for line in self._buffer if line["run_id"] == run]
            if taken:
                self._buffer = [line for line in self._buffer if line["run_id"] != run]
            self._counts.pop(run, None)
        return taken

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
