"""gunicorn settings for the data plane (`gunicorn -c gateway/dataplane/gunicorn_conf.py`)."""

import multiprocessing
import os
import shutil
import sys
from pathlib import Path

wsgi_app = "gateway.dataplane.asgi:app"
worker_class = "gateway.dataplane.worker.GatewayWorker"
# The public bind, and the operations bind (/metrics, /healthz, /readyz) that must never be
# exposed publicly: the app tells them apart by the port a request came in on.
bind = [
    os.environ.get("GATEWAY_BIND", "127.0.0.1:8080"),
    os.environ.get("GATEWAY_OPS_BIND", "127.0.0.1:9080"),
]
_var = Path(os.environ.get("VAR_DIR") or Path(__file__).resolve().parents[2] / "var")
# prometheus-client multiprocess mode: every worker writes its samples under this folder.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_var / f"prometheus-{bind[1].rsplit(':', 1)[-1]}")


def on_starting(server) -> None:
    """A fresh metrics folder per start: files of dead workers from last time must not count."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


_redis = os.environ.get("REDIS_URL", "")
_raw_workers = os.environ.get("GATEWAY_WORKERS", "")
try:
    workers = int(_raw_workers) if _raw_workers else (multiprocessing.cpu_count() if _redis else 1)
except ValueError:
    sys.exit(f"GATEWAY_WORKERS must be an integer, got {_raw_workers!r}")
if workers < 1:
    sys.exit("GATEWAY_WORKERS must be at least 1")
if not _redis and workers != 1:
    # Without Redis, limits and quotas are counted in process: several workers would each
    # admit the full limit.
    sys.exit("GATEWAY_WORKERS must be 1 unless REDIS_URL is set (limits are in process)")

keepalive = 75  # longer than typical load-balancer idle timeouts (60 s)
graceful_timeout = 15
timeout = 0  # async worker: gunicorn's heartbeat check does not apply per request
accesslog = None  # every request is logged as an event; no access log on the hot path
# gunicorn's control socket defaults to one shared path in $HOME; the portal and the gateway
# (and tests) would replace each other's. Nothing here uses it.
control_socket_disable = True
