"""Issue 31 on a real gunicorn: the workers' connector runs fork from one forkserver the master started (one resource
tracker too), not one per worker; a forkserver that dies is replaced by the workers' own, and runs go on."""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=60)


def descendants(pid: int) -> dict[int, tuple[int, str]]:
    """Every process under `pid`: its parent and command line."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            procs[int(entry.name)] = (ppid, cmdline)
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, cmdline) in procs.items():
            if ppid == parent:
                found[child] = (ppid, cmdline)
                todo.append(child)
    return found


def kinds(master: int) -> Counter:
    """How many processes of each kind gunicorn's tree holds: workers, forkservers, resource trackers."""
    counted: Counter = Counter()
    for ppid, cmdline in descendants(master).values():
        if "multiprocessing.forkserver" in cmdline:
            counted["forkserver"] += 1
        elif "multiprocessing.resource_tracker" in cmdline:
            counted["resource tracker"] += 1
        elif ppid == master:
            counted["worker"] += 1
    return counted


def runs_complete(client: httpx.Client, runs: int = 6) -> None:
    """`runs` runs of two connectors, whichever workers claim them: each completes."""
    triggered = [client.post("/trigger", json={"connector_id": ("numbers", "products")[i % 2]}).json()["run_id"]
                 for i in range(runs)]
    done = [wait_until_ended(client, f"/api/v1/runs/{run_id}", timeout=180) for run_id in triggered]
    assert [d["status"] for d in done] == ["completed"] * runs, [d["error"] for d in done]


def test_three_workers_fork_their_runs_from_one_forkserver_and_replace_it_if_it_dies(workdir: Path):
    server = GunicornServer(workdir, workers=3).start()
    try:
        master = server.process.pid
        assert kinds(master) == {"worker": 3, "forkserver": 1, "resource tracker": 1}
        forkserver = next(pid for pid, (_, cmdline) in descendants(master).items()
                          if "multiprocessing.forkserver" in cmdline)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            runs_complete(client)
            assert kinds(master) == {"worker": 3, "forkserver": 1, "resource tracker": 1}  # none started its own

            os.kill(forkserver, signal.SIGKILL)
            wait_until(lambda: forkserver not in descendants(master), 30, "the master reaping the forkserver")
            runs_complete(client)
        assert f"shared forkserver (pid {forkserver}) is gone" in server.log()
        assert kinds(master)["forkserver"] >= 1  # the workers' own now, for the runs that follow
    finally:
        server.kill()
