"""This host's flow-run launcher: flow runs forked from a process that has imported Prefect, dlt and the flows.

    python -m flows.prefect.launcher        (make stack starts it beside the process worker, with the same env)

Starting `python -m prefect.engine` for every flow run costs an interpreter and the imports of Prefect, dlt and the
flows: 1.35 s of the 2.93 s from trigger to completed and most of the 2.38 s of CPU per flow run (issue 31, 2-core
machine). The deployments' command is flows/prefect/launch.py instead, a standard-library script that passes the
flow run (its environment, working directory, umask, argv, stdin/stdout/stderr) over this process's Unix socket
and stays attached; this process forks a child that runs it exactly as `python -m prefect.engine` would.

The launcher is a fork server: single-threaded, it only imports (no client, no settings context entered, no
thread: it refuses to start if an import started one), then loops on accept, fork and reap. A child closes the
launcher's sockets, resets its signal handlers, starts a session of its own, takes the stdio it was given, and
becomes the flow run's process (flows/prefect/forked_run.py: its env, cwd and umask, Prefect's settings read again,
`prefect.engine` run as `__main__`). The launch script passes its signals straight to the child (the worker's
cancel is a SIGTERM to the launch script); the launcher reports the child's wait status when it ends, and kills
the child's process group when the launch script's connection closes first (the launch script was killed). The
child keeps the launcher's end of that connection, so a launch script stays attached until its flow run ends
even if the launcher dies.

The socket is `$PREFECT_HOME/flowgate-launcher.sock` (FLOWGATE_LAUNCHER_SOCKET overrides it, flows/prefect/
launch.py), mode 0600, and a connection from another user is refused. The launcher serves only launch scripts
of its own checkout and interpreter (others fall back). On SIGTERM or SIGINT it stops accepting, passes SIGTERM
to the flow runs it started, and exits when they have ended (SIGKILL to those left after STOP_GRACE_SECONDS).

Over 300 lines: the loop, the children it tracks and the launcher's side of the socket are one mechanism, read
together; what a child does once forked is flows/prefect/forked_run.py.
"""
from __future__ import annotations

import atexit
import fcntl
import gc
import importlib
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.prefect.forked_run import FlowRunRequest, exit_without_teardown
from flows.prefect.launch import HEADER, socket_path

# What a flow run imports before its first task: Prefect's flow and task engines and client, the pull step of
# flowgate's deployments, dlt and the connectors (connectors.preload), and the two flows. The flows' files are
# executed again by each flow run (Prefect loads an entrypoint as a script), on modules imported here.
PRELOAD = [
    "prefect", "prefect.flow_engine", "prefect.task_engine", "prefect._internal.metrics",
    "prefect.client.orchestration", "prefect.deployments.steps.pull", "prefect.runner.storage",
    "connectors.preload", "connectors.isolated", "flows.prefect.connector_flow", "flows.prefect.workflow_flow",
]
STOP_GRACE_SECONDS = 20.0  # below make stack's 30 s wait for a component
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 16 * 1024 * 1024


def say(message: str) -> None:
    print(f"[launcher {os.getpid()}] {message}", file=sys.stderr, flush=True)


def preload() -> None:
    """Import what flow runs use; refuse to go on if that started a thread (a fork would copy it broken)."""
    for name in PRELOAD:
        importlib.import_module(name)
    # Native libraries' own pools (a BLAS) handle a fork themselves (pthread_atfork), as they do under the gateway's
    # forkserver, which preloads the same; a Python thread would be copied holding whatever lock it held.
    if threading.active_count() != 1:
        raise SystemExit(f"flowgate launcher: importing the flows started Python threads "
                         f"({', '.join(t.name for t in threading.enumerate())}); forking flow runs from here is unsafe")
    gc.freeze()  # what the imports made stays out of the collector: children share those pages longer


@dataclass
class Child:
    """A flow run this launcher forked, and the connection of the launch script that asked for it."""

    pid: int
    conn: socket.socket | None
    started: float = field(default_factory=time.monotonic)

    def signal(self, signum: int) -> None:
        # Reaped only by this launcher, so the pid is still this child's. SIGKILL goes to its process group too:
        # the flow run's own children (its steps' forkserver and processes).
        for kill in (os.kill, os.killpg):
            try:
                kill(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
            if signum != signal.SIGKILL:
                break


class Launcher:
    """Accept, fork, relay signals, reap: single-threaded, so every fork copies a process without threads."""

    def __init__(self, path: str):
        self.path = path
        self.owner = os.getpid()
        self.children: dict[int, Child] = {}
        self.selector = selectors.PollSelector()  # no descriptor of its own for a child to inherit
        self.listener: socket.socket | None = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.stopping_since: float | None = None

    def listen(self) -> None:
        """Bind the socket (0600), taking over a stale file but not a launcher that still answers."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # left by a launcher that died
            else:
                raise SystemExit(f"flowgate launcher: another launcher listens at {self.path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        except OSError as exc:
            raise SystemExit(f"flowgate launcher: cannot listen at {self.path} ({exc}); "
                             "set FLOWGATE_LAUNCHER_SOCKET to a shorter path") from exc
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self.listener = listener

    def serve(self) -> FlowRunRequest | None:
        """Run until stopped (returns None), or, in a forked child, return the flow run the child is to run."""
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD reaches the wakeup socket
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        assert self.listener is not None
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        say(f"listening at {self.path}")
        try:
            while self.stopping_since is None or self.children:
                timeout = None if self.stopping_since is None else 1.0
                for key, _ in self.selector.select(timeout):
                    # A signal handler (_stop) may have closed the listener since select() answered
                    if self.listener is not None and key.fileobj is self.listener:
                        request = self._accept()
                        if request is not None:  # only in the forked child
                            return request
                    elif key.fileobj is self.wake_r:
                        self._drain_wakeups()
                    elif isinstance(key.data, Child) and key.data.conn is key.fileobj:
                        self._from_launch_script(key.data)
                self._reap()
                if self.stopping_since is not None and time.monotonic() - self.stopping_since > STOP_GRACE_SECONDS:
                    for child in self.children.values():
                        child.signal(signal.SIGKILL)
            return None
        finally:
            if os.getpid() == self.owner:
                self._close_listener()

    def _stop(self, signum: int, _frame: object) -> None:
        if os.getpid() != self.owner:  # a forked child signalled before it reset its handlers: as by default
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        if self.stopping_since is not None:
            return
        self.stopping_since = time.monotonic()
        self._close_listener()
        for child in self.children.values():
            child.signal(signal.SIGTERM)
        say(f"stopping: no new flow runs; {len(self.children)} running asked to stop")

    def _close_listener(self) -> None:
        if self.listener is None or os.getpid() != self.owner:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> FlowRunRequest | None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        conn.settimeout(REQUEST_TIMEOUT_SECONDS)
        fds: list[int] = []
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
            if uid != os.getuid():
                raise ValueError(f"a connection from uid {uid}")
            body, fds = self._read_request(conn)
            if body is None:  # a probe (the stack's readiness check): connected and closed
                conn.close()
                return None
            request = FlowRunRequest.parse(body)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            say(f"refused a launch request: {exc}")
            try:
                conn.sendall(f"refused {exc}\n".encode())
            except OSError:
                pass
            conn.close()
            for fd in fds:
                os.close(fd)
            return None
        return self._fork(conn, fds, request)

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[bytes | None, list[int]]:
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        if not data:
            return None, fds
        if len(fds) != 3:
            raise ValueError(f"the request came with {len(fds)} descriptors, not stdin, stdout and stderr")
        while len(data) < HEADER.size:
            more = conn.recv(65536)
            if not more:
                raise ValueError("the request ended early")
            data += more
        (length,) = HEADER.unpack_from(data)
        if length > MAX_REQUEST_BYTES:
            raise ValueError(f"a request of {length} bytes")
        while len(data) < HEADER.size + length:
            more = conn.recv(65536)
            if not more:
                raise ValueError("the request ended early")
            data += more
        return data[HEADER.size:HEADER.size + length], fds

    def _fork(self, conn: socket.socket, fds: list[int], request: FlowRunRequest) -> FlowRunRequest | None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_child(conn, fds)
            return request
        for fd in fds:
            os.close(fd)
        flow_run_id = request.env.get("PREFECT__FLOW_RUN_ID", "?")
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:  # the launch script is gone already: so is its flow run
            os.kill(pid, signal.SIGKILL)
        conn.setblocking(False)
        self.children[pid] = child = Child(pid, conn)
        self.selector.register(conn, selectors.EVENT_READ, child)
        say(f"flow run {flow_run_id}: process {pid}")
        return None

    def _become_child(self, conn: socket.socket, fds: list[int]) -> None:
        """In the forked child: nothing of the launcher's but the connection of its own launch script."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # a process group of its own: the launcher kills the flow run's processes as one
        if self.listener is not None:
            self.listener.close()  # closes this process's descriptor; the socket file stays the launcher's
            self.listener = None
        for sock in (self.wake_r, self.wake_w, *(c.conn for c in self.children.values() if c.conn)):
            sock.close()
        self.children.clear()
        self.selector = selectors.PollSelector()
        # Above 2 first: a descriptor received as 0-2 (the launcher started without stdin) is not overwritten
        # before it is used.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):
            os.dup2(fd, target)
            os.close(fd)
        # Kept open for the child's lifetime (and not inherited by what it execs): the launch script's read
        # of this connection ends when the launcher and this process have both closed it.
        conn.detach()

    def _from_launch_script(self, child: Child) -> None:
        assert child.conn is not None
        try:
            data = child.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the launch script is gone (killed): its flow run goes with it
            self._forget_conn(child)
            if child.pid in self.children:
                say(f"process {child.pid}: its launch script is gone; killing its process group")
                child.signal(signal.SIGKILL)
            return
        # The launch script sends nothing after its request: it signals the flow run's process itself (pidfd)

    def _forget_conn(self, child: Child) -> None:
        if child.conn is not None:
            self.selector.unregister(child.conn)
            child.conn.close()
            child.conn = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.conn is not None:
                try:
                    child.conn.setblocking(True)
                    child.conn.sendall(f"exit {status}\n".encode())
                except OSError:
                    pass
                self._forget_conn(child)
            say(f"process {pid}: exit {os.waitstatus_to_exitcode(status)} after "
                f"{time.monotonic() - child.started:.2f} s")


def main() -> None:
    path = socket_path()
    if not path:
        raise SystemExit("flowgate launcher: FLOWGATE_LAUNCHER_SOCKET is empty (launchers are turned off)")
    launcher = Launcher(path)
    started = time.monotonic()
    atexit.register(exit_without_teardown)  # before the imports: the last to run
    preload()
    launcher.listen()
    say(f"imports done in {time.monotonic() - started:.2f} s")
    flow_run = launcher.serve()
    if flow_run is not None:  # this is a forked child: it returns from serve() only to run its flow run
        sys.exit(flow_run.run())
    else:
        gc.unfreeze()  # collectable at exit, as FlowRunRequest.run says


if __name__ == "__main__":
    main()
