#!/usr/bin/env bash
# Install the Debian packages the test suite drives, when missing (needs root; otherwise explains).
#   scripts/system-deps.sh             Chromium (the portal journey); what `make test` needs beside the servers
#   scripts/system-deps.sh --services  also PostgreSQL and Redis, for a fresh CI machine (.ci/run)
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${1:-}" = "--services" ]; then
  command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing Debian packages: ${missing[*]}. Install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 2
fi
echo "installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
