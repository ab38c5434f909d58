"""gunicorn settings for flowgate. GUNICORN_CMD_ARGS and the command line still override every value here."""
import multiprocessing
import os
import signal

# --- server socket ---------------------------------------------------------------------------
# The gateway has no authentication yet: it listens on loopback unless FLOWGATE_HOST says otherwise
# (the Docker image sets 0.0.0.0). FLOWGATE_BIND replaces the whole address.
bind = os.environ.get("FLOWGATE_BIND") or (
    f"{os.environ.get('FLOWGATE_HOST', '127.0.0.1')}:{os.environ.get('FLOW_SERVER_PORT', '5000')}")
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
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")


# --- hooks -----------------------------------------------------------------------------------
def post_worker_init(worker):
    """Start this worker's executor; on SIGTERM stop claiming at once, before gunicorn drains requests."""
    services = worker.wsgi.extensions["flowgate"]
    executor = services.executor
    executor.start()
    services.dispatcher.start_sync()
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
    executor = services.executor
    # gunicorn kills the worker graceful_timeout after SIGTERM; keep a second to write the records.
    unfinished = executor.shutdown(timeout=max(server.cfg.graceful_timeout - 1, 0))
    if unfinished:
        server.log.warning("worker %s left %d run(s) unfinished, recorded as crashed: %s",
                           worker.pid, len(unfinished), ", ".join(unfinished))
