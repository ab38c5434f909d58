"""One forkserver for all of a gateway's workers: gunicorn's master starts it, each worker adopts it (issue 31).

Each worker used to start its own forkserver (and resource tracker) at executor start, each holding its own ~120 MB
of dlt, DuckDB and pyarrow: most of the gateway's memory (docs/benchmarks.md). multiprocessing allows a process to
use a forkserver another started (its children of a forkserver do): a client connects to the forkserver's socket
and passes the fds the new process gets, its resource tracker's among them; the forkserver forks the child and
reports its pid and exit code over a pipe of the client's. What it does not allow is to check a forkserver it did
not start: `ensure_running()` waits for it as for a child (os.waitpid, which fails in any other process). So a
worker's `ensure_running` checks the inherited one with a signal 0 (gunicorn's master reaps its children, so a
dead forkserver leaves no zombie to answer), and once it is gone starts one of the worker's own, as before. The
resource tracker is inherited too (multiprocessing checks it by writing to its pipe, from any process).

What sharing changes: the forkserver's environment and imports are the master's at start (a HUP starts new workers,
not a new forkserver: a change to the connectors' code reaches runs with a restart, as the gateway's own code does);
one forkserver killed stops every worker's next run from forking until each starts its own (logged); semaphores
a SIGKILLed worker leaves registered are cleaned when the master exits, not when the worker does.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from connectors.isolated import warm_up

log = logging.getLogger(__name__)


def share_forkserver() -> int:
    """In gunicorn's master, before it forks the workers: start the forkserver and the resource tracker that every
    worker then adopts (adopt_forkserver). It starts processes, no thread: the master may still fork. Returns the
    forkserver's pid."""
    from multiprocessing import forkserver

    warm_up()
    server: Any = forkserver._forkserver  # multiprocessing's own state: no public way to ask
    return server._forkserver_pid


def adopt_forkserver() -> bool:
    """In a process forked from one that ran share_forkserver (a gunicorn worker, before it builds the app): use
    that forkserver while it lives, then one of its own. Returns whether there was one to adopt."""
    from multiprocessing import forkserver, resource_tracker

    server: Any = forkserver._forkserver  # the process's one ForkServer
    inherited = server._forkserver_pid
    if inherited is None:
        return False
    start_own = server.ensure_running

    def ensure_running() -> None:
        nonlocal inherited
        with server._lock:
            if inherited is not None and server._forkserver_pid == inherited:
                if _alive(inherited):
                    resource_tracker.ensure_running()
                    return
                log.warning("the gateway's shared forkserver (pid %s) is gone: this process starts its own",
                            inherited)
                os.close(server._forkserver_alive_fd)
                server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
            inherited = None
        start_own()

    server.ensure_running = ensure_running  # connect_to_new_process calls it on the instance
    forkserver.ensure_running = ensure_running  # warm_up's, bound to the instance when multiprocessing was imported
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
