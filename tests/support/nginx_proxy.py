"""deploy/nginx.conf run in front of a test's gateway, as docker-compose.yml runs it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.gunicorn_server import ROOT, free_port
from tests.support.waiting import wait_until

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
if NGINX is None and os.environ.get("FLOWGATE_REQUIRE_TOOLS"):  # .ci/run installs it: its tests must not skip
    raise RuntimeError("nginx is required here (FLOWGATE_REQUIRE_TOOLS) but not installed")


@contextmanager
def repo_nginx(folder: Path, gateway_port: int) -> Iterator[str]:
    """deploy/nginx.conf in front of a gateway on 127.0.0.1 (only its upstream, port and pid file changed); yields
    its URL."""
    port = free_port()
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    changes = {"server gateway:5000;": f"server 127.0.0.1:{gateway_port};", "listen 8080;": f"listen 127.0.0.1:{port};",
               "pid /tmp/nginx.pid;": f"pid {folder}/nginx.pid;"}
    for old, new in changes.items():
        assert old in text, f"deploy/nginx.conf no longer says {old!r}"
        text = text.replace(old, new)
    (folder / "nginx.conf").write_text(text)
    with (folder / "nginx.log").open("ab") as log:
        process = subprocess.Popen([NGINX, "-c", str(folder / "nginx.conf"), "-g", "daemon off;"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert process.poll() is None, (folder / "nginx.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=30, what="nginx answering /health")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
