"""gunicorn settings for flowgate. GUNICORN_CMD_ARGS and the command line still override every value here.

flowgate's own variables (FLOWGATE_*, FLOW_SERVER_PORT) are read by its Settings only, here too: a bad value stops
the master before any worker starts, naming the variable. GUNICORN_* and WEB_CONCURRENCY are gunicorn's."""
import os
import shutil
import signal
import socket
import sys

from pydantic import ValidationError

from flows.runtime import RuntimeSettings

# --- metrics -------------------------------------------------------------------------------------
# prometheus_client's multiprocess mode: every worker writes its samples under this folder, /metrics sums them;
# the folder is emptied when the master starts. Set before `app` is imported: importing it imports
# prometheus_client, which picks its mode then, for the master and every worker forked from it (set after, each
# worker counted in memory and /metrics summed empty files: zeros).
try:
    _var_dir = RuntimeSettings().var_dir
except ValidationError:  # load_settings() below stops the start with a message naming the variable
    _var_dir = None
if _var_dir is not None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_var_dir / "prometheus-multiproc"))
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from app import exposure  # noqa: E402
from app.config import load_settings  # noqa: E402
from app.gunicorn_worker import HeaderTimeoutWorker  # noqa: E402

_settings = load_settings()

# --- server socket ---------------------------------------------------------------------------
# FLOWGATE_HOST (127.0.0.1 by default; the Docker image sets 0.0.0.0) and FLOW_SERVER_PORT, or FLOWGATE_BIND
# for the whole address. Without API keys the gateway serves loopback only, whatever the address says,
# unless FLOWGATE_ALLOW_UNAUTHENTICATED=true (app/exposure.py).
bind, _requested_bind = exposure.bind_address(_settings)
backlog = 2048

# --- workers ---------------------------------------------------------------------------------
# Threads serve requests (a `wait` trigger holds one); pipelines run on the executor's own threads, each in a
# process forked from the one forkserver, so a running pipeline holds no request thread and no worker. 2 workers by
# default, whatever the cores (gunicorn's 2 x cores + 1 is for workers that block on each request): two use two
# cores for requests and one answers while the other restarts, and a 1 GB container holds them (~275 MB PSS for the
# gateway with 3 at rest, docs/benchmarks.md) with room for their runs. More cores, more traffic: WEB_CONCURRENCY.
workers = int(os.environ.get("WEB_CONCURRENCY", 2))
threads = int(os.environ.get("GUNICORN_THREADS", 8))
# gthread, but a request's line and headers must arrive within GUNICORN_HEADER_TIMEOUT seconds, read without a
# thread (gunicorn 27 has no such setting: a client sending a header every few seconds held a thread for ever).
# See app/gunicorn_worker.py; in production a buffering proxy in front bounds slow clients first
# (docs/operations.md: Security).
worker_class = HeaderTimeoutWorker.with_timeout(float(os.environ.get("GUNICORN_HEADER_TIMEOUT", 10)))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 60))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 30))


# Idle connections stay open longer than the clients and load balancers in front keep theirs (AWS ALB: 60 s), so the
# client side closes first. The other way round, a request sent just as the server closes dies with the connection
# (with this at 5, 2 of 40 POSTs a JDK client sent every ~5 s failed: "HTTP/1.1 header parser received no bytes"),
# and no client resends a POST on its own. An idle connection costs gthread no thread (gunicorn 27.0.1,
# workers/gthread.py): after a response it goes back on the worker's selector (`keepalived_conns`) and reaches a
# thread only when the next request arrives. What bounds them is `worker_connections` (1000 per worker, idle ones
# included): past 1000 minus `threads` kept alive, responses say `Connection: close`; at 1000 the worker stops
# accepting until some close. A stopping worker closes its idle connections within 2 s, whatever this says.
keepalive = _settings.keepalive_seconds
# gunicorn's control socket (gunicornc: scale, reload, stop) sits at one path per user: two gateways on a host
# would take it from each other, and nothing of flowgate uses it. Signals (HUP, TERM, TTIN/TTOU) still work.
control_socket_disable = True
# The app (database engine, executor threads) is built in each worker after the fork, never in the master.
preload_app = False

# --- logging ---------------------------------------------------------------------------------
# One JSON object per line on stdout, gunicorn's own lines and access log included, each with the
# request id (and, from an executor thread, the run id). FLOWGATE_LOG_FORMAT=text keeps gunicorn's plain lines.
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Plain lines: the path without its query string (a key sent as `?api_key=` must not reach the log).
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s"'
if _settings.log_format == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "app.logs.ContextFilter"}},
        "formatters": {"json": {"()": "app.logs.JsonLines"}, "access": {"()": "app.logs.AccessJsonLines"}},
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "json",
                       "filters": ["context"]},
            "access": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "access",
                       "filters": ["context"]},
        },
        "root": {"level": loglevel.upper(), "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": loglevel.upper(), "handlers": ["stdout"], "propagate": False,
                               "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False,
                                "qualname": "gunicorn.access"},
        },
    }


# --- hooks -----------------------------------------------------------------------------------
def on_starting(server):
    """Refuse an exposed bind without keys, after every override; then a fresh metrics folder (samples of a
    previous master's workers must not be summed in); then the run store's migrations, once, before any worker."""
    exposure.guard(_settings, server.cfg.address, "gunicorn would listen on")
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    _migrate(server)


def _migrate(server):
    """Bring the run store to the newest schema here, so the workers forked from this process know it is (they boot
    without the database: one restarting while the database hangs would otherwise fail to boot, and gunicorn stops
    the whole gateway when a worker fails to boot). A database that cannot be reached now stops the start."""
    from app.runs.store import RunStore

    store = RunStore(_settings.run_store_url)
    try:
        store.create_schema()
    except Exception as exc:
        server.log.error("flowgate: the run store could not be brought to the newest schema: %s", exc)
        sys.exit(1)
    finally:
        store.dispose()  # nothing of the run store stays open in the master that forks the workers


def child_exit(server, worker):
    """A dead worker's live gauges (circuit state, probe latency) stop counting, and the runs it held end at once
    (`crashed`, process_died), not a lease later: it exited, whatever it held cannot be running any more (its
    connector processes die with it). A worker that drained on SIGTERM holds none by now."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    from app.runs.store import RunStore

    store = RunStore(_settings.run_store_url)
    try:
        crashed = store.crash_runs_of_process(socket.gethostname(), worker.pid)
    except Exception:  # the lease ends them all the same, a lease later
        server.log.exception("recording the runs of dead worker %s failed; their leases will lapse", worker.pid)
        crashed = []
    finally:
        store.dispose()  # nothing of the run store stays open in the master that forks the next worker
    if crashed:
        server.log.warning("worker %s died holding run(s) %s: recorded crashed", worker.pid, ", ".join(crashed))


def when_ready(server):
    """Check the sockets gunicorn really listens on (inherited ones too), then say how the gateway is
    protected, once, naming those addresses."""
    listening = [listener.sock.getsockname() for listener in server.LISTENERS]
    try:
        exposure.guard(_settings, listening, "it listens on")
    except exposure.Exposed as exc:
        server.log.error("%s", exc)
        server.halt(reason=str(exc), exit_status=1)
    _share_forkserver(server)
    shown = ", ".join(exposure.shown(a) for a in listening)
    loopback_only = all(exposure.serves_loopback_only(a) for a in listening)
    if _settings.api_keys or _settings.api_keys_file:
        server.log.info("flowgate: API keys required on every path but /health (listening on %s)", shown)
    elif bind != _requested_bind and loopback_only:
        server.log.warning("flowgate: no API keys configured (FLOWGATE_API_KEYS): serving on %s only, not %s; "
                           "set keys, or FLOWGATE_ALLOW_UNAUTHENTICATED=true to serve openly", shown, _requested_bind)
    else:
        server.log.warning("flowgate: no API keys configured (FLOWGATE_API_KEYS): anyone who reaches %s can "
                           "trigger runs%s", shown, "" if loopback_only else " (FLOWGATE_ALLOW_UNAUTHENTICATED)")


def _share_forkserver(server):
    """One forkserver (and resource tracker) for every worker's connector runs, started here before the first fork
    and adopted by each worker (post_fork): a forkserver holds ~120 MB of dlt, DuckDB and pyarrow, one per worker
    was most of the gateway's memory (docs/benchmarks.md). Not with FLOWGATE_EXECUTOR_THREADS=0 (no runs here)."""
    if _settings.executor_threads <= 0:
        return
    from connectors.shared_forkserver import share_forkserver

    server.log.info("flowgate: connector runs fork from one forkserver (pid %s) shared by the workers",
                    share_forkserver())


def post_fork(server, worker):
    """Before the worker imports the app: use the master's forkserver, not one of its own."""
    from connectors.shared_forkserver import adopt_forkserver

    adopt_forkserver()


def post_worker_init(worker):
    """Start this worker's loops and executor; on SIGTERM stop claiming at once, before gunicorn drains requests."""
    services = worker.wsgi.extensions["flowgate"]
    services.start()
    executor = services.executor
    gunicorn_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        executor.stop_claiming()
        gunicorn_term(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    worker.flowgate_services = services


def worker_exit(server, worker):
    """Let running pipelines finish within the graceful timeout; record the ones that cannot."""
    services = getattr(worker, "flowgate_services", None)
    if services is None:  # the worker died before its executor started
        return
    # gunicorn kills the worker graceful_timeout after SIGTERM; keep a second to write the records.
    unfinished = services.stop(timeout=max(server.cfg.graceful_timeout - 1, 0))
    if unfinished:
        server.log.warning("worker %s left %d run(s) unfinished, recorded as crashed: %s",
                           worker.pid, len(unfinished), ", ".join(unfinished))
