"""The gateway and control plane under gunicorn (2 workers) on a real Redis Cluster and a real Sentinel set.

Both topologies are started by the tests from the redis-server binary (tests/support/redis_topologies.py) and
killed afterwards. Marked ``redis_topology``: slower than the rest, still part of ``make test`` and ``.ci/run``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User
from django.db.models import Sum

from apimgmt import services
from apimgmt.models import ApiKey, Consumer, Tenant, UsageRecord
from apimgmt.redis_client import reset_redis
from apimgmt.usage import UsageFlusher, flusher_redis
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import recording_upstream
from tests.support.redis_topologies import LocalCluster, LocalSentinel, redis_cluster, redis_sentinel
from tests.support.servers import gunicorn
from tests.usage.helpers import stored_total

pytestmark = [pytest.mark.redis_topology, pytest.mark.timeout(240)]

URL_PATH = "/api/users/v1/x"


@pytest.fixture(scope="module")
def _cluster() -> Iterator[LocalCluster]:
    with redis_cluster() as started:
        yield started


@pytest.fixture
def cluster(_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster, emptied (each test's database starts empty too)."""
    _cluster.wait_healthy()
    _cluster.flush()
    return _cluster


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    with redis_sentinel() as started:
        yield started


def _point_this_process_at(settings: Any, url: str) -> None:
    """The services called by the test publish to the same Redis the gateway reads."""
    settings.REDIS_URL = url
    reset_redis()


def _serve(live_env: dict[str, str], tmp_path: Path, redis_url: str, **extra: str) -> Any:
    env = {
        **live_env,
        "REDIS_URL": redis_url,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
        **extra,
    }
    return gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log")


# Every API request a test made that got an answer (what usage must store, exactly once).
SENT: Counter[int] = Counter()
_sent_lock = threading.Lock()


def _get(url: str, key: str, session: Any = requests, timeout: float = 15) -> requests.Response:
    response = session.get(url, headers={"X-API-Key": key}, timeout=timeout)
    with _sent_lock:
        SENT[response.status_code] += 1
    return response


@pytest.fixture(autouse=True)
def _count_from_zero() -> None:
    SENT.clear()


def _usage_stored_exactly_once(redis_url: str) -> None:
    """The flusher (on the same topology) copies every answered request into am_usage_records, once."""
    flusher = UsageFlusher(client=flusher_redis(redis_url), consumer="scale-test")
    expected = sum(SENT.values())
    deadline = time.monotonic() + 20
    while stored_total() < expected and time.monotonic() < deadline:
        flusher.drain()
        time.sleep(0.3)
    time.sleep(1.5)  # a late or repeated batch would show up now
    flusher.drain()
    stored = Counter(
        {
            row["status_code"]: row["n"]
            for row in UsageRecord.objects.values("status_code").annotate(n=Sum("request_count"))
        }
    )
    assert stored == SENT


def _until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate`` first came out true (measured at the start of that call)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        attempt = time.monotonic()
        if predicate():
            return attempt - started
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def _all_workers(url: str, key: str, want: int, n: int = 12) -> bool:
    """n requests in a row on fresh connections (spread over both workers) all answer ``want``."""
    return all(_get(url, key).status_code == want for _ in range(n))


def _hammer(url: str, key: str, *, threads: int, each: int) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            for _ in range(each):
                status = _get(url, key, session).status_code
                with lock:
                    statuses.append(status)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def _exactly_l_of_800(base: str, acme: Tenant, bob_app: Consumer, key: str) -> None:
    with recording_upstream() as upstream:
        policy = services.policy_create(
            tenant=acme, name="q", policy_type="quota", config={"requests_per_day": 100}, actor=None
        )
        api = publish(acme, upstream.url, policies=[policy])
        subscribe(bob_app, api)
        statuses = _hammer(base + URL_PATH, key, threads=16, each=50)
        assert Counter(statuses) == {200: 100, 429: 700}
        assert len(upstream.seen) == 100


def _revocation_within_one_second(base: str, acme: Tenant, bob_app: Consumer, row: ApiKey, key: str) -> None:
    with recording_upstream() as upstream:
        api = publish(acme, upstream.url, base_path="/api/orders/v1")
        subscribe(bob_app, api)
        url = base + "/api/orders/v1/x"
        _until(lambda: _all_workers(url, key, 200), 10)
        services.api_key_revoke(key=ApiKey.objects.get(pk=row.pk), actor=None)
        assert _until(lambda: _all_workers(url, key, 401), 3) < 1.0


def _csrf_post(session: requests.Session, url: str, data: dict[str, str]) -> requests.Response:
    page = session.get(url, timeout=10)
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert match, page.text[:500]
    return session.post(url, data={**data, "csrfmiddlewaretoken": match.group(1)}, allow_redirects=False, timeout=10)


def _portal_lockout_is_shared(base: str) -> None:
    """Three wrong passwords lock bob's account on every worker: the counters live in the shared Django cache."""
    url = base + "/portal/acme/login/"
    for _ in range(3):
        assert _csrf_post(requests.Session(), url, {"username": "bob", "password": "wrong"}).status_code == 400
    locked = _csrf_post(requests.Session(), url, {"username": "bob", "password": "bob-password-123"})
    assert locked.status_code == 429


# -- Redis Cluster --------------------------------------------------------------------------------------------------


def test_cluster_admits_exactly_the_limit_revokes_within_a_second_and_shares_lockouts(
    cluster: LocalCluster,
    live_env: dict[str, str],
    tmp_path: Path,
    settings: Any,
    acme: Tenant,
    bob: User,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
) -> None:
    _point_this_process_at(settings, cluster.url)
    row, key = bob_key
    with _serve(live_env, tmp_path, cluster.url, PORTAL_LOGIN_ACCOUNT_FAILURES="3") as base:
        _exactly_l_of_800(base, acme, bob_app, key)
        _usage_stored_exactly_once(cluster.url)
        _revocation_within_one_second(base, acme, bob_app, row, key)
        _portal_lockout_is_shared(base)


def test_cluster_slot_of_a_tenant_moved_while_requests_flow_limits_stay_exact(
    cluster: LocalCluster,
    live_env: dict[str, str],
    tmp_path: Path,
    settings: Any,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
) -> None:
    """A reshard of acme's slot mid-run (keys move one by one: MOVED, ASK and TRYAGAIN all happen): no 500, and the
    quota still admits exactly its limit."""
    _point_this_process_at(settings, cluster.url)
    _, key = bob_key
    with recording_upstream() as upstream, _serve(live_env, tmp_path, cluster.url) as base:
        policy = services.policy_create(
            tenant=acme,
            name="q",
            policy_type="quota",
            config={"requests_per_day": 300},
            on_store_error="closed",
            actor=None,
        )
        api = publish(acme, upstream.url, policies=[policy])
        subscribe(bob_app, api)
        url = base + URL_PATH
        _until(lambda: _get(url, key).status_code == 200, 10)
        moved: list[tuple[int, int]] = []
        mover = threading.Timer(0.5, lambda: moved.append(cluster.migrate_slot_of("rate_limit:{acme}:x", pause=0.02)))
        mover.start()
        statuses = _hammer(url, key, threads=8, each=100)
        mover.join()
        assert moved and cluster.master_port_of("rate_limit:{acme}:x") == moved[0][1]
        assert 500 not in statuses and 503 not in statuses, Counter(statuses)  # closed: a store error would be 503
        assert SENT[200] == 300  # the one warm-up request and 299 of the 800
        assert len(upstream.seen) == 300


def test_cluster_master_killed_under_load_no_500_and_limits_count_again_after_promotion(
    cluster: LocalCluster,
    live_env: dict[str, str],
    tmp_path: Path,
    settings: Any,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
) -> None:
    _point_this_process_at(settings, cluster.url)
    _, key = bob_key
    with recording_upstream() as upstream, _serve(live_env, tmp_path, cluster.url) as base:
        policy = services.policy_create(
            tenant=acme,
            name="per-minute",
            policy_type="rate_limiting",
            config={"requests_per_minute": 1_000_000, "window_type": "fixed"},
            on_store_error="open",
            actor=None,
        )
        api = publish(acme, upstream.url, policies=[policy])
        subscribe(bob_app, api)
        url = base + URL_PATH
        _until(lambda: _all_workers(url, key, 200), 10)
        statuses: list[int] = []
        uncounted: list[bool] = []  # answered without limit headers: decided by on_store_error
        stop = threading.Event()

        def load() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    response = _get(url, key, session)
                    statuses.append(response.status_code)
                    uncounted.append("X-RateLimit-Remaining" not in response.headers)

        pool = [threading.Thread(target=load) for _ in range(4)]
        for t in pool:
            t.start()
        time.sleep(1)
        # The master of the slot holding acme's counters dies without a word.
        cluster.kill(cluster.master_port_of("rate_limit:{acme}:x"))
        # Still ready: the other masters answer (a fleet all unready at once would serve no tenant at all).
        ready = requests.get(base + "/ready", timeout=15)
        assert ready.status_code == 200, ready.text
        cluster.wait_healthy()
        time.sleep(1.5)
        stop.set()
        for t in pool:
            t.join()

        assert statuses and set(statuses) == {200}, Counter(statuses)  # on_store_error=open: served, never a 500
        assert any(uncounted)  # the failover was felt, and the policy's rule answered meanwhile

        def counting() -> bool:
            first, second = _get(url, key), _get(url, key)
            remaining = [r.headers.get("X-RateLimit-Remaining") for r in (first, second)]
            return None not in remaining and int(remaining[1]) < int(remaining[0])  # type: ignore[arg-type]

        # Back on the promoted replica without a restart: the counter moves again.
        _until(counting, 10)
        # Usage held in the gateways' memory and spool during the failover reaches the database, once.
        _usage_stored_exactly_once(cluster.url)


# -- Sentinel -------------------------------------------------------------------------------------------------------


def test_sentinel_master_killed_under_load_gateway_and_control_plane_follow_the_new_master(
    sentinel: LocalSentinel,
    live_env: dict[str, str],
    tmp_path: Path,
    settings: Any,
    acme: Tenant,
    bob: User,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
) -> None:
    url_ = sentinel.url(db=0)
    _point_this_process_at(settings, url_)
    row, key = bob_key
    with recording_upstream() as upstream, _serve(live_env, tmp_path, url_, PORTAL_LOGIN_ACCOUNT_FAILURES="3") as base:
        policy = services.policy_create(
            tenant=acme,
            name="per-minute",
            policy_type="rate_limiting",
            config={"requests_per_minute": 1_000_000, "window_type": "fixed"},
            on_store_error="open",
            actor=None,
        )
        api = publish(acme, upstream.url, policies=[policy])
        subscribe(bob_app, api)
        url = base + URL_PATH
        _until(lambda: _all_workers(url, key, 200), 10)
        statuses: list[int] = []
        uncounted: list[bool] = []  # answered without limit headers: decided by on_store_error
        stop = threading.Event()

        def load() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    response = _get(url, key, session)
                    statuses.append(response.status_code)
                    uncounted.append("X-RateLimit-Remaining" not in response.headers)

        pool = [threading.Thread(target=load) for _ in range(4)]
        for t in pool:
            t.start()
        time.sleep(1)
        old = sentinel.kill_master()
        sentinel.wait_promoted(old)
        time.sleep(1.5)
        stop.set()
        for t in pool:
            t.join()
        assert statuses and set(statuses) == {200}, Counter(statuses)
        assert any(uncounted)

        # The gateway counts on the new master ...
        def counting() -> bool:
            first, second = _get(url, key), _get(url, key)
            remaining = [r.headers.get("X-RateLimit-Remaining") for r in (first, second)]
            return None not in remaining and int(remaining[1]) < int(remaining[0])  # type: ignore[arg-type]

        _until(counting, 10)
        # ... the flusher follows it too: every answered request stored once ...
        _usage_stored_exactly_once(url_)
        # ... revocations reach both workers through it within a second ...
        services.api_key_revoke(key=ApiKey.objects.get(pk=row.pk), actor=None)
        assert _until(lambda: _all_workers(url, key, 401), 3) < 1.0
        # ... and the control plane works: staff sign in to the admin, the portal's lockout counts in the cache.
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]  # what the server checks
        User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
        admin = requests.Session()
        signed_in = _csrf_post(
            admin, base + "/admin/login/?next=/admin/", {"username": "ops", "password": "ops-password-123"}
        )
        assert signed_in.status_code == 302, re.findall(r'class="errornote">([^<]*)', signed_in.text)
        assert signed_in.headers["Location"] == "/admin/"
        assert admin.get(base + "/admin/", timeout=10).status_code == 200
        _portal_lockout_is_shared(base)
