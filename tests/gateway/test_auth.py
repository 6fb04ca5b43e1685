"""Key authentication: where keys are read, what is refused with 401 or 403, and the cache levels."""

from __future__ import annotations

import datetime
import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apimgmt import keys, services
from apimgmt.models import Consumer
from tests.gateway.conftest import publish, subscribe


def _bad_checksum(key: str) -> str:
    last = "A" if key[-1] != "A" else "B"
    return key[:-1] + last


def test_key_in_header_bearer_or_query_param_is_accepted(gateway, acme, upstream, bob_app, key):
    api = publish(acme, upstream.url, base_path="/api/q", key_query_param="apikey")
    subscribe(bob_app, api)
    assert gateway.get("/api/q/a", headers={"X-API-Key": key}).status == 200
    assert gateway.get("/api/q/a", headers={"Authorization": f"Bearer {key}"}).status == 200
    assert gateway.get(f"/api/q/a?x=1&apikey={key}&y=2").status == 200
    assert upstream.paths[-1] == "/a?x=1&y=2"


def test_auth_table(gateway, acme, globex, upstream, bob_app, bob, key, django_assert_num_queries):
    api = publish(acme, upstream.url, base_path="/api/users/v1", key_query_param="apikey")
    subscribe(bob_app, api)
    other_app = services.consumer_create(tenant=globex, name="globex-app", actor=None)
    _, other_tenant_key = services.api_key_create(consumer=other_app, actor=None)
    unsubscribed_app = services.consumer_create(tenant=acme, name="lurker", actor=None)
    _, unsubscribed_key = services.api_key_create(consumer=unsubscribed_app, actor=None)
    revoked_row, revoked_key = services.api_key_create(consumer=bob_app, actor=None)
    services.api_key_revoke(key=revoked_row, actor=None)
    expiring_row, expired_key = services.api_key_create(
        consumer=bob_app, actor=None, expires_at=timezone.now() + datetime.timedelta(seconds=1)
    )
    type(expiring_row).objects.filter(pk=expiring_row.pk).update(
        expires_at=timezone.now() - datetime.timedelta(seconds=1)
    )
    blocked_app = services.consumer_create(tenant=acme, name="blocked", actor=None)
    subscribe(blocked_app, api)
    _, blocked_key = services.api_key_create(consumer=blocked_app, actor=None)
    services.consumer_block(consumer=blocked_app, actor=None)
    unknown_key = keys.generate_key()

    cases = {
        "missing": ({}, "", 401),
        "malformed": ({"X-API-Key": "not-a-key"}, "", 401),
        "unknown": ({"X-API-Key": unknown_key}, "", 401),
        "revoked": ({"X-API-Key": revoked_key}, "", 401),
        "expired": ({"X-API-Key": expired_key}, "", 401),
        "blocked consumer": ({"X-API-Key": blocked_key}, "", 403),
        "other tenant": ({"X-API-Key": other_tenant_key}, "", 403),
        "not subscribed": ({"X-API-Key": unsubscribed_key}, "", 403),
        "two in one header": ({"X-API-Key": f"{key},{key}"}, "", 401),
        "header and bearer": ({"X-API-Key": key, "Authorization": f"Bearer {key}"}, "", 401),
        "header and query": ({"X-API-Key": key}, f"?apikey={key}", 401),
        "repeated query": ({}, f"?apikey={key}&apikey={key}", 401),
        "valid": ({"X-API-Key": key}, "", 200),
    }
    bodies = {}
    for name, (headers, query, expected) in cases.items():
        response = gateway.get("/api/users/v1/x" + query, headers={**headers, "X-Request-ID": "fixed-request-id-1"})
        assert response.status == expected, name
        if expected != 200:
            assert response.header("Content-Type") == "application/problem+json", name
            body = response.json()
            assert set(body) >= {"type", "title", "status", "detail", "request_id"}, name
            bodies[name] = response.body
    assert bodies["unknown"] == bodies["revoked"] == bodies["expired"] == bodies["missing"] == bodies["malformed"]
    assert len(upstream.seen) == 1

    with django_assert_num_queries(0):
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": _bad_checksum(key)}).status == 401


def test_warm_request_makes_no_query_and_one_redis_round_trip(gateway, acme, upstream, bob_app, key, monkeypatch):
    from redis.connection import AbstractConnection

    policy = services.policy_create(
        tenant=acme,
        name="two-windows",
        policy_type="rate_limiting",
        config={"requests_per_second": 100000, "requests_per_minute": 1000000},
        actor=None,
    )
    api = publish(acme, upstream.url, policies=[policy])
    subscribe(bob_app, api)
    for _ in range(3):  # cold: route table, key lookup, script load
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200

    sent: list[bytes] = []
    original = AbstractConnection.send_packed_command

    test_thread = threading.current_thread()

    def counting(self, command, check_health=True):
        if threading.current_thread() is test_thread:  # the background config poller is not the request
            sent.append(b"".join(command) if isinstance(command, list) else command)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200
    assert len(queries) == 0
    assert len(sent) == 5
    # Each request writes the limiter's EVALSHA and nothing else: usage is summed in memory, sent by a thread.
    assert all(b"EVALSHA" in payload for payload in sent)
    assert not [payload for payload in sent if b"usage:" in payload]


def test_unknown_keys_are_cached_briefly_so_a_flood_does_not_reach_the_database(
    gateway, users_api, key, settings_gateway
):
    settings_gateway(AUTH_FAILURE_LIMIT=0)  # the negative cache alone (the failure throttle is tested below)
    unknown = keys.generate_key()
    gateway.get("/api/users/v1/x", headers={"X-API-Key": unknown})
    with CaptureQueriesContext(connection) as queries:
        for _ in range(20):
            assert gateway.get("/api/users/v1/x", headers={"X-API-Key": unknown}).status == 401
    assert len(queries) == 0


def test_credential_is_never_forwarded(gateway, acme, upstream, bob_app, key):
    api = publish(acme, upstream.url, base_path="/api/q", key_query_param="apikey")
    subscribe(bob_app, api)
    gateway.get("/api/q/a", headers={"X-API-Key": key})
    gateway.get("/api/q/a", headers={"Authorization": f"Bearer {key}"})
    gateway.get(f"/api/q/a?apikey={key}")
    for seen in upstream.seen:
        assert key not in seen.path
        assert all(key not in v for v in seen.headers.values())
        assert "x-api-key" not in seen.headers and "authorization" not in seen.headers


@pytest.mark.parametrize(
    "query",
    [
        "?x=1;apikey={key}",
        "?apikey={key};x=1",
        "?x=1;apikey={key}&y=2",
        "?x=1&y=a;b;apikey={key}",
    ],
)
def test_a_key_parameter_after_a_semicolon_is_read_and_never_forwarded(gateway, acme, upstream, bob_app, key, query):
    api = publish(acme, upstream.url, base_path="/api/q", key_query_param="apikey")
    subscribe(bob_app, api)
    response = gateway.get("/api/q/a" + query.format(key=key))
    assert response.status == 200
    (seen,) = upstream.seen
    assert key not in seen.path
    assert "apikey" not in seen.path


def test_the_other_query_pairs_keep_their_separators_when_the_key_is_stripped(gateway, acme, upstream, bob_app, key):
    api = publish(acme, upstream.url, base_path="/api/q", key_query_param="apikey")
    subscribe(bob_app, api)
    assert gateway.get(f"/api/q/a?x=1;apikey={key};z=3&y=a;b").status == 200
    assert upstream.paths == ["/a?x=1;z=3&y=a;b"]


def test_a_semicolon_key_next_to_a_header_key_is_a_duplicate(gateway, acme, upstream, bob_app, key):
    api = publish(acme, upstream.url, base_path="/api/q", key_query_param="apikey")
    subscribe(bob_app, api)
    response = gateway.get(f"/api/q/a?x=1;apikey={key}", headers={"X-API-Key": key})
    assert response.status == 401
    assert upstream.seen == []


@pytest.mark.django_db
def test_blocked_consumer_gets_403_not_401(gateway, users_api, bob_app, key):
    services.consumer_block(consumer=Consumer.objects.get(pk=bob_app.pk), actor=None)
    response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 403


def test_another_tenants_key_leaves_no_trace_of_its_consumer_in_this_tenants_usage(
    gateway, users_api, globex, bob_app, caplog, redis_client
):
    """A globex key sent to acme's API: 403, and acme's usage, access log and metrics name no globex consumer."""
    import logging

    from django.conf import settings

    from apimgmt.models import UsageRecord
    from apimgmt.usage import UsageFlusher, flusher_redis
    from gateway.wsgi import get_gateway

    intruder = services.consumer_create(tenant=globex, name="globex-app", actor=None)
    intruder_row, intruder_key = services.api_key_create(consumer=intruder, actor=None)
    unsubscribed = services.consumer_create(tenant=users_api.tenant, name="lurker", actor=None)
    lurker_row, lurker_key = services.api_key_create(consumer=unsubscribed, actor=None)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": intruder_key}).status == 403
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": lurker_key}).status == 403
    intruder_line, lurker_line = [r for r in caplog.records if r.name == "gateway.access"]
    assert intruder_line.consumer == "" and intruder_line.key_prefix == ""
    assert lurker_line.consumer == unsubscribed.id  # acme's own consumer: still its traffic

    get_gateway().usage.flush()
    flusher = UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer="t", batch_size=64)
    flusher.drain()
    rows = {(r.tenant_id, r.consumer_id, r.key_id, r.status_code) for r in UsageRecord.objects.all()}
    assert rows == {("acme", "", "", 403), ("acme", unsubscribed.id, lurker_row.key_id, 403)}
    assert not any(intruder.id in row or intruder_row.key_id in row for row in rows)
