#!/usr/bin/env bash
# `make run`: migrate, load the demo, start the echo upstream, the app (gateway + control plane), the usage
# flusher and the event deliverer, print the URLs and credentials; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
ECHO_PORT=${ECHO_PORT:-8081}

export DEBUG=${DEBUG:-1}
export UPSTREAM_ALLOW_PRIVATE=${UPSTREAM_ALLOW_PRIVATE:-1}
export SITE_URL=${SITE_URL:-http://$HOST:$PORT}
export USAGE_SPOOL_DIR=${USAGE_SPOOL_DIR:-$PWD/var/spool}
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-$PWD/var/prometheus}
# Prometheus metrics of every worker on their own port (gunicorn.conf.py), never on $PORT.
export METRICS_PORT=${METRICS_PORT:-9100} METRICS_ADDRESS=${METRICS_ADDRESS:-$HOST}
mkdir -p var "$USAGE_SPOOL_DIR" "$PROMETHEUS_MULTIPROC_DIR"

# PostgreSQL and Redis when they answer on their default ports, else SQLite and local memory.
if [ -z "${DATABASE_URL:-}" ]; then
  if "$PY" - <<'PYEOF' 2>/dev/null
import psycopg
with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=2) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'apimgmt'").fetchone():
        conn.execute("CREATE DATABASE apimgmt")
PYEOF
  then export DATABASE_URL=postgres://postgres@127.0.0.1:5432/apimgmt
  else echo "PostgreSQL is not reachable on 127.0.0.1:5432: using SQLite (db.sqlite3)"
  fi
fi
if [ -z "${REDIS_URL:-}" ]; then
  if "$PY" -c "import redis; redis.Redis(socket_timeout=1).ping()" 2>/dev/null; then
    export REDIS_URL=redis://127.0.0.1:6379/0
  else
    echo "Redis is not reachable on 127.0.0.1:6379: rate limits and caches are per worker"
  fi
fi

"$PY" manage.py migrate --noinput -v0
"$PY" manage.py collectstatic --noinput -v0
demo_json=$("$PY" manage.py demo --json --upstream "http://127.0.0.1:$ECHO_PORT")

pids=()
cleanup() {
  trap - INT TERM HUP EXIT
  echo; echo "stopping…"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Each stops on its own within a second or two; one that is stuck gets 20 s, then is killed, so that Ctrl-C always
  # ends `make run` (a usage minute cut short is copied exactly once all the same).
  for _ in $(seq 200); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then echo "process $pid did not stop in 20 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  wait 2>/dev/null || true
}
trap cleanup INT TERM HUP EXIT

# gunicorn runs in a session of its own (setsid), so Ctrl-C reaches only this script, whose cleanup stops each
# master, which stops its workers. A Ctrl-C that also hit the gevent workers directly made them print a
# SystemExit traceback on the way out.
detached=()
command -v setsid >/dev/null && detached=(setsid)
# The echo upstream has its own gunicorn settings: ./gunicorn.conf.py (the gateway's hooks) is not for it.
"${detached[@]}" .venv/bin/gunicorn apimgmt.echo:app --config python:apimgmt.echo_gunicorn \
  --bind "127.0.0.1:$ECHO_PORT" &
pids+=($!)
gunicorn_args=(apimgmt.wsgi:application --bind "$HOST:$PORT")
[ -f gunicorn.conf.py ] && gunicorn_args+=(--config gunicorn.conf.py)
"${detached[@]}" .venv/bin/gunicorn "${gunicorn_args[@]}" &
pids+=($!)
if "$PY" manage.py help flush_usage >/dev/null 2>&1 && [ -n "${REDIS_URL:-}" ]; then
  "$PY" manage.py flush_usage --follow &
  pids+=($!)
fi
# Events out: webhooks, key.expiring notices and scheduled plan changes (with or without Redis).
"$PY" manage.py deliver_events --follow &
pids+=($!)

# The banner is made first and printed by this shell: once it shows, no foreground child is running, so a Ctrl-C
# reaches the trap at once. (A child still exiting when Ctrl-C came would take it as handled: bash then waits on.)
banner=$("$PY" - "$demo_json" "$HOST" "$PORT" "$ECHO_PORT" <<'PYEOF'
import json, os, sys
demo, host, port, echo_port = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
base = f"http://{host}:{port}"
print(f"""
apimgmt is running.
  Admin:          {base}/admin/   (user {demo['admin_username']}, password {demo['admin_password']})
  Portal:         {demo['portal_url']}
  Management API: {base}/mgmt/v1/   (Authorization: Token {demo['api_token']})   docs: {base}/mgmt/docs/
  Gateway:        {base}{demo['api_base_path']}/   -> echo upstream on 127.0.0.1:{echo_port}
  Demo API key:   {demo['api_key']}
  Probes:         {base}/health  {base}/ready
  Metrics:        http://{host}:{os.environ['METRICS_PORT']}/metrics   (Prometheus only; /metrics on {port} is 404)

Try:  curl -H 'X-API-Key: {demo['api_key']}' {base}{demo['api_base_path']}/hello
Ctrl-C stops everything.
""")
PYEOF
)
printf '%s\n\n' "$banner"
wait -n "${pids[@]}"
