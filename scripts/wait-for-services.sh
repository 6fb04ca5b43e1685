#!/usr/bin/env bash
# Fail fast, with instructions, when the PostgreSQL or Redis the tests need does not answer.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import os, sys, socket
from urllib.parse import urlsplit

problems = []
for var, default_port, hint in (
    ("DATABASE_URL", 5432, "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
    ("REDIS_URL", 6379, 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'),
):
    url = urlsplit(os.environ[var])
    host, port = url.hostname or "127.0.0.1", url.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        problems.append(f"{var}: cannot reach {host}:{port} ({exc}). Start it with:\n    {hint}")
if problems:
    print("The test suite needs a real PostgreSQL and Redis.\n" + "\n".join(problems), file=sys.stderr)
    sys.exit(2)
PYEOF
