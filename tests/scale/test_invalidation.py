"""Targeted invalidation: a key-level change evicts only its keys on every worker; route changes reload routes.

The churn test runs the real gateway in this process (its background poller reading the real Redis stream) with
1,100 keys; the gunicorn tests in tests/gateway/test_live.py and tests/scale/test_topologies.py show the same
across worker processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from django.contrib.auth.models import User
from prometheus_client import REGISTRY

from apimgmt import invalidation, keys, selectors, services
from apimgmt.models import ApiKey, Consumer, Tenant
from gateway import config as gateway_config
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Recorder

pytestmark = pytest.mark.django_db(transaction=True)


def _bulk_keys(consumer: Consumer, count: int) -> list[tuple[ApiKey, str]]:
    """``count`` keys for ``consumer`` in one INSERT (the gateway under test reads them like any other)."""
    made = []
    for _ in range(count):
        plaintext = keys.generate_key()
        row = ApiKey(consumer=consumer, key_prefix=keys.display_prefix(plaintext), key_hash=keys.hash_key(plaintext))
        made.append((row, plaintext))
    ApiKey.objects.bulk_create([row for row, _ in made])
    return made


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _until(predicate: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def test_revoking_100_keys_reloads_no_routes_and_cools_no_other_key(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, upstream: Recorder, settings_gateway_poll: None
) -> None:
    api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    untouched = _bulk_keys(bob_app, 1000)
    doomed = _bulk_keys(bob_app, 100)
    url = "/api/users/v1/x"
    for _row, plaintext in untouched + doomed:  # warm: every key in the worker's cache
        assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    gw = get_gateway()
    reloads, misses, evicted = gw.routes.reloads, gw.keys.misses, gw.routes.evicted
    exported = {name: _metric(name) for name in ("api_route_table_loads_total", "api_key_cache_misses_total")}

    for i, (row, _plaintext) in enumerate(doomed):
        services.api_key_revoke(key=row, actor=None)
        for _row, plaintext in untouched[i * 10 : i * 10 + 10]:  # traffic on the others meanwhile
            assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    _until(lambda: gw.routes.evicted - evicted >= 100, 5)
    for _row, plaintext in untouched:
        assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200

    assert gw.routes.reloads == reloads
    assert gw.keys.misses == misses  # not one of the 1,000 left the worker's cache
    assert {name: _metric(name) for name in exported} == exported  # what operators see says the same
    assert _metric("api_key_cache_evictions_total") >= 100
    for _row, plaintext in doomed:
        assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 401
    assert gw.keys.misses == misses + 100


def test_a_blocked_consumer_and_a_cancelled_subscription_evict_only_that_consumers_keys(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    bob: User,
    upstream: Recorder,
    settings_gateway_poll: None,
) -> None:
    api = publish(acme, upstream.url)
    other_app = services.consumer_create(tenant=acme, name="other-app", owner=bob, actor=None)
    subscribe(bob_app, api)
    subscribe(other_app, api)
    (_, bob_key), (_, other_key) = _bulk_keys(bob_app, 1)[0], _bulk_keys(other_app, 1)[0]
    url = "/api/users/v1/x"
    for plaintext in (bob_key, other_key):
        assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    gw = get_gateway()
    reloads, misses = gw.routes.reloads, gw.keys.misses

    services.consumer_block(consumer=bob_app, actor=None)
    _until(lambda: gateway.get(url, headers={"X-API-Key": bob_key}).status == 403, 2)
    services.consumer_unblock(consumer=bob_app, actor=None)
    _until(lambda: gateway.get(url, headers={"X-API-Key": bob_key}).status == 200, 2)
    subscription = bob_app.subscriptions.get(api=api)
    services.subscription_cancel(subscription=subscription, actor=None)
    _until(lambda: gateway.get(url, headers={"X-API-Key": bob_key}).status == 403, 2)

    assert gateway.get(url, headers={"X-API-Key": other_key}).status == 200
    assert gw.routes.reloads == reloads
    # Bob's key was looked up again once per change; the other consumer's key never left the cache.
    assert gw.keys.misses == misses + 3


def test_a_route_level_change_reloads_routes_and_keeps_keys_warm(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, upstream: Recorder, settings_gateway_poll: None
) -> None:
    api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    (_, plaintext) = _bulk_keys(bob_app, 1)[0]
    url = "/api/users/v1/x"
    assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    gw = get_gateway()
    reloads, misses = gw.routes.reloads, gw.keys.misses

    services.api_deprecate(api=api, actor=None)
    _until(lambda: gateway.get(url, headers={"X-API-Key": plaintext}).header("Deprecation") is not None, 2)
    assert gw.routes.reloads == reloads + 1
    assert gw.keys.misses == misses


@pytest.mark.parametrize("eviction_arrives", ["during the lookup", "after the lookup"])
def test_a_lookup_that_raced_a_revocation_does_not_keep_the_old_state(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    upstream: Recorder,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    eviction_arrives: str,
) -> None:
    """A worker reads a key from the database, the key is revoked before it caches what it read."""
    api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    row, plaintext = _bulk_keys(bob_app, 1)[0]
    key_hash = keys.hash_key(plaintext)
    resolver = get_gateway().keys
    read_key = selectors.key_record_by_hash

    def read_then_revoke(wanted: str) -> selectors.KeyRecord | None:
        record = read_key(wanted)  # the old state, read before the revocation commits
        services.api_key_revoke(key=row, actor=None)
        if eviction_arrives == "during the lookup":
            resolver.evict([wanted])  # what the config poller does when the message arrives
        return record

    monkeypatch.setattr(selectors, "key_record_by_hash", read_then_revoke)
    stale = resolver.resolve(key_hash)
    monkeypatch.setattr(selectors, "key_record_by_hash", read_key)
    assert stale is not None and not stale.revoked  # this one request saw the key as it was

    # Redis kept the eviction's tombstone (the lookup writes with SET NX) ...
    assert redis_client.get(invalidation.key_cache_name(key_hash)) == invalidation.TOMBSTONE.encode()
    if eviction_arrives == "after the lookup":
        resolver.evict([key_hash])
    # ... and the worker did not keep the old state: the next lookup reads the revocation.
    record = resolver.resolve(key_hash)
    assert record is not None and record.revoked


@pytest.fixture
def settings_gateway_poll(settings: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll fast (production: 0.25 s), the tests wait for the poller rather than sleep; revoked keys tried from one
    address are not throttled here (the failed-key throttle has tests of its own); no periodic safety reload of the
    route table during a slow run (it happens every 30 s whatever changes, and would blur the reload count)."""
    monkeypatch.setattr(gateway_config, "SAFETY_RELOAD_SECONDS", 3600.0)
    settings.GATEWAY = {  # type: ignore[attr-defined]
        **settings.GATEWAY,  # type: ignore[attr-defined]
        "CONFIG_POLL_SECONDS": 0.05,
        "AUTH_FAILURE_LIMIT": 0,
        # Entries also leave by age (30 s by default); what is measured here is eviction, on a machine that may
        # be slow enough for a run to outlast the age.
        "AUTH_CACHE_SECONDS": 3600.0,
    }


def test_an_operators_drop_all_message_empties_every_workers_key_cache(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    upstream: Recorder,
    redis_client: redis.Redis,
    settings_gateway_poll: None,
) -> None:
    """What docs/operations.md tells an operator to run after changing keys by SQL."""
    api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    (row, plaintext) = _bulk_keys(bob_app, 1)[0]
    url = "/api/users/v1/x"
    assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    ApiKey.objects.filter(pk=row.pk).update(active=False)  # by SQL: no service told the gateways
    assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200  # still cached

    for name in redis_client.scan_iter("cache:api:key:*"):
        redis_client.unlink(name)
    redis_client.xadd(invalidation.EVICTIONS_STREAM, {"all": "1"}, maxlen=invalidation.EVICTIONS_MAXLEN)
    _until(lambda: gateway.get(url, headers={"X-API-Key": plaintext}).status == 401, 2)
    assert get_gateway().routes.keys_lost >= 1


def test_a_worker_that_may_have_missed_evictions_drops_every_cached_key(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    upstream: Recorder,
    redis_client: redis.Redis,
    settings_gateway_poll: None,
) -> None:
    """Redis lost the stream (a restart without persistence, a failover to a replica that lagged): the worker
    cannot know which keys changed meanwhile, so it forgets them all once."""
    api = publish(acme, upstream.url)
    (row, plaintext) = _bulk_keys(bob_app, 1)[0]
    subscribe(bob_app, api)  # an eviction message (the key's subscriptions changed): the cursor leaves the start
    url = "/api/users/v1/x"
    gw = get_gateway()
    assert gateway.get(url, headers={"X-API-Key": plaintext}).status == 200
    _until(lambda: gw.routes.eviction_cursor not in (None, invalidation.START), 2)
    lost = gw.routes.keys_lost

    ApiKey.objects.filter(pk=row.pk).update(active=False)  # a change whose message Redis then lost
    redis_client.delete(invalidation.EVICTIONS_STREAM, invalidation.key_cache_name(keys.hash_key(plaintext)))
    _until(lambda: gateway.get(url, headers={"X-API-Key": plaintext}).status == 401, 2)
    assert gw.routes.keys_lost == lost + 1
