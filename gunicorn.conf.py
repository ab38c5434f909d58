"""gunicorn settings for flowgate. GUNICORN_CMD_ARGS and the command line still override every value here."""
import ipaddress
import multiprocessing
import os
import shutil
import signal

# --- metrics -------------------------------------------------------------------------------------
# prometheus_client's multiprocess mode: every worker writes its samples under this folder (set before
# any worker imports prometheus_client), /metrics sums them; the folder is emptied when the master starts.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR",
                      os.path.join(os.environ.get("FLOWGATE_VAR_DIR", "var"), "prometheus-multiproc"))
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

# --- server socket ---------------------------------------------------------------------------
# FLOWGATE_HOST (127.0.0.1 by default; the Docker image sets 0.0.0.0) and FLOW_SERVER_PORT, or FLOWGATE_BIND
# for the whole address. Without API keys the gateway serves loopback only, whatever the address says,
# unless FLOWGATE_ALLOW_UNAUTHENTICATED=true: an open gateway must be a decision, not an accident.
_port = os.environ.get("FLOW_SERVER_PORT", "5000")
bind = os.environ.get("FLOWGATE_BIND") or f"{os.environ.get('FLOWGATE_HOST', '127.0.0.1')}:{_port}"
_keys_configured = bool(os.environ.get("FLOWGATE_API_KEYS") or os.environ.get("FLOWGATE_API_KEYS_FILE"))
_allow_unauthenticated = os.environ.get("FLOWGATE_ALLOW_UNAUTHENTICATED", "").lower() in ("1", "true", "yes")


def _loopback(address):
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or address.startswith("unix:")


_requested_bind = bind
if not _keys_configured and not _allow_unauthenticated and not _loopback(bind):
    bind = f"127.0.0.1:{bind.rsplit(':', 1)[-1] if ':' in bind else _port}"
backlog = 2048

# --- workers ---------------------------------------------------------------------------------
# Threads serve requests (a `wait` trigger holds one); pipelines run on the executor's own threads.
workers = int(os.environ.get("WEB_CONCURRENCY", min(multiprocessing.cpu_count() * 2 + 1, 8)))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", 8))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 60))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 30))
keepalive = 5
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
if os.environ.get("FLOWGATE_LOG_FORMAT", "json") == "json":
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
    """A fresh metrics folder: samples of a previous master's workers must not be summed in."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def child_exit(server, worker):
    """A dead worker's live gauges (circuit state, probe latency) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def when_ready(server):
    """Say how the gateway is protected, once, at start-up."""
    if _keys_configured:
        server.log.info("flowgate: API keys required on every path but /health")
    elif bind != _requested_bind:
        server.log.warning("flowgate: no API keys configured (FLOWGATE_API_KEYS): serving on %s only, not %s; "
                           "set keys, or FLOWGATE_ALLOW_UNAUTHENTICATED=true to serve openly", bind, _requested_bind)
    else:
        server.log.warning("flowgate: no API keys configured (FLOWGATE_API_KEYS): anyone who reaches %s can "
                           "trigger runs%s", bind, "" if _loopback(bind) else " (FLOWGATE_ALLOW_UNAUTHENTICATED)")


def post_worker_init(worker):
    """Start this worker's executor; on SIGTERM stop claiming at once, before gunicorn drains requests."""
    services = worker.wsgi.extensions["flowgate"]
    executor = services.executor
    executor.start()
    services.dispatcher.start_sync()
    services.callbacks.start()
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
    services.dispatcher.stop_sync()
    services.callbacks.stop()
    executor = services.executor
    # gunicorn kills the worker graceful_timeout after SIGTERM; keep a second to write the records.
    unfinished = executor.shutdown(timeout=max(server.cfg.graceful_timeout - 1, 0))
    if unfinished:
        server.log.warning("worker %s left %d run(s) unfinished, recorded as crashed: %s",
                           worker.pid, len(unfinished), ", ".join(unfinished))
