"""make bench-usage: the usage pipeline at fleet rate — flusher capacity, storage, Redis memory, queries, end to end.

A script, not a test: one run, figures printed and written to bench/results/usage-<time>.json. Its own redis-server
on a free port and its own PostgreSQL database (BENCH_USAGE_DATABASE_URL, dropped and re-created). Phases:

1. capacity: --backlog-minutes (default 5) of full-rate traffic (--rate requests/s, default 6,800: one gateway node
   in make bench) counted through the gateway's own recorder (200 keys across 20 consumers), sent to Redis, then
   the time one flusher process takes to store it all (its drain); plus a bucket-heavy case (10,000 keys, each
   busy every minute).
2. storage: database growth per request over that backlog (minute rows, rollups, copy tokens, indexes).
3. memory: --memory-minutes (default 10) of full-rate traffic in compressed time (each minute's requests recorded
   and flushed once a simulated second, the minute before copied), Redis used_memory after each minute.
4. queries: 30 days x 10,000 keys of generated rollup rows; the admin overview, the portal's 30-day chart and
   GET /mgmt/v1/usage/?interval=day run once and each of their SQL statements is EXPLAIN ANALYZEd.
5. end to end (when wrk is installed, --duration seconds each, default 60): wrk -c64 against the gateway under
   gunicorn with 200 keys, the flusher following beside it; the stored sum equals the requests wrk completed, the
   lag until it does, and requests/s against the same run with usage accounting off (a bench-only gunicorn hook).

The machine's CPUs are shared: the load average at start and end is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import free_port, load_1min, process, tree_cpu_seconds  # noqa: E402

GATEWAY_RPS = 6_800  # one gateway node on this machine (make bench), the figure the targets are ratios of


def _redis_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _fresh_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _setup_django(database_url: str, redis_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _usage_bytes() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.relkind IN ('r', 'p') AND (c.relname LIKE 'am_usage_%%')"
        )
        return int(cursor.fetchone()[0])


def _cast(tenant_id: str, consumers: int, keys: int) -> tuple[list[str], list[str]]:
    """A tenant with consumers and keys (real rows: the flusher updates the keys' last_used_at)."""
    from apimgmt.models import ApiKey, Consumer, Tenant

    tenant, _ = Tenant.objects.get_or_create(id=tenant_id, defaults={"name": tenant_id})
    made = Consumer.objects.bulk_create(
        [Consumer(tenant=tenant, name=f"{tenant_id}-{i}") for i in range(consumers)], batch_size=1000
    )
    per = keys // consumers
    key_rows = [
        ApiKey(consumer=c, name=f"k{j}", key_prefix="ak_live_bnch", key_hash=os.urandom(32).hex())
        for c in made
        for j in range(per)
    ]
    ApiKey.objects.bulk_create(key_rows, batch_size=1000)
    return [c.pk for c in made], [(k.consumer_id, k.key_id) for k in key_rows]  # type: ignore[misc]


def _record_minutes(
    recorder: Any,
    tenant: str,
    pairs: list[tuple[str, str]],
    start: int,
    minutes: int,
    rate: int,
    client: Any,
    flush_every: float = 1.0,
) -> tuple[int, float]:
    """Count ``rate`` requests/s for ``minutes`` minutes from ``start`` (epoch s); flush once a simulated second."""
    statuses = [200] * 97 + [429, 429, 502]
    record = recorder.record
    n = 0
    cpu = 0.0
    for second in range(minutes * 60):
        now = start + second
        t0 = time.process_time()
        for i in range(rate):
            consumer, key = pairs[(n + i) % len(pairs)]
            record(tenant, "api_bench", consumer, key, statuses[(n + i) % 100], 0, 200, 0.0021, 0.0017, now + i / rate)
        cpu += time.process_time() - t0
        n += rate
        if flush_every and second % int(flush_every) == 0:
            recorder.flush(client)
    recorder.flush(client)
    return n, cpu


def capacity_and_storage(options: argparse.Namespace, client: Any) -> dict[str, Any]:
    from apimgmt.usage import UsageFlusher, flusher_redis
    from gateway.usage import UsageRecorder

    _consumers, pairs = _cast("bench", 20, 200)
    recorder = UsageRecorder(tempfile.mkdtemp(prefix="bench-usage-spool-"))
    start = (int(time.time()) // 60 - options.backlog_minutes - 2) * 60
    t0 = time.perf_counter()
    requests, record_cpu = _record_minutes(
        recorder, "bench", pairs, start, options.backlog_minutes, options.rate, client
    )
    loaded_s = time.perf_counter() - t0
    redis_bytes = int(client.info("memory")["used_memory"])
    before = _usage_bytes()
    flusher = UsageFlusher(client=flusher_redis(os.environ["REDIS_URL"]), consumer="bench")
    t0 = time.perf_counter()
    stats = flusher.drain()
    drain_s = time.perf_counter() - t0
    grown = _usage_bytes() - before
    assert stats.requests == requests, (stats.requests, requests)

    # Bucket-heavy: 10,000 keys, every one busy every minute (one request each: the flusher's worst case per request).
    _c, many = _cast("wide", 1000, 10_000)
    wide = UsageRecorder(tempfile.mkdtemp(prefix="bench-usage-spool-"))
    for minute in range(options.backlog_minutes):
        for consumer, key in many:
            wide.record("wide", "api_bench", consumer, key, 200, 0, 200, 0.002, 0.001, start + minute * 60 + 1)
        wide.flush(client)
    t0 = time.perf_counter()
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        with cProfile.Profile() as profile:
            wide_stats = flusher.drain()
        profile.dump_stats(os.environ["BENCH_PROFILE"])
    else:
        wide_stats = flusher.drain()
    wide_s = time.perf_counter() - t0
    return {
        "backlog_requests": requests,
        "backlog_minutes": options.backlog_minutes,
        "rate_req_per_s": options.rate,
        "gateway_record_us_per_request": round(record_cpu / requests * 1e6, 3),
        "load_into_redis_s": round(loaded_s, 1),
        "redis_used_memory_with_backlog_bytes": redis_bytes,
        "drain_s": round(drain_s, 2),
        "minute_buckets": stats.buckets,
        "flusher_requests_per_s": round(requests / drain_s),
        "flusher_capacity_x_gateway": round(requests / drain_s / GATEWAY_RPS, 1),
        "db_growth_bytes": grown,
        "db_bytes_per_request": round(grown / requests, 4),
        "wide_buckets": wide_stats.buckets,
        "wide_drain_s": round(wide_s, 2),
        "wide_buckets_per_s": round(wide_stats.buckets / wide_s),
    }


def memory(options: argparse.Namespace, client: Any) -> dict[str, Any]:
    from apimgmt.usage import UsageFlusher, flusher_redis
    from gateway.usage import UsageRecorder

    _consumers, pairs = _cast("mem", 20, 200)
    recorder = UsageRecorder(tempfile.mkdtemp(prefix="bench-usage-spool-"))
    flusher = UsageFlusher(client=flusher_redis(os.environ["REDIS_URL"]), consumer="bench-memory")
    # Compressed time: minute k is recorded (flushed once a simulated second), then minute k-1 is copied, as the
    # following flusher does a few seconds after each minute closes; Redis holds the open minute and the last one.
    start = (int(time.time()) // 60 - options.memory_minutes - 2) * 60
    samples = []
    for k in range(options.memory_minutes):
        _record_minutes(recorder, "mem", pairs, start + k * 60, 1, options.rate, client)
        if k:
            while flusher.flush_tenant("mem", closed_only=False, before=start + k * 60).minutes:
                pass
        samples.append(int(client.info("memory")["used_memory"]))
    steady = samples[1:]
    low, high = min(steady), max(steady)
    return {
        "minutes": options.memory_minutes,
        "used_memory_bytes_per_minute": samples,
        "from_minute_2_min_bytes": low,
        "from_minute_2_max_bytes": high,
        "spread_percent": round(100 * (high - low) / low, 1),
    }


def queries(options: argparse.Namespace) -> dict[str, Any]:
    """Generated rollups (30 days x 10,000 keys), then the three pages with every usage statement EXPLAIN ANALYZEd."""
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from apimgmt import usage_partitions
    from apimgmt.models import Consumer, Tenant
    from portal.usage import usage_series

    tenant, _ = Tenant.objects.get_or_create(id="big", defaults={"name": "Big"})
    consumers, _pairs = _cast("big", 1000, 10_000)
    now = datetime.now(tz=UTC)
    days = options.query_days
    usage_partitions.ensure([now - timedelta(days=n) for n in range(days + 2)])
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT key_id, consumer_id FROM am_api_keys k JOIN am_consumers c ON c.id = k.consumer_id "
            "WHERE c.tenant_id = 'big'"
        )
        keys = cursor.fetchall()
        cursor.execute("CREATE TEMP TABLE bench_keys (key_id text, consumer_id text, n int)")
        cursor.executemany("INSERT INTO bench_keys VALUES (%s, %s, %s)", [(k, c, i) for i, (k, c) in enumerate(keys)])
        common = (
            "SELECT 'big', 'api_' || (k.n %% 20), k.consumer_id, k.key_id, t, s.code, s.n, "
            "CASE WHEN s.code >= 500 THEN s.n ELSE 0 END, s.n * 100, s.n * 200, s.n * 2.5, 40.0, s.n * 2.0 "
            "FROM bench_keys k CROSS JOIN (VALUES (200, 50), (429, 2)) AS s (code, n) CROSS JOIN "
        )
        columns = (
            '(tenant_id, api_id, consumer_id, key_id, "timestamp", status_code, request_count, error_count, '
            "bytes_in, bytes_out, latency_ms_sum, latency_ms_max, upstream_latency_ms_sum)"
        )
        cursor.execute(
            f"INSERT INTO am_usage_daily {columns} {common} "
            "generate_series(date_trunc('day', now()) - make_interval(days => %s), date_trunc('day', now()), "
            "interval '1 day') AS t",
            [days],
        )
        cursor.execute(
            f"INSERT INTO am_usage_hourly {columns} {common} "
            "generate_series(date_trunc('hour', now()) - make_interval(hours => %s), date_trunc('hour', now()), "
            "interval '1 hour') AS t",
            [options.query_hours],
        )
        # The flusher adds each bucket to the tenant's, its API's and its consumer's totals as well.
        for source in ("am_usage_hourly", "am_usage_daily"):
            for dimension, value in (("tenant", "''"), ("api", "api_id"), ("consumer", "consumer_id")):
                cursor.execute(
                    f'INSERT INTO {source}_totals (tenant_id, dimension, value, "timestamp", status_code, '
                    "request_count, error_count, bytes_in, bytes_out, latency_ms_sum, latency_ms_max, "
                    f"upstream_latency_ms_sum) SELECT tenant_id, '{dimension}', {value}, \"timestamp\", status_code, "
                    "sum(request_count), sum(error_count), sum(bytes_in), sum(bytes_out), sum(latency_ms_sum), "
                    f"max(latency_ms_max), sum(upstream_latency_ms_sum) FROM {source} WHERE tenant_id = 'big' "
                    "GROUP BY 1, 2, 3, 4, 5"
                )
            cursor.execute(f"ANALYZE {source}")
            cursor.execute(f"ANALYZE {source}_totals")
        cursor.execute(
            "SELECT (SELECT count(*) FROM am_usage_daily), (SELECT count(*) FROM am_usage_hourly), "
            "(SELECT count(*) FROM am_usage_daily_totals), (SELECT count(*) FROM am_usage_hourly_totals)"
        )
        daily_rows, hourly_rows, daily_totals, hourly_totals = cursor.fetchone()
    generated_s = time.perf_counter() - t0

    staff = User.objects.create_superuser("bench-staff", "bench@example.com", "x" * 20)
    client = Client(SERVER_NAME="localhost")
    client.force_login(staff)
    app = Consumer.objects.get(pk=consumers[0])
    pages = {
        "admin_overview_24h": lambda: client.get("/admin/apimgmt/tenant/big/usage/"),
        "portal_chart_30_days": lambda: usage_series(app=app, api_id=None, interval="day"),
        "mgmt_usage_interval_day_30_days": lambda: client.get("/mgmt/v1/usage/?tenant_id=big&interval=day"),
    }
    result: dict[str, Any] = {
        "daily_rows": daily_rows,
        "hourly_rows": hourly_rows,
        "daily_total_rows": daily_totals,
        "hourly_total_rows": hourly_totals,
        "generated_s": round(generated_s),
    }
    for name, call in pages.items():
        call()  # warm: plans, caches
        with CaptureQueriesContext(connection) as captured:
            t0 = time.perf_counter()
            response = call()
            wall_ms = (time.perf_counter() - t0) * 1000
        if hasattr(response, "status_code"):
            assert response.status_code == 200, (name, response.status_code)
        statements = []
        for query in captured.captured_queries:
            sql = query["sql"]
            if "am_usage" not in sql:
                continue
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                plan = cursor.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
            statements.append(
                {
                    "execution_ms": round(plan[0]["Execution Time"], 2),
                    "planning_ms": round(plan[0]["Planning Time"], 2),
                    "sql": sql[:160],
                }
            )
        result[name] = {
            "wall_ms": round(wall_ms, 1),
            "explain_analyze_ms_total": round(sum(s["execution_ms"] + s["planning_ms"] for s in statements), 2),
            "statements": statements,
        }
    _ = tenant
    return result


def end_to_end(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """wrk against the gateway with usage accounting off, then on with a flusher following; stored == completed."""
    import re
    import shutil

    from apimgmt import services
    from apimgmt.models import Policy, Tenant
    from apimgmt.usage import UsageFlusher, flusher_redis
    from bench.bench import NGINX, nginx_conf, wait_for

    if not shutil.which("wrk"):
        return {"skipped": "wrk is not installed"}
    tenant = Tenant.objects.create(id="e2e", name="E2E")
    policy = Policy.objects.create(
        tenant=tenant,
        name="limit",
        policy_type="rate_limiting",
        config={"requests_per_second": 1_000_000, "burst_size": 1000},
    )
    upstream_port, proxy_port, gateway_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    api = services.api_create(
        tenant=tenant,
        api_name="e2e",
        base_path="/e2e",
        upstream_url=f"http://127.0.0.1:{upstream_port}",
        status="active",
        policies=[policy],
        actor=None,
    )
    keys = []
    for c in range(20):
        consumer = services.consumer_create(tenant=tenant, name=f"e2e-{c}", actor=None)
        services.subscription_request(consumer=consumer, api=api, actor=None)
        for _ in range(10):
            keys.append(services.api_key_create(consumer=consumer, actor=None)[1])
    script = workdir / "keys.lua"
    script.write_text(
        "local keys = {" + ",".join(json.dumps(k) for k in keys) + "}\n"
        "local i = 0\n"
        "request = function()\n  i = i + 1\n"
        "  return wrk.format('GET', '/e2e/items/1', {['X-API-Key'] = keys[(i % #keys) + 1]})\nend\n"
    )
    off_conf = workdir / "gunicorn_usage_off.py"
    off_conf.write_text(
        f"exec(open({str(ROOT / 'gunicorn.conf.py')!r}).read())\n"
        "_parent_post_fork = globals().get('post_fork')\n"
        "def post_fork(server, worker):\n"
        "    if _parent_post_fork: _parent_post_fork(server, worker)\n"
        "    import gateway.usage\n"
        "    gateway.usage.UsageRecorder.record = lambda self, *args: None  # bench only: accounting off\n"
    )
    env = {
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "REDIS_URL": os.environ["REDIS_URL"],
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "APIMGMT_ROLE": "gateway",
        "USAGE_SPOOL_DIR": str(workdir / "spool"),
        "METRICS_PORT": str(metrics_port),
        "DEBUG": "1",
    }
    gunicorn = str(ROOT / ".venv" / "bin" / "gunicorn")

    def run(conf: Path, *, flusher: bool) -> dict[str, Any]:
        url = f"http://127.0.0.1:{gateway_port}/e2e/items/1"
        args = [
            gunicorn,
            "apimgmt.wsgi:application",
            "--config",
            str(conf),
            "--bind",
            f"127.0.0.1:{gateway_port}",
            "--workers",
            "2",
        ]
        with process(args, env=env, log=workdir / "gateway.log") as gateway_proc:
            wait_for(url, {"X-API-Key": keys[0]})
            time.sleep(2.5)  # the probe's bucket reaches Redis (workers send once a second)
            baseline = 0
            if flusher:
                UsageFlusher(client=flusher_redis(os.environ["REDIS_URL"]), consumer="bench-baseline").drain()
                baseline = _stored("e2e")
            served_before = _served(metrics_port)
            with (
                process([sys.executable, "manage.py", "flush_usage", "--follow"], env=env, log=workdir / "flusher.log")
                if flusher
                else _null()
            ):
                cpu_before = tree_cpu_seconds(gateway_proc.pid)
                out = subprocess.run(
                    ["wrk", "-t2", "-c64", f"-d{options.duration}s", "-s", str(script), url],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                ended = time.monotonic()
                cpu = tree_cpu_seconds(gateway_proc.pid) - cpu_before
                completed = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
                non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
                time.sleep(1.5)
                served = _served(metrics_port) - served_before
                row: dict[str, Any] = {
                    "rps": rps,
                    "wrk_completed": completed,
                    "gateway_served": served,
                    "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                    "gateway_cpu_us_per_request": round(cpu / completed * 1e6, 1) if completed else None,
                }
                if flusher:
                    deadline = ended + 180
                    stored = 0
                    while time.monotonic() < deadline:
                        stored = _stored("e2e") - baseline
                        if stored >= served:
                            break
                        time.sleep(0.5)
                    row.update(
                        stored=stored,
                        stored_equals_served=stored == served,
                        lag_to_fully_stored_s=round(time.monotonic() - ended, 1),
                    )
        return row

    with process([NGINX, "-c", str(nginx_conf(workdir, upstream_port, proxy_port)), "-p", str(workdir)]):
        # Interleaved rounds, so load from elsewhere on a shared machine falls on both alike; medians compared.
        offs, ons = [], []
        for _ in range(options.rounds):
            offs.append(run(off_conf, flusher=False))
            ons.append(run(ROOT / "gunicorn.conf.py", flusher=True))

    def median(rows: list[dict[str, Any]], field: str) -> float:
        return float(statistics.median(r[field] for r in rows if r.get(field) is not None))

    return {
        "accounting_off": offs,
        "accounting_on": ons,
        "every_on_run_stored_equals_served": all(r["stored_equals_served"] for r in ons),
        "max_lag_to_fully_stored_s": max(r["lag_to_fully_stored_s"] for r in ons),
        "rps_ratio_on_off_median": round(median(ons, "rps") / median(offs, "rps"), 3),
        "cpu_per_request_ratio_on_off_median": round(
            median(ons, "gateway_cpu_us_per_request") / median(offs, "gateway_cpu_us_per_request"), 3
        ),
    }


def _stored(tenant: str) -> int:
    from django.db.models import Sum

    from apimgmt.models import UsageRecord

    return int(UsageRecord.objects.filter(tenant_id=tenant).aggregate(n=Sum("request_count"))["n"] or 0)


def _served(port: int) -> int:
    """Responses the gateway finished for the e2e tenant (its own api_requests_total, all workers)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "api_requests_total" and sample.labels.get("tenant") == "e2e":
                total += sample.value
    return int(total)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=GATEWAY_RPS, help="full rate, requests/s")
    parser.add_argument("--backlog-minutes", type=int, default=5)
    parser.add_argument("--memory-minutes", type=int, default=10)
    parser.add_argument("--query-days", type=int, default=30)
    parser.add_argument("--query-hours", type=int, default=48, help="hourly rows generated (the overview reads 24)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of wrk per end-to-end run")
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end rounds (accounting off, then on)")
    parser.add_argument("--only", default="", help="comma-separated subset: capacity,memory,queries,e2e")
    options = parser.parse_args()
    only = set(filter(None, options.only.split(",")))
    database = os.environ.get("BENCH_USAGE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/apimgmt_bench_usage")
    workdir = Path(tempfile.mkdtemp(prefix="bench-usage-"))
    results: dict[str, Any] = {"started": datetime.now(tz=UTC).isoformat(), "load_1min_at_start": load_1min()}
    redis_proc, redis_url = _redis_server(workdir)
    try:
        _fresh_database(database)
        _setup_django(database, redis_url)
        import redis

        client = redis.Redis.from_url(redis_url)
        for name, phase in (
            ("capacity", lambda: capacity_and_storage(options, client)),
            ("memory", lambda: memory(options, client)),
            ("queries", lambda: queries(options)),
            ("e2e", lambda: end_to_end(options, workdir)),
        ):
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            results[name] = phase()
            results[name]["phase_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({name: results[name]}, indent=2), flush=True)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    results["load_1min_at_end"] = load_1min()
    out = ROOT / "bench" / "results" / f"usage-{datetime.now(tz=UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"load average {results['load_1min_at_start']} -> {results['load_1min_at_end']}; written to {out}")


if __name__ == "__main__":
    main()
