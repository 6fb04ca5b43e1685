"""gunicorn settings for the demo echo upstream (``gunicorn -c python:apimgmt.echo_gunicorn apimgmt.echo:app``).

The echo upstream is not Django and not the gateway. Without a config of its own, gunicorn would read
``./gunicorn.conf.py`` from the working directory and run the gateway's worker class and hooks in it, which
log errors at every start ("settings are not configured") and every stop ("could not flush usage events").
"""

from __future__ import annotations

import os

# Plain threads: the echo answers at once, needs no gevent, and must not load the gateway's worker.
worker_class = "gthread"
workers = int(os.environ.get("ECHO_WORKERS", "1"))
threads = int(os.environ.get("ECHO_THREADS", "8"))
bind = os.environ.get("ECHO_BIND", "127.0.0.1:8081")
# Clients of the demo upstream are the gateway's pooled connections: keep them warm a little.
keepalive = 5
graceful_timeout = 5
control_socket_disable = True  # as in ./gunicorn.conf.py: the shared $HOME/.gunicorn/gunicorn.ctl is not ours to take
accesslog = None
errorlog = "-"
loglevel = os.environ.get("ECHO_LOG_LEVEL", "warning").lower()
