"""Review of the cache lookup that rides on the limiter's write (gateway.pipeline._limits, gateway.ratelimit
_read_replies, response_cache.limits_read/limits_reply): who may get a hit, and whether the limiter's connections
stay in step.

Real Redis, a real loopback upstream that counts what reaches it, the in-process gateway.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest
import redis

from apimgmt import services
from apimgmt.models import Api, Consumer, Policy, Tenant
from apimgmt.redis_client import reset_redis
from gateway import ratelimit
from gateway import usage as gateway_usage
from gateway.policies import response_cache
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Answer, Recorder, Seen
from tests.support.servers import free_port, wait_for_port

pytestmark = pytest.mark.usefixtures("fresh_cache_worker_state")

PATH = "/api/users/v1/items?page=1"


def _policy(tenant: Tenant, name: str, policy_type: str, config: dict[str, Any], **kwargs: Any) -> Policy:
    return services.policy_create(
        tenant=tenant, name=name, policy_type=policy_type, config=config, actor=None, **kwargs
    )


def _cached_limited_api(tenant: Tenant, consumer: Consumer, upstream: Recorder, *more: Policy) -> Api:
    """An API whose cache lookup reads with its limits: a response cache and a generous rate limit."""
    policies = [
        _policy(tenant, "cache", "response_cache", {"ttl_seconds": 60}),
        _policy(tenant, "generous", "rate_limiting", {"requests_per_second": 10_000}),
        *more,
    ]
    api = publish(tenant, upstream.url, policies=policies)
    subscribe(consumer, api)
    return api


def _counting(recorder: Recorder) -> None:
    def respond(seen: Seen) -> Answer:
        return Answer(
            headers=[("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")],
            body=f"answer {len(recorder.seen)}".encode(),
        )

    recorder.respond = respond


def _limiter_connections() -> list[Any]:
    """The limiter's idle connections in this process (gateway.ratelimit._connections)."""
    return [conn for conns in ratelimit._connections.idle.values() for conn in conns]


def test_a_push_message_on_the_limiters_connection_does_not_put_it_out_of_step(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder, redis_client: Any
) -> None:
    """redis-py 8 speaks RESP3 by default, where the server may push messages between replies (client-side caching
    invalidations; the maintenance notifications redis-py asks Redis Enterprise/Cloud for with its default
    maint_notifications_config). Here the push is an invalidation: the limiter's connection tracks the keys it reads
    (CLIENT TRACKING, on the real server), and another client's write of a key it read pushes a message to it.
    Every request must still get its own answer; before 2ced578 each reply went through read_response(), which
    skips pushes."""
    _cached_limited_api(acme, bob_app, upstream)
    _counting(upstream)
    headers = {"X-API-Key": key}
    assert gateway.get(PATH, headers=headers).header("X-Cache") == "MISS"
    assert gateway.get(PATH, headers=headers).header("X-Cache") == "HIT"
    conns = _limiter_connections()
    assert conns, "the limiter keeps its connection for the next request"
    for conn in conns:
        conn.send_command("CLIENT", "TRACKING", "ON")
        assert conn.read_response() in (b"OK", "OK")
    # A hit reads the cached answer's key on the tracking connection: the server now tracks it for that connection.
    assert gateway.get(PATH, headers=headers).header("X-Cache") == "HIT"
    (cache_key,) = list(redis_client.scan_iter("rc:*"))
    redis_client.set(cache_key, redis_client.get(cache_key), keepttl=True)  # same entry, written again: a push
    statuses = []
    for _ in range(4):
        try:
            response = gateway.get(PATH, headers=headers)
        except Exception as exc:  # escapes the gateway: gunicorn answers 500
            statuses.append((500, type(exc).__name__, b""))
            continue
        statuses.append((response.status, response.header("X-Cache"), response.body))
    assert statuses == [(200, "HIT", b"answer 1")] * 4
    assert len(upstream.seen) == 1


def test_a_warm_entry_is_never_served_to_a_caller_the_access_checks_or_the_limits_refuse(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder, bob: Any
) -> None:
    """The hit now ends the request inside the limits step: every refusal before it (the plan's IP rules, a key
    without a subscription, the limit itself) still wins over a stored answer, and each hit is counted once."""
    office = _policy(acme, "office", "ip_rules", {"allow": ["192.0.2.0/24"]})
    partner = services.plan_create(tenant=acme, name="partner", actor=None, policies=[office])
    policies = [
        _policy(acme, "cache", "response_cache", {"ttl_seconds": 60}),
        _policy(acme, "three", "rate_limiting", {"requests_per_minute": 3, "window_type": "fixed"}),
    ]
    api = publish(acme, upstream.url, policies=policies, plans=[partner])
    subscribe(bob_app, api, partner)
    stranger = services.consumer_create(tenant=acme, name="stranger", actor=None, owner=bob)
    _, stranger_key = services.api_key_create(consumer=stranger, actor=None)  # no subscription
    _counting(upstream)
    headers = {"X-API-Key": key}

    first = gateway.get(PATH, headers=headers, remote_addr="192.0.2.1")
    hit = gateway.get(PATH, headers=headers, remote_addr="192.0.2.1")
    assert (first.header("X-Cache"), hit.header("X-Cache"), hit.body) == ("MISS", "HIT", b"answer 1")
    assert gateway.get(PATH, headers=headers, remote_addr="203.0.113.9").status == 403  # plan's IP rules
    assert gateway.get(PATH, headers={"X-API-Key": stranger_key}, remote_addr="192.0.2.1").status == 403
    third = gateway.get(PATH, headers=headers, remote_addr="192.0.2.1")
    refused = gateway.get(PATH, headers=headers, remote_addr="192.0.2.1")
    assert (third.status, third.header("X-Cache")) == (200, "HIT")
    assert third.header("X-RateLimit-Remaining") == "0"  # three counted: the miss and two hits, once each
    assert refused.status == 429 and refused.header("X-Cache") is None and b"answer" not in refused.body
    assert len(upstream.seen) == 1


def test_after_redis_stalls_past_the_timeout_every_request_still_gets_its_own_replies(
    settings: Any, gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    """Redis paused (SIGSTOP) while a limiter write with the cache's GET is out: the replies of that write arrive
    after the timeout, on a connection the gateway must have dropped; with on_store_error=closed the caller gets a
    503 (never the stored answer), and afterwards hits, misses and counts are each request's own."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        reset_redis()
        closed = _policy(
            acme, "ten", "rate_limiting", {"requests_per_minute": 10, "window_type": "fixed"}, on_store_error="closed"
        )
        api = publish(
            acme, upstream.url, policies=[_policy(acme, "cache", "response_cache", {"ttl_seconds": 60}), closed]
        )
        subscribe(bob_app, api)
        _counting(upstream)
        headers = {"X-API-Key": key}
        assert gateway.get(PATH, headers=headers).header("X-Cache") == "MISS"
        assert gateway.get(PATH, headers=headers).header("X-Cache") == "HIT"
        proc.send_signal(signal.SIGSTOP)
        try:
            stalled = gateway.get(PATH, headers=headers)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert stalled.status == 503 and stalled.header("X-Cache") is None
        time.sleep(ratelimit.STORE_BACKOFF_SECONDS + response_cache.BACKOFF_SECONDS + 0.2)
        other = gateway.get("/api/users/v1/other", headers=headers)
        hits = [gateway.get(PATH, headers=headers) for _ in range(2)]
        assert (other.status, other.header("X-Cache"), other.body) == (200, "MISS", b"answer 2")
        assert [(h.status, h.header("X-Cache"), h.body) for h in hits] == [(200, "HIT", b"answer 1")] * 2
        # 2 before the stall, the stalled one (Redis ran its script once it woke up), 3 after: 6 of 10.
        assert hits[-1].header("X-RateLimit-Remaining") == "4"
    finally:
        proc.kill()
        proc.wait()


def _commands(client: Any) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def test_redis_work_per_request_one_write_for_limits_and_the_hit_and_nothing_more_without_a_cache(
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
) -> None:
    """What each request asks of Redis (counted by a Redis of the test's own): an API with limits and no cache sends
    the limiter's script alone; a hit on an API with both adds only the GET that rides on the same write."""
    monkeypatch.setattr(gateway_usage, "FLUSH_EVERY_SECONDS", 3600.0)  # usage buckets: not while counting
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        reset_redis()
        plain = publish(
            acme,
            upstream.url,
            base_path="/api/plain/v1",
            policies=[_policy(acme, "plain-limit", "rate_limiting", {"requests_per_second": 10_000})],
        )
        subscribe(bob_app, plain)
        _cached_limited_api(acme, bob_app, upstream)
        _counting(upstream)
        headers = {"X-API-Key": key}
        for target in ("/api/plain/v1/x", PATH):
            gateway.get(target, headers=headers)
            gateway.get(target, headers=headers)  # warm: route table, key cache, script loaded
        client = redis.Redis(port=port)
        before = _commands(client)
        for _ in range(5):
            assert gateway.get("/api/plain/v1/x", headers=headers).status == 200
        middle = _commands(client)
        for _ in range(5):
            assert gateway.get(PATH, headers=headers).header("X-Cache") == "HIT"
        after = _commands(client)
        client.close()
    finally:
        proc.kill()
        proc.wait()
    without_cache = middle - before
    with_hits = after - middle
    without_cache.pop("info", None)
    with_hits.pop("info", None)
    # The commands the limiter's script runs inside count too (its GET/SET/TIME): both APIs have the same kind of
    # window, so they cancel out. One script per request; a hit adds its one GET and nothing else.
    assert without_cache["evalsha"] == 5 and with_hits["evalsha"] == 5
    assert (with_hits - without_cache, without_cache - with_hits) == (Counter({"get": 5}), Counter())
