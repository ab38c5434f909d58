"""What a flowgate deployment's flow run starts as: hand the run to this host's flow-run launcher, or run it here.

The process worker starts `<python> -S <root>/flows/prefect/launch.py` for each flow run (flows/prefect/deploy.py).
This script imports only the standard library (it starts in tens of milliseconds, and `-S` skips site-packages),
connects to the launcher's Unix socket (flows/prefect/launcher.py, started by `make stack` beside the worker) and
passes it the flow run's environment, working directory, umask, argv and its stdin/stdout/stderr. The launcher
forks a process that has Prefect, dlt and the flows imported already, and that process runs the flow run as
`python -m prefect.engine` would. This script stays attached until it ends, passes the signals it gets (the
worker's SIGTERM on a cancel) straight to that process, and exits as it did (by the same signal, or with its exit
code), so the worker sees what it would have seen of `python -m prefect.engine`. If this script dies (SIGKILL),
the launcher sees its connection close and kills the flow run's process group.

No launcher listening (no socket, connection refused, or one of another checkout or interpreter): this script
execs `<python> -m prefect.engine` in its own place, so the worker sees the process it always did.

The launcher imports `socket_path` and the protocol's words from here: both ends read them from one place.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

PROTOCOL = 1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCKET_NAME = "flowgate-launcher.sock"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # the worker's cancel is a SIGTERM; Ctrl-C a SIGINT
HEADER = struct.Struct("!I")  # the request's length, before its JSON


def socket_path(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where this host's launcher listens: FLOWGATE_LAUNCHER_SOCKET (empty: no launcher), else
    `$PREFECT_HOME/flowgate-launcher.sock` (the worker and the launcher of one stack share PREFECT_HOME)."""
    if "FLOWGATE_LAUNCHER_SOCKET" in environ:
        return os.path.expanduser(environ["FLOWGATE_LAUNCHER_SOCKET"]) or None
    home = environ.get("PREFECT_HOME") or os.path.join("~", ".prefect")
    return os.path.join(os.path.expanduser(home), SOCKET_NAME)


def request() -> bytes:
    """What the launcher needs to start this flow run as this process would have: env, cwd, umask, argv, and who
    asks (the launcher serves only launch scripts of its own checkout and interpreter)."""
    umask = os.umask(0)
    os.umask(umask)
    body = json.dumps({"protocol": PROTOCOL, "root": ROOT, "executable": os.path.realpath(sys.executable),
                       "argv": sys.argv[1:], "cwd": os.getcwd(), "umask": umask, "env": dict(os.environ)}).encode()
    return HEADER.pack(len(body)) + body


def engine_in_place(reason: str | None = None) -> None:
    """Become `<python> -m prefect.engine` (what the deployment's command was before the launcher)."""
    if reason:
        print(f"flowgate launch: {reason}; running the flow run in this process", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])


def connect(path: str) -> socket.socket | None:
    """A connection to the launcher, or None when none listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no socket file, refused (a launcher gone), a path too long for AF_UNIX
        sock.close()
        return None
    return sock


def exit_as(status: int) -> None:
    """Exit the way the flow run's process did: by the same signal, or with its exit code."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # not reached unless the signal is blocked
    sys.exit(code)


def attached(sock: socket.socket) -> None:
    """Follow the flow run the launcher started until it ends; forward signals; exit as it did."""
    lines = sock.makefile("rb")
    first = lines.readline().decode().split(" ", 1)
    if first[0] == "refused":
        sock.close()
        engine_in_place(f"the launcher refused: {first[1].strip()}")
    if first[0] != "pid":
        sock.close()
        engine_in_place("the launcher closed the connection before starting the flow run")
    pid = int(first[1])
    try:  # a handle on that very process: a signal cannot reach another that took its pid after it ended
        pidfd: int | None = os.pidfd_open(pid)
    except OSError:  # it has ended already (its exit status follows), or a kernel older than 5.3
        pidfd = None

    def forward(signum: int, _frame: object) -> None:
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:  # it has ended: its exit status is on its way
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    for line in lines:
        word, _, value = line.decode().partition(" ")
        if word == "exit":
            exit_as(int(value))
    # The connection closed without an exit status: the launcher died, and the flow run's process (which holds
    # the launcher's end of this connection) has ended too. How it ended is not known here.
    print("flowgate launch: the launcher went away; the flow run's exit status is unknown", file=sys.stderr,
          flush=True)
    sys.exit(1)


def main() -> None:
    path = socket_path()
    sock = connect(path) if path else None
    if sock is None:
        engine_in_place()
        return
    data = request()
    try:
        sent = socket.send_fds(sock, [data], [0, 1, 2])  # the descriptors go with the first bytes
        if sent < len(data):  # an empty send to a launcher that read it all and refused it would fail (EPIPE)
            sock.sendall(data[sent:])
    except OSError as exc:  # it may have answered before closing: its refusal says why
        if not refused(sock):
            sock.close()
            engine_in_place(f"the launcher did not take the request ({exc})")
    attached(sock)


def refused(sock: socket.socket) -> bool:
    """Whether the launcher's answer, already sent, is a refusal (attached() then reads and reports it)."""
    try:
        sock.settimeout(5)
        answer = sock.recv(len(b"refused"), socket.MSG_PEEK) == b"refused"
        sock.settimeout(None)
        return answer
    except OSError:
        return False


if __name__ == "__main__":
    main()
