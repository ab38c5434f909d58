"""A flow run in a child forked by the launcher (flows/prefect/launcher.py): the request its launch script sent, and
becoming the process `python -m prefect.engine` would have been.

The child takes the flow run's working directory, umask and environment (os.environ replaced, then Prefect's root
settings context and logging configuration rebuilt from it: the launcher imported Prefect with its own env), and
runs prefect.engine's code as `__main__` with runpy. sys.modules["__main__"] stays the launcher's module, which
imports only the standard library at its top: multiprocessing imports a parent's main module again in every
child it starts (connectors/isolated.py's steps, and the forkserver they come from preloads it), and
prefect.engine would import all of Prefect into each. The process ends after its atexit handlers without the
interpreter's teardown (exit_without_teardown).
"""
from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys
import warnings
from dataclasses import dataclass

from flows.prefect.launch import PROTOCOL, ROOT


@dataclass
class FlowRunRequest:
    """One flow run as its launch script would have run it: what `python -m prefect.engine` starts from."""

    argv: list[str]
    cwd: str
    umask: int
    env: dict[str, str]

    @classmethod
    def parse(cls, body: bytes) -> FlowRunRequest:
        """The request, or ValueError saying why the launcher will not serve it."""
        document = json.loads(body)
        if document.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol {document.get('protocol')!r}, this launcher speaks {PROTOCOL}")
        if document.get("root") != ROOT:
            raise ValueError(f"launch script of {document.get('root')}, this launcher serves {ROOT}")
        if document.get("executable") != os.path.realpath(sys.executable):
            raise ValueError(f"launch script on {document.get('executable')}, this launcher runs on "
                             f"{os.path.realpath(sys.executable)}")
        return cls(argv=[str(a) for a in document["argv"]], cwd=str(document["cwd"]), umask=int(document["umask"]),
                   env={str(k): str(v) for k, v in document["env"].items()})

    def run(self) -> int:
        """In the forked child: become the flow run's process and run Prefect's engine as `__main__`; its exit
        code."""
        os.chdir(self.cwd)
        os.umask(self.umask)
        os.environ.clear()
        os.environ.update(self.env)
        if self.env.get("PYTHONUNBUFFERED"):
            for stream in (sys.stdout, sys.stderr):
                stream.reconfigure(write_through=True)  # type: ignore[union-attr]
        sys.path[0] = self.cwd  # as `python -m` has it: the working directory first
        spec = importlib.util.find_spec("prefect.engine")
        sys.argv = [spec.origin if spec and spec.origin else "-m", *self.argv]
        # Prefect read its settings and configured logging when the launcher imported it, from the launcher's
        # env: both again, from the flow run's, before anything of the run reads them.
        import prefect.context
        import prefect.logging.configuration as logging_configuration

        prefect.context.refresh_global_settings_context()
        logging_configuration.PROCESS_LOGGING_CONFIG.clear()
        logging_configuration.setup_logging()
        # The engine's code runs as `__main__`, but sys.modules["__main__"] stays this module: multiprocessing
        # imports a parent's main module again in every child it starts (connectors/isolated.py's steps, and the
        # forkserver they come from preloads it), and this one imports nothing but the standard library, where
        # prefect.engine imports all of Prefect into each (about 1.8 s of CPU per flow run here).
        # prefect.flow_engine imports prefect.engine, so it is imported here before it runs as `__main__`, which
        # runpy warns of: expected, and the same module code runs either way.
        warnings.filterwarnings("ignore", message="'prefect.engine' found in sys.modules", category=RuntimeWarning)
        try:
            runpy.run_module("prefect.engine", run_name="__main__")
        except SystemExit as exc:  # as the interpreter reads it
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except Exception:  # noqa: BLE001 - as the interpreter does with one uncaught: the traceback, exit 1
            sys.excepthook(*sys.exc_info())
            code = 1
        else:
            code = 0
        EXIT_WITHOUT_TEARDOWN.append(code)
        return code


# The exit code of a forked flow run, once its engine has returned: the last atexit handler then ends the process
# (exit_without_teardown). A KeyboardInterrupt leaves it empty: the interpreter ends the process by SIGINT, as it
# would have.
EXIT_WITHOUT_TEARDOWN: list[int] = []


def exit_without_teardown() -> None:
    """The last atexit handler of a forked flow run (registered before any module the launcher imports registers
    one): after Python has joined the run's threads and run every other atexit handler (Prefect's drains of
    its log and event queues included), flush stdio and end the process without the interpreter's teardown.

    That teardown deallocates every object of every module imported: in a child of the launcher, whose objects
    are frozen (gc.freeze) and shared with it, it took 2-3 s here, copying each page it touched, and duckdb's
    bindings reported each object still alive then as a leak. A fresh `python -m prefect.engine` pays that teardown
    too, on pages of its own."""
    if not EXIT_WITHOUT_TEARDOWN:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone
            pass
    os._exit(EXIT_WITHOUT_TEARDOWN[0])
