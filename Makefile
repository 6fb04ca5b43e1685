# The doors: make run, make test, make check, make bench.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The suite runs against DATABASE_URL / REDIS_URL when set, else the local servers on their default ports
# (Redis database 9, which the tests flush).
TEST_DATABASE_URL ?= $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:5432/test)
TEST_REDIS_URL ?= $(or $(REDIS_URL),redis://127.0.0.1:6379/9)
# Two processes, each test file kept whole on one (module-scoped servers are started once); each worker has its own
# test database and Redis database (apimgmt/settings.py). `make test PYTEST_ARGS=tests/gateway` runs a part
# in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: run test check bench bench-config bench-scale bench-usage bench-websocket install lock system-deps lint typecheck clean

# requirements-dev.txt is the whole development set (the runtime lock's pins plus the tools), every package with
# its hashes: pip refuses anything the lock does not name.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Re-resolve requirements.txt from requirements.in and requirements-dev.txt from requirements-dev.in (keeping the
# current pins where they still fit; `make lock LOCK_ARGS=--upgrade` moves everything to the newest releases).
lock: $(STAMP)
	$(PY) scripts/lock.py compile $(LOCK_ARGS)

# Debian packages the tests drive (Chromium for the portal journey); no-op when present.
system-deps:
	@bash scripts/system-deps.sh

run: $(STAMP)
	@bash scripts/run.sh

test: $(STAMP) system-deps
	@DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) bash scripts/wait-for-services.sh
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(PY) -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(PY) scripts/lock.py check
	$(VENV)/bin/lint-imports
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	DEBUG=1 $(PY) -m mypy apimgmt gateway portal
	DEBUG=1 $(PY) manage.py makemigrations --check --dry-run
	DEBUG=0 SECRET_KEY=ci-check-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFG \
	  KEY_HASH_PEPPER=ci-check-pepper-0123456789abcdefghijklmnopqrstuvwxyz \
	  ALLOWED_HOSTS=apimgmt.example.com SECURE_SSL_REDIRECT=1 SECURE_HSTS_SECONDS=31536000 \
	  DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/9 \
	  SECURE_HSTS_INCLUDE_SUBDOMAINS=1 SECURE_HSTS_PRELOAD=1 \
	  $(PY) manage.py check --deploy --fail-level WARNING

bench: $(STAMP)
	@bash bench/run.sh

# WebSocket echo round trips (gateway vs direct, 64 connections) and 2,000 idle connections on one worker.
bench-websocket: $(STAMP)
	DATABASE_URL=$(or $(BENCH_DATABASE_URL),postgres://postgres@127.0.0.1:5432/apimgmt_bench) \
	REDIS_URL=$(or $(BENCH_REDIS_URL),redis://127.0.0.1:6379/3) .venv/bin/python -m bench.websocket

# Configuration as code at size: export, plan and apply of 500 APIs, 200 policies and 50 plans (wall and CPU time,
# statements), and request validation's CPU per request (bench/config_bench.py; its own database, made if missing).
bench-config: $(STAMP)
	DATABASE_URL=$(or $(BENCH_CONFIG_DATABASE_URL),postgres://postgres@127.0.0.1:5432/apimgmt_bench_config) \
	  REDIS_URL=$(or $(BENCH_CONFIG_REDIS_URL),redis://127.0.0.1:6379/5) $(PY) bench/config_bench.py --migrate $(BENCH_ARGS)

# 10,000 APIs / 1,000 tenants / 1,000,000 keys: route table, key churn, Redis Cluster vs standalone (bench/scale.py).
bench-scale: $(STAMP)
	DATABASE_URL=$(or $(BENCH_SCALE_DATABASE_URL),postgres://postgres@127.0.0.1:5432/apimgmt_bench_scale) \
	  REDIS_URL=$(or $(BENCH_SCALE_REDIS_URL),redis://127.0.0.1:6379/4) $(PY) bench/scale.py $(BENCH_ARGS)

# Usage accounting at fleet rate: flusher capacity, bytes per request, Redis memory, rollup queries, wrk end to end
# (bench/usage.py; its own redis-server and database; BENCH_ARGS="--duration 30" shortens the wrk runs).
bench-usage: $(STAMP)
	DATABASE_URL= BENCH_USAGE_DATABASE_URL=$(or $(BENCH_USAGE_DATABASE_URL),postgres://postgres@127.0.0.1:5432/apimgmt_bench_usage) \
	  $(PY) bench/usage.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
