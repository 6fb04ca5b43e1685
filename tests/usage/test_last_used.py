"""A key's "last used": a call through the gateway, one flush, and the portal and the admin show it; a following
flusher shows a call of the minute still in progress within OPEN_MINUTE_PEEK_SECONDS."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import formats, timezone

from apimgmt import services
from apimgmt import usage_buckets as contract
from apimgmt.models import ApiKey, Consumer, Tenant, UsageRecord
from apimgmt.usage import UsageFlusher
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway
from tests.gateway.upstreams import Recorder, recording_upstream

pytestmark = pytest.mark.django_db


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@pytest.fixture
def gateway(settings: Any, tmp_path: Any) -> Iterator[InProcessGateway]:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    gw = InProcessGateway()
    yield gw
    from gateway.wsgi import reset_gateway

    reset_gateway()


@pytest.fixture
def called(
    gateway: InProcessGateway,
    upstream: Recorder,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    redis_client: redis.Redis,
) -> ApiKey:
    """bob's key after one call through the gateway and one round of the flusher."""
    api = services.api_create(
        tenant=acme,
        api_name="users",
        base_path="/api/users/v1",
        upstream_url=upstream.url + "/svc",
        status="active",
        actor=None,
    )
    services.subscription_request(consumer=bob_app, api=api, actor=None)
    key, plaintext = bob_key
    assert key.last_used_at is None
    assert gateway.get("/api/users/v1/items", headers={"X-API-Key": plaintext}).status == 200
    get_gateway().usage.flush()  # the worker's buckets to Redis (its thread does this about once a second)
    with CaptureQueriesContext(connection) as queries:
        UsageFlusher(client=redis_client, consumer="t").drain()
    updates = [q["sql"] for q in queries if q["sql"].startswith("UPDATE") and "am_api_keys" in q["sql"]]
    assert len(updates) == 1, "one batched UPDATE of last_used_at per flush, not one per request"
    key.refresh_from_db()
    return key


def test_the_portal_shows_a_key_used_through_the_gateway(called: ApiKey, bob: User, bob_app: Consumer) -> None:
    assert called.last_used_at is not None
    client = Client()
    client.force_login(bob)
    page = client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    cell = re.search(r'data-label="Last used"[^>]*>(.*?)</td>', page, re.S)
    assert cell is not None, page[-3000:]
    assert "never" not in cell.group(1)
    assert re.fullmatch(r"\d+\xa0minutes? ago", cell.group(1).strip()), cell.group(1)


def test_the_admin_shows_a_key_used_through_the_gateway(called: ApiKey, staff: User) -> None:
    client = Client()
    client.force_login(staff)
    listing = client.get(reverse("admin:apimgmt_apikey_changelist")).content.decode()
    assert "field-last_used_at" in listing
    cell = re.search(r'class="field-last_used_at[^"]*"[^>]*>(.*?)</t[dh]>', listing, re.S)
    assert cell is not None
    assert cell.group(1).strip() == formats.localize(timezone.localtime(called.last_used_at)), cell.group(1)


def test_a_following_flusher_shows_a_call_before_its_minute_is_over(
    gateway: InProcessGateway,
    upstream: Recorder,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    redis_client: redis.Redis,
) -> None:
    api = services.api_create(
        tenant=acme,
        api_name="users",
        base_path="/api/users/v1",
        upstream_url=upstream.url + "/svc",
        status="active",
        actor=None,
    )
    services.subscription_request(consumer=bob_app, api=api, actor=None)
    key, plaintext = bob_key
    if time.time() % 60 > 55:  # the call and the flush must fall in one minute
        time.sleep(60 - time.time() % 60 + 0.1)
    assert gateway.get("/api/users/v1/items", headers={"X-API-Key": plaintext}).status == 200
    get_gateway().usage.flush()
    flusher = UsageFlusher(client=redis_client, consumer="t")

    assert flusher.flush_once().requests == 0, "the minute in progress is copied only once it is over"
    assert not UsageRecord.objects.exists()
    key.refresh_from_db()
    assert key.last_used_at is not None
    assert key.last_used_at.timestamp() == contract.minute_of(time.time()), "the minute of the call"

    with CaptureQueriesContext(connection) as queries:
        assert gateway.get("/api/users/v1/items", headers={"X-API-Key": plaintext}).status == 200
        get_gateway().usage.flush()
        flusher.flush_once()
    assert not [q for q in queries if "am_api_keys" in q["sql"] and q["sql"].startswith("UPDATE")], (
        "the minute in progress is read at most every OPEN_MINUTE_PEEK_SECONDS"
    )
