"""gunicorn settings for apimgmt (gateway and control plane); every value can be overridden by the environment."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

# Worker class: gevent, chosen by benchmark on this 2-core machine (the bench/ set-up: nginx upstream, wrk against
# the full gateway; 2 workers each, gthread with 8 threads; same code, same hour, 2 runs each):
#   gevent:  c=64 5.3k req/s, c=1 p50 0.39 ms, ~290 µs CPU per request (user+sys)
#   gthread: c=64 3.7k req/s, c=1 p50 0.48-0.54 ms, ~400 µs CPU per request (its sys time is twice gevent's:
#            the poller thread hands every request to a pool thread and back)
# Before the hot-path work of issue 3's benchmark round (urllib3 client, redis-py pipeline) the order was the
# same (gevent 2.3-3.1k vs gthread 1.8-2.2k req/s; c=1 0.66 vs 0.74 ms). sync workers close keep-alive
# connections and cap concurrency at the worker count (unfit for a proxy that waits on upstreams). gevent also
# lets a worker hold many slow upstream calls. gevent_pywsgi measured the same as gevent (5.5k, ~270 µs).
# The default is gunicorn's gevent worker with a lean path for simple body-less API requests
# (gateway/gunicorn_worker.py): 6.4-6.5k req/s and ~225 µs CPU per request against 5.3-5.4k and ~285 µs for the
# stock gevent worker, same run. GUNICORN_WORKER_CLASS=gevent selects stock gunicorn; re-measure with
# `bench/run.sh --worker-class gevent`.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gateway.gunicorn_worker.GatewayWorker")
workers = int(os.environ.get("GUNICORN_WORKERS", os.environ.get("GATEWAY_WORKERS", "2")))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))  # only used by gthread
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")

# Recycle workers now and then (slow leaks in any dependency), with jitter so they do not restart together.
# A fresh worker imports Django and loads its route table and key cache again (about a second of CPU), so
# recycling every 20k requests (every ~15 s per worker at full load here) cost a visible share of the benchmark;
# 200k is minutes at full load and still bounds a slow leak.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "200000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "20000"))

# Request limits: a header block larger than this is an attack or a bug, not an API call.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# A worker silent this long is killed; in-flight requests get graceful_timeout to finish on shutdown.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# No control socket (gunicorn 25.1+ opens one at $HOME/.gunicorn/gunicorn.ctl for `gunicornc`): every gunicorn of a
# user shares that path, so a second instance on the machine (the echo upstream, a test, a second gateway) takes it
# over and one stopping unlinks the other's; a read-only root filesystem cannot create it; and its asyncio thread in
# the master is one more thing in the way of a fork or a stop. Nothing of apimgmt uses it: signals do the same.
control_socket_disable = True
# Longer than typical load-balancer idle timeouts would risk races; 5 s keeps client connections warm.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))

# The gateway writes its own JSON access line per request (logger gateway.access); gunicorn's would duplicate it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# Prometheus multiprocess mode: every worker writes its samples to files in this directory, which the metrics
# listener below sums. Set before any worker imports prometheus_client.
# A directory this file chose is this process's own, and is removed when gunicorn exits (one given in the
# environment is the deployer's, and left alone).
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(tempfile.gettempdir(), f"apimgmt-prometheus-{os.getpid()}")

# Metrics never go out on the port clients reach (they name every tenant, API and traffic volume): the arbiter serves
# them, summed over its workers, on a listener of their own that only Prometheus is let through to (the image sets
# METRICS_PORT=9100; the chart's NetworkPolicy and docker-compose keep clients off it). Unset or 0: no listener.
_metrics_port_setting = os.environ.get("METRICS_PORT") or "0"
if not _metrics_port_setting.isascii() or not _metrics_port_setting.isdigit() or int(_metrics_port_setting) > 65535:
    raise ValueError(f"METRICS_PORT must be a TCP port number (1-65535, or 0 for none), got {_metrics_port_setting!r}")
_metrics_port = int(_metrics_port_setting)
_metrics_address = os.environ.get("METRICS_ADDRESS", "0.0.0.0")  # noqa: S104 (Prometheus scrapes the pod IP)
_metrics_server: Any = None


def on_starting(server: Any) -> None:
    """Start from an empty metrics directory: files of a previous run would be summed in."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def when_ready(server: Any) -> None:
    """Serve every worker's metrics (the gateway's and django-prometheus's) from the arbiter on METRICS_PORT."""
    global _metrics_server
    if not _metrics_port:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    try:
        _metrics_server, _ = start_http_server(_metrics_port, addr=_metrics_address, registry=registry)
    except OSError:
        # API traffic goes on; Prometheus's ServiceTargetsDown alert shows the missing target.
        server.log.exception("metrics listener could not bind %s:%s", _metrics_address, _metrics_port)
        return
    server.log.info("Metrics on http://%s:%s/metrics", _metrics_address, _metrics_port)


def post_fork(server: Any, worker: Any) -> None:
    """A worker does not keep the arbiter's metrics socket open (a lingering worker would hold the port)."""
    if _metrics_server is not None:
        _metrics_server.socket.close()


def on_exit(server: Any) -> None:
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server.server_close()
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    # The worker count gunicorn really runs (this file, the environment or --workers), for the workers' settings:
    # rate limits kept locally while Redis is down are split across this many processes (settings GATEWAY WORKERS).
    os.environ["GUNICORN_WORKERS"] = str(server.cfg.workers)


def post_worker_init(worker: Any) -> None:
    """Start the worker's gateway (config poller, usage flusher, spool replay) before the first request."""
    try:
        from django.conf import settings

        from apimgmt.process_role import serves_gateway

        if serves_gateway(settings.APIMGMT_ROLE):
            from gateway.gunicorn_response import install
            from gateway.wsgi import get_gateway

            install()  # header block and a small body in one send (see gateway/gunicorn_response.py)
            get_gateway().start()
    except Exception:
        worker.log.exception("gateway start-up failed; it will start on the first request")


def worker_exit(server: Any, worker: Any) -> None:
    """Send this worker's buffered usage events before it goes (spooled if Redis is unavailable)."""
    try:
        from gateway.wsgi import reset_gateway

        reset_gateway()
    except Exception:
        server.log.exception("could not flush usage events on worker exit")


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
