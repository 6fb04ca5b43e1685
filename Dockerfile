# syntax=docker/dockerfile:1
# One image for every apimgmt role: gateway, control plane, usage flusher, migrations, echo upstream.
# The role is chosen at run time by APIMGMT_ROLE (all | gateway | control) and by the command.

ARG PYTHON_VERSION=3.11

# --- build stage: compilers live here only -----------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The runtime lock (make lock): the whole closure, pinned, with hashes; pip refuses anything it does not name.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --upgrade pip \
    && pip install --require-hashes -r /tmp/requirements.txt

WORKDIR /app
COPY . /app
# Static files are collected at build time so the image is self-contained.
# collectstatic needs settings to import; these throwaway values exist only in this stage.
RUN DEBUG=0 SECRET_KEY=build-only-not-a-secret KEY_HASH_PEPPER=build-only-pepper-not-a-secret-0123456789 \
    python manage.py collectstatic --noinput \
    && python -m compileall -q apimgmt gateway portal

# --- final stage: no build tools, no root -----------------------------------
# HOME=/tmp: gunicorn keeps its control socket under $HOME, and /app is read-only.
FROM python:${PYTHON_VERSION}-slim-bookworm AS final
LABEL org.opencontainers.image.title="apimgmt" \
      org.opencontainers.image.description="API management on Django: gateway, developer portal, management API" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APIMGMT_ROLE=all \
    PORT=8000 \
    HOME=/tmp \
    PROMETHEUS_MULTIPROC_DIR=/var/run/apimgmt/prometheus \
    METRICS_PORT=9100 \
    USAGE_SPOOL_DIR=/var/lib/apimgmt/spool

RUN groupadd --system --gid 10001 apimgmt \
    && useradd --system --uid 10001 --gid apimgmt --home-dir /app --shell /usr/sbin/nologin apimgmt \
    && mkdir -p /var/run/apimgmt/prometheus /var/lib/apimgmt/spool \
    && chown -R apimgmt:apimgmt /var/run/apimgmt /var/lib/apimgmt

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
WORKDIR /app

USER 10001:10001
# 8000: HTTP (API traffic, admin, portal, probes). 9100: Prometheus metrics of gunicorn's workers (METRICS_PORT),
# for Prometheus only: never route it from outside.
EXPOSE 8000 9100

# /health is the liveness probe: cheap, no database. Python, because the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/app/deploy/entrypoint.sh"]
CMD ["gunicorn", "apimgmt.wsgi:application", "--config", "gunicorn.conf.py"]
