"""make bench-scale: the gateway at fleet scale — 10,000 APIs, 1,000 tenants, 1,000,000 keys — under key churn,
and on a local Redis Cluster against standalone Redis.

Steps (each bounded; the whole run takes a few minutes):

1. Setup by bulk SQL (copies of template rows made through the services, ``generate_series`` for the rest): 1,000
   tenants x 10 APIs (one rate-limit policy each), 10 consumers per tenant subscribed to its 10 APIs, 100 keys
   per consumer; plus 1,000 usable keys for traffic and 1,000 to revoke. Kept between runs (the database is the
   bench's own); ``--rebuild`` starts again.
2. Route table: build time and query count in this process; a new gunicorn worker's RSS and the time from spawn
   to its first proxied request.
3. Key churn: wrk -t2 -c64 over the 1,000 traffic keys with no churn, then with 10 revocations per second beside
   it (through the services, as an admin would), interleaved three times; gateway requests/s and CPU per request
   of both, and the gateway's database queries per second (django_db_execute_total of the gateway workers, from
   their Prometheus multiprocess files). The gateway runs with a one-hour key cache TTL so that what is measured
   is the churn, not the 30 s TTL's periodic refill (about workers x keys / 30 lookups per second, with or
   without churn).
4. Cluster against standalone: the same gateway row (one key, c=64) on a 3-master local Redis Cluster and on
   standalone Redis, interleaved; requests/s and gateway CPU per request.

Results are printed and written to bench/results/scale-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import NGINX, free_port, nginx_conf, process, rss_mib, tree_cpu_seconds, wait_for  # noqa: E402

TENANTS, APIS_PER_TENANT, CONSUMERS_PER_TENANT, KEYS_PER_CONSUMER = 1000, 10, 10, 100
TRAFFIC_KEYS, CHURN_KEYS = 1000, 1000
SECRET_ENV = {
    "SECRET_KEY": "bench-scale-secret-key-" + "x" * 40,
    "KEY_HASH_PEPPER": "bench-scale-pepper-" + "y" * 40,
}


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# -- 1. setup ---------------------------------------------------------------------------------------------------


def populate(upstream: str, rebuild: bool) -> dict[str, Any]:
    """The fleet, by bulk SQL; returns the plaintexts of the traffic and churn keys (kept in a side table)."""
    from django.db import connection

    from apimgmt import keys, services
    from apimgmt.models import Api, ApiKey, Consumer, Policy, Subscription, Tenant

    cache = ROOT / "bench" / "results" / "scale-keys.json"
    if not rebuild and cache.exists() and ApiKey.objects.count() >= TENANTS * CONSUMERS_PER_TENANT * KEYS_PER_CONSUMER:
        log("fleet already in the database (use --rebuild to make it again)")
        saved = json.loads(cache.read_text())
        Api.objects.update(upstream_url=upstream)  # nginx listens on a new port each run
        ApiKey.objects.filter(consumer__name="churn").update(active=True, revoked_at=None)  # revoke them again
        return saved
    started = time.monotonic()
    with connection.cursor() as cur:
        cur.execute(
            "TRUNCATE am_tenants, am_apis, am_consumers, am_api_keys, am_subscriptions, am_policies, "
            "am_api_policies, am_plans, am_audit_events CASCADE"
        )
    # Templates through the services (every column as the product writes it), then copied by SQL.
    tenant = services.tenant_create(id="t0000", name="Tenant 0", actor=None)
    policy = services.policy_create(
        tenant=tenant,
        name="limit",
        policy_type="rate_limiting",
        config={"requests_per_second": 1_000_000, "requests_per_minute": 60_000_000, "burst_size": 1000},
        actor=None,
    )
    api = services.api_create(
        tenant=tenant,
        api_name="a0",
        base_path="/t0000/a0",
        upstream_url=upstream,
        status="active",
        policies=[policy],
        actor=None,
    )
    consumer = services.consumer_create(tenant=tenant, name="c0", actor=None)
    services.subscription_request(consumer=consumer, api=api, actor=None)
    churner = services.consumer_create(tenant=tenant, name="churn", actor=None)
    services.subscription_request(consumer=churner, api=api, actor=None)
    template_key, _plaintext = services.api_key_create(consumer=consumer, actor=None)

    def columns(table: str, skip: set[str]) -> list[str]:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                [table],
            )
            return [row[0] for row in cur.fetchall() if row[0] not in skip]

    def copy(table: str, overrides: dict[str, str], source_where: str, series: str) -> None:
        cols = columns(table, set())
        select = ", ".join(overrides.get(c, f"src.{c}") for c in cols)
        with connection.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} FROM {table} src, {series} "
                f"WHERE {source_where}"
            )

    tenant_of = "'t' || lpad(t::text, 4, '0')"
    copy("am_tenants", {"id": tenant_of, "name": "'Tenant ' || t"}, "src.id = 't0000'", "generate_series(1, 999) t")
    copy(
        "am_policies",
        {"id": "'pol_t' || lpad(t::text, 4, '0')", "tenant_id": tenant_of},
        f"src.id = '{policy.pk}'",
        "generate_series(1, 999) t",
    )
    api_id = "'api_t' || lpad(t::text, 4, '0') || 'a' || a"
    copy(
        "am_apis",
        {
            "id": api_id,
            "api_name": "'a' || a",
            "base_path": "'/' || " + tenant_of + " || '/a' || a",
            "tenant_id": tenant_of,
        },
        f"src.id = '{api.pk}' AND NOT (t = 0 AND a = 0)",  # the template is tenant 0's first API
        "generate_series(0, 999) t, generate_series(0, 9) a",
    )
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO am_api_policies (api_id, policy_id) SELECT a.id, CASE WHEN a.tenant_id = 't0000' "
            "THEN %s ELSE 'pol_' || a.tenant_id END FROM am_apis a WHERE a.id <> %s",
            [policy.pk, api.pk],
        )
    consumer_id = "'con_t' || lpad(t::text, 4, '0') || 'c' || c"
    copy(
        "am_consumers",
        {"id": consumer_id, "name": "'c' || c", "tenant_id": tenant_of},
        f"src.id = '{consumer.pk}' AND NOT (t = 0 AND c = 0)",  # the template is tenant 0's first consumer
        "generate_series(0, 999) t, generate_series(0, 9) c",
    )
    copy(
        "am_subscriptions",
        {
            "id": "'sub_' || substr(md5(c.id || a.id), 1, 28)",
            "consumer_id": "c.id",
            "api_id": "a.id",
        },
        f"src.consumer_id = '{consumer.pk}' AND src.api_id = '{api.pk}' AND c.tenant_id = a.tenant_id "
        f"AND c.id NOT IN ('{consumer.pk}', '{churner.pk}') AND a.id <> '{api.pk}'",
        "am_consumers c, am_apis a",
    )
    log(f"tenants, APIs, consumers, subscriptions: {time.monotonic() - started:.1f} s")
    # 1,000,000 keys no one will present (their hashes are not HMACs of a plaintext), made in the database.
    copy(
        "am_api_keys",
        {
            "key_id": "'key_' || substr(md5(c.id || k), 1, 28)",
            "consumer_id": "c.id",
            "name": "''",
            "key_prefix": "'ak_live_' || substr(md5(c.id || k), 1, 4)",
            "key_hash": "md5(c.id || k) || md5(k || c.id)",
        },
        f"src.key_id = '{template_key.pk}'",
        f"am_consumers c, generate_series(1, {KEYS_PER_CONSUMER}) k",
    )
    with connection.cursor() as cur:
        cur.execute("DELETE FROM am_api_keys WHERE consumer_id IN (%s, %s)", [consumer.pk, churner.pk])
    # ... and the ones the bench presents, with real plaintexts.
    made: dict[str, list[str]] = {"traffic": [], "churn": []}
    rows = []
    for owner, kind, count in ((consumer, "traffic", TRAFFIC_KEYS), (churner, "churn", CHURN_KEYS)):
        for _ in range(count):
            plaintext = keys.generate_key()
            made[kind].append(plaintext)
            rows.append(
                ApiKey(consumer=owner, key_prefix=keys.display_prefix(plaintext), key_hash=keys.hash_key(plaintext))
            )
    ApiKey.objects.bulk_create(rows, batch_size=1000)
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    log(f"setup done in {time.monotonic() - started:.1f} s")
    counts = {
        "tenants": Tenant.objects.count(),
        "apis": Api.objects.count(),
        "consumers": Consumer.objects.count(),
        "keys": ApiKey.objects.count(),
        "subscriptions": Subscription.objects.count(),
        "policies": Policy.objects.count(),
    }
    saved = {"api_id": api.pk, "base_path": api.base_path, "counts": counts, **made}
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(saved))
    return saved


# -- 2. route table ---------------------------------------------------------------------------------------------


def route_table_in_process() -> dict[str, Any]:
    import resource

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apimgmt import selectors
    from gateway.routing import RouteTable

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timings = []
    for _ in range(3):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            table = RouteTable(selectors.route_snapshot())
            timings.append(time.perf_counter() - started)
    return {
        "routes": len(table.routes),
        "build_seconds_median": round(statistics.median(timings), 3),
        "build_seconds_runs": [round(t, 3) for t in timings],
        "queries": len(queries),
        "max_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
    }


# -- wrk ------------------------------------------------------------------------------------------------------


def wrk_keys(url: str, plaintexts: list[str], duration: int, workdir: Path, connections: int = 64) -> dict[str, Any]:
    """wrk -t2 -c64 cycling through ``plaintexts`` (one per request); non-2xx and rps parsed from its report."""
    script = workdir / "keys.lua"
    script.write_text(
        "local keys = {" + ",".join(f'"{k}"' for k in plaintexts) + "}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  return wrk.format("GET", nil, {["X-API-Key"] = keys[(i % #keys) + 1]})\n'
        "end\n"
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "requests": total, "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def gateway_queries(prom_dir: Path) -> float:
    """django_db_execute_total summed over the gateway workers' multiprocess files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    total = 0.0
    for family in registry.collect():
        if family.name in ("django_db_execute", "django_db_execute_many"):
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


@contextmanager
def gateway(env: dict[str, str], workdir: Path, workers: int = 2) -> Iterator[tuple[str, int, Path]]:
    port = free_port()
    prom = Path(tempfile.mkdtemp(prefix="prom-", dir=workdir))
    full = {**env, "PROMETHEUS_MULTIPROC_DIR": str(prom), "USAGE_SPOOL_DIR": str(workdir / "spool")}
    args = [str(ROOT / ".venv/bin/gunicorn"), "apimgmt.wsgi:application", "--config", "gunicorn.conf.py"]
    args += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    with process(args, env=full, log=workdir / f"gateway-{port}.log") as proc:
        yield f"http://127.0.0.1:{port}", proc.pid, prom


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run (churn comparison)")
    parser.add_argument("--rebuild", action="store_true", help="make the fleet again even if it exists")
    parser.add_argument("--skip-cluster", action="store_true", help="no Redis Cluster comparison")
    parser.add_argument("--skip-churn", action="store_true", help="no key churn comparison")
    options = parser.parse_args()

    database_url = os.environ["DATABASE_URL"]
    redis_url = os.environ["REDIS_URL"]
    database = database_url.rsplit("/", 1)[-1].split("?", 1)[0]
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'CREATE DATABASE "{database}"'],
        capture_output=True,
        check=False,
    )
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-bench-scale-"))
    env = {
        "DEBUG": "0",
        **SECRET_ENV,
        "ALLOWED_HOSTS": "*",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update({**env, "DJANGO_SETTINGS_MODULE": "apimgmt.settings"})
    subprocess.run([str(ROOT / ".venv/bin/python"), "manage.py", "migrate", "-v0"], cwd=ROOT, check=True)
    import django

    django.setup()
    import redis

    from apimgmt import services
    from apimgmt.models import ApiKey

    redis.Redis.from_url(redis_url).flushdb()  # the bench's own Redis database
    upstream_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "load_1min_at_start": os.getloadavg()[0]}
    conf = nginx_conf(workdir, upstream_port, proxy_port)
    with process([NGINX, "-c", str(conf), "-p", str(workdir)]):
        wait_for(f"{upstream}/items/1")
        fleet = populate(upstream, options.rebuild)
        results["fleet"] = fleet["counts"]
        log(f"fleet: {fleet['counts']}")

        results["route_table"] = route_table_in_process()
        log(f"route table in process: {results['route_table']}")

        base_path = fleet["base_path"]
        if not options.skip_churn:
            spawned = time.monotonic()
            with gateway({**env, "GATEWAY_AUTH_CACHE_SECONDS": "3600"}, workdir) as (base, pid, prom):
                url = f"{base}{base_path}/items/1"
                wait_for(url, {"X-API-Key": fleet["traffic"][0]}, timeout=120)
                results["new_worker"] = {
                    "first_proxied_request_seconds": round(time.monotonic() - spawned, 2),
                    "worker_rss_mib_after_first_request": rss_mib(pid),
                }
                log(f"new gateway: {results['new_worker']}")
                for _ in range(2):
                    wrk_keys(url, fleet["traffic"], 4, workdir)  # warm every traffic key into both workers
                results["new_worker"]["worker_rss_mib_warm"] = rss_mib(pid)

                runs: dict[str, list[dict[str, Any]]] = {"no_churn": [], "churn": []}
                churn_pool = list(ApiKey.objects.filter(consumer__name="churn", revoked_at__isnull=True))
                for round_ in range(3):
                    for kind in ("no_churn", "churn"):
                        stop = threading.Event()
                        revoked = [0]

                        def churn(stop: threading.Event = stop, revoked: list[int] = revoked) -> None:
                            next_at = time.monotonic()
                            while not stop.is_set() and churn_pool:
                                services.api_key_revoke(key=churn_pool.pop(), actor=None)
                                revoked[0] += 1
                                next_at += 0.1  # 10 per second
                                stop.wait(max(0.0, next_at - time.monotonic()))

                        before = gateway_queries(prom)
                        cpu_before = tree_cpu_seconds(pid)
                        thread = threading.Thread(target=churn) if kind == "churn" else None
                        if thread:
                            thread.start()
                        row = wrk_keys(url, fleet["traffic"], options.duration, workdir)
                        stop.set()
                        if thread:
                            thread.join()
                        row["revocations"] = revoked[0]
                        used = tree_cpu_seconds(pid) - cpu_before
                        row["cpu_us_per_request"] = round(used / row["requests"] * 1e6, 1) if row["requests"] else None
                        row["gateway_db_queries"] = gateway_queries(prom) - before
                        row["gateway_db_queries_per_second"] = round(row["gateway_db_queries"] / options.duration, 2)
                        runs[kind].append(row)
                        log(f"round {round_ + 1} {kind}: {row}")
                results["churn"] = {
                    kind: {
                        "rps_median": statistics.median(r["rps"] for r in rows),
                        "db_queries_per_second_median": statistics.median(
                            r["gateway_db_queries_per_second"] for r in rows
                        ),
                        "cpu_us_per_request_median": statistics.median(r["cpu_us_per_request"] for r in rows),
                        "runs": rows,
                    }
                    for kind, rows in runs.items()
                }
                base_rps = results["churn"]["no_churn"]["rps_median"]
                results["churn"]["rps_change_percent"] = round(
                    (results["churn"]["churn"]["rps_median"] - base_rps) / base_rps * 100, 1
                )
                base_cpu = results["churn"]["no_churn"]["cpu_us_per_request_median"]
                results["churn"]["cpu_per_request_change_percent"] = round(
                    (results["churn"]["churn"]["cpu_us_per_request_median"] / base_cpu - 1) * 100, 1
                )

        if not options.skip_cluster:
            results["cluster_vs_standalone"] = cluster_vs_standalone(
                env, workdir, url_path=f"{base_path}/items/1", key=fleet["traffic"][0], redis_url=redis_url
            )

    out = ROOT / "bench" / "results" / f"scale-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "churn"}, indent=2))
    churn = results.get("churn")
    if churn is None:
        print(f"results: {out}")
        return
    without, with_ = churn["no_churn"], churn["churn"]
    print(
        f"churn: {without['rps_median']:.0f} req/s without, {with_['rps_median']:.0f} req/s with 10 revocations/s "
        f"({churn['rps_change_percent']:+.1f} %); CPU {without['cpu_us_per_request_median']} vs "
        f"{with_['cpu_us_per_request_median']} us/request ({churn['cpu_per_request_change_percent']:+.1f} %); "
        f"gateway DB queries/s {without['db_queries_per_second_median']:.1f} without, "
        f"{with_['db_queries_per_second_median']:.1f} with"
    )
    print(f"results: {out}")


def cluster_vs_standalone(
    env: dict[str, str], workdir: Path, *, url_path: str, key: str, redis_url: str
) -> dict[str, Any]:
    """The same one-key gateway row on standalone Redis and on a 3-master local cluster, interleaved twice."""
    from tests.support.redis_topologies import redis_cluster

    rows: dict[str, list[dict[str, Any]]] = {"standalone": [], "cluster": []}
    with redis_cluster() as cluster:
        urls = {"standalone": redis_url, "cluster": cluster.url}
        for round_ in range(2):
            for name, target in urls.items():
                with gateway({**env, "REDIS_URL": target}, workdir) as (base, pid, _prom):
                    url = base + url_path
                    wait_for(url, {"X-API-Key": key}, timeout=120)
                    wrk_keys(url, [key], 2, workdir)
                    cpu = tree_cpu_seconds(pid)
                    row = wrk_keys(url, [key], 10, workdir)
                    used = tree_cpu_seconds(pid) - cpu
                    row["cpu_us_per_request"] = round(used / row["requests"] * 1e6, 1) if row["requests"] else None
                    rows[name].append(row)
                    log(f"round {round_ + 1} {name}: {row}")
    summary: dict[str, Any] = {
        name: {
            "rps_median": statistics.median(r["rps"] for r in runs),
            "cpu_us_per_request_median": statistics.median(r["cpu_us_per_request"] for r in runs),
            "runs": runs,
        }
        for name, runs in rows.items()
    }
    summary["cpu_per_request_change_percent"] = round(
        (summary["cluster"]["cpu_us_per_request_median"] / summary["standalone"]["cpu_us_per_request_median"] - 1)
        * 100,
        1,
    )
    return summary


if __name__ == "__main__":
    main()
