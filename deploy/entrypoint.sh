#!/bin/sh
# Container entry point: create the writable directories the app expects, then run the given command.
# Shortcuts: gateway | control | migrate | flush-usage | deliver-events | echo | demo; anything else runs as given.
set -eu

mkdir -p "${PROMETHEUS_MULTIPROC_DIR:-/var/run/apimgmt/prometheus}" "${USAGE_SPOOL_DIR:-/var/lib/apimgmt/spool}"

case "${1:-}" in
  gateway)
    shift
    export APIMGMT_ROLE=gateway
    exec gunicorn apimgmt.wsgi:application --config gunicorn.conf.py "$@"
    ;;
  control)
    shift
    export APIMGMT_ROLE=control
    exec gunicorn apimgmt.wsgi:application --config gunicorn.conf.py "$@"
    ;;
  migrate)
    shift
    exec python manage.py migrate --noinput "$@"
    ;;
  flush-usage)
    shift
    exec python manage.py flush_usage --follow "$@"
    ;;
  deliver-events)
    shift
    exec python manage.py deliver_events --follow "$@"
    ;;
  echo)
    shift
    exec gunicorn apimgmt.echo:app --config python:apimgmt.echo_gunicorn --bind "0.0.0.0:${PORT:-8000}" --workers 2 "$@"
    ;;
  demo)
    shift
    exec python manage.py demo --json "$@"
    ;;
esac
exec "$@"
