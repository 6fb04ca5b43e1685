#!/usr/bin/env bash
# make bench: upstream direct vs nginx proxy vs a naive Django proxy vs the full gateway, with wrk; then the
# WebSocket rows (bench/websocket.py: echo round trips gateway vs direct, 2,000 idle connections), each PASS or FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} (apt-get)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}"
fi

export DATABASE_URL="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/apimgmt_bench}"
export REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379/3}"
exec .venv/bin/python bench/bench.py "$@"
