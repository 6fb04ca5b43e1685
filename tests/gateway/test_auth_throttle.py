"""The authentication-failure throttle: made-up keys from one address stop reaching the database after a few."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import requests
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apimgmt import keys
from apimgmt.redis_client import reset_redis
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import recording_upstream
from tests.support.faults import redis_server
from tests.support.servers import gunicorn

ATTACKER = "203.0.113.9"
NEIGHBOUR = "198.51.100.7"
PATH = "/api/users/v1/x"


def _made_up(gateway: Any, n: int, address: str = ATTACKER) -> list[Any]:
    return [gateway.get(PATH, headers={"X-API-Key": keys.generate_key()}, remote_addr=address) for _ in range(n)]


def _throttled_count(api_id: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("api_auth_throttled_total", {"api": api_id}) or 0


def test_an_address_over_its_failure_allowance_gets_429_and_costs_no_more_lookups(gateway, users_api, settings_gateway):
    settings_gateway(AUTH_FAILURE_LIMIT=5, AUTH_FAILURE_WINDOW_SECONDS=60)
    before = _throttled_count(users_api.id)
    assert [r.status for r in _made_up(gateway, 5)] == [401] * 5
    over = _made_up(gateway, 1)[0]
    assert over.status == 429
    assert over.header("Content-Type") == "application/problem+json"
    body = over.json()
    assert body["type"].endswith("auth-throttled") and body["status"] == 429
    assert "your address" in body["detail"]
    assert 1 <= int(over.header("Retry-After")) <= 60
    with CaptureQueriesContext(connection) as queries:
        assert {r.status for r in _made_up(gateway, 30)} == {429}
    assert len(queries) == 0
    assert _throttled_count(users_api.id) - before == 31


def test_other_addresses_and_keys_this_worker_already_knows_keep_working(gateway, users_api, key, settings_gateway):
    settings_gateway(AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW_SECONDS=60)
    assert gateway.get(PATH, headers={"X-API-Key": key}, remote_addr=ATTACKER).status == 200  # now in the cache
    _made_up(gateway, 4)
    assert _made_up(gateway, 1)[0].status == 429
    assert gateway.get(PATH, headers={"X-API-Key": key}, remote_addr=NEIGHBOUR).status == 200
    # The blocked address's own valid, cached key costs no look-up, so it is served.
    assert gateway.get(PATH, headers={"X-API-Key": key}, remote_addr=ATTACKER).status == 200
    # Missing or malformed keys cost nothing either: they keep their 401.
    assert gateway.get(PATH, remote_addr=ATTACKER).status == 401
    assert _made_up(gateway, 1, NEIGHBOUR)[0].status == 401


def test_an_ipv6_client_is_counted_by_its_64(gateway, users_api, settings_gateway):
    settings_gateway(AUTH_FAILURE_LIMIT=4, AUTH_FAILURE_WINDOW_SECONDS=60)
    for n in range(4):
        assert _made_up(gateway, 1, f"2001:db8:1:2::{n + 1}")[0].status == 401
    assert _made_up(gateway, 1, "2001:db8:1:2:ffff::9")[0].status == 429
    assert _made_up(gateway, 1, "2001:db8:1:3::1")[0].status == 401  # another /64


def test_the_refusal_ends_with_the_window(gateway, users_api, settings_gateway):
    settings_gateway(AUTH_FAILURE_LIMIT=2, AUTH_FAILURE_WINDOW_SECONDS=1)
    time.sleep(1 - (time.time() % 1) + 0.02)  # start just after a window boundary
    assert [r.status for r in _made_up(gateway, 3)] == [401, 401, 429]
    time.sleep(1 - (time.time() % 1) + 0.02)
    assert [r.status for r in _made_up(gateway, 3)] == [401, 401, 429]


def test_the_count_is_shared_through_redis(gateway, users_api, settings_gateway, redis_client):
    settings_gateway(AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW_SECONDS=60)
    _made_up(gateway, 2)
    (counter,) = [k.decode() for k in redis_client.scan_iter("auth_failures:*")]
    assert counter.startswith("auth_failures:{203.0.113.9}:")
    assert int(redis_client.get(counter)) == 2
    assert 60 < redis_client.ttl(counter) <= 120


def test_with_redis_stopped_each_worker_counts_on_its_own(gateway, users_api, settings, settings_gateway):
    with redis_server() as own:
        settings.REDIS_URL = own.url
        reset_redis()
        settings_gateway(AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW_SECONDS=60)
        assert gateway.get(PATH).status == 401  # route table loaded while Redis answers
        own.stop()
        assert [r.status for r in _made_up(gateway, 4)] == [401, 401, 401, 429]


def test_limit_zero_turns_the_throttle_off(gateway, users_api, settings_gateway):
    settings_gateway(AUTH_FAILURE_LIMIT=0)
    assert {r.status for r in _made_up(gateway, 30)} == {401}


# -- under gunicorn ---------------------------------------------------------------------------------------------------


def _sessions(dsn: str, database: str) -> int:
    """Connections ever opened to ``database``, as PostgreSQL counts them.

    The gateway opens a connection per key look-up and closes it at once (DB_POOL=0 here), so this counts
    look-ups; the test also checks it moved at least once per 401 it saw, so it cannot pass by counting nothing.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database]).fetchone()
    assert row is not None
    return int(row[0])


def test_a_flood_of_made_up_keys_under_gunicorn_makes_a_bounded_number_of_database_queries(
    live_env, acme, bob_app, bob_key, tmp_path
):
    limit, workers, threads, total = 20, 2, 8, 400
    database = connection.settings_dict["NAME"]
    admin_dsn = live_env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with recording_upstream() as upstream:
        subscribe(bob_app, publish(acme, upstream.url))
        env = {
            **live_env,
            "TRUSTED_PROXIES": "127.0.0.1",  # the test client stands in for many addresses through a trusted hop
            "GATEWAY_AUTH_FAILURE_LIMIT": str(limit),
            "GATEWAY_AUTH_FAILURE_WINDOW_SECONDS": "600",
            "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
        with gunicorn(env, workers=workers, log_path=tmp_path / "gunicorn.log") as url:
            good = {"X-API-Key": bob_key[1], "X-Forwarded-For": NEIGHBOUR, "Connection": "close"}
            for _ in range(12):  # both workers: route table and the good key loaded
                assert requests.get(url + PATH, headers=good, timeout=10).status_code == 200
            time.sleep(1.0)
            before = _sessions(admin_dsn, database)

            statuses: list[int] = []
            lock = threading.Lock()

            def flood() -> None:
                with requests.Session() as session:
                    for _ in range(total // threads):
                        headers = {"X-API-Key": keys.generate_key(), "X-Forwarded-For": ATTACKER}
                        status = session.get(url + PATH, headers=headers, timeout=10).status_code
                        with lock:
                            statuses.append(status)

            pool = [threading.Thread(target=flood) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            time.sleep(1.0)  # a closed connection's backend reports its session as it exits
            lookups = _sessions(admin_dsn, database) - before

            # A legitimate key from another address is still served (fresh connections: both workers).
            assert [requests.get(url + PATH, headers=good, timeout=10).status_code for _ in range(8)] == [200] * 8
    assert set(statuses) == {401, 429}
    # limit failures, then each worker's first one past the limit, plus what was in flight when it learned.
    bound = limit + workers * threads
    assert statuses.count(401) == limit  # exactly the allowance was answered after a look-up
    assert limit <= lookups <= bound, lookups
    assert statuses.count(429) == total - limit


@pytest.mark.parametrize(
    ("name", "value"), [("GATEWAY_AUTH_FAILURE_LIMIT", "-1"), ("GATEWAY_AUTH_FAILURE_WINDOW_SECONDS", "0")]
)
def test_bad_throttle_settings_stop_start_up_with_a_clear_message(name: str, value: str) -> None:
    from tests.support.settings_probe import run_python

    result = run_python("import django; django.setup()", {"DEBUG": "1", name: value})
    assert result.returncode != 0
    assert "GATEWAY_AUTH_FAILURE_LIMIT must be 0 (off) or more" in result.stderr


def test_ipv4_clients_seen_as_mapped_ipv6_are_counted_one_by_one(gateway, users_api, settings_gateway):
    # A dual-stack listener (or a proxy on one) shows IPv4 clients as ::ffff:a.b.c.d; their /64 is ::/64, which
    # would put every IPv4 client in one count: one attacker would shut all of them out.
    settings_gateway(AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW_SECONDS=60)
    assert [r.status for r in _made_up(gateway, 4, f"::ffff:{ATTACKER}")] == [401, 401, 401, 429]
    assert _made_up(gateway, 1, ATTACKER)[0].status == 429  # the same client, however it is written
    assert _made_up(gateway, 1, f"::ffff:{NEIGHBOUR}")[0].status == 401
