"""A key's "last used": a call through the gateway, one flush, and the portal and the admin show it; a following
flusher shows a call of the minute still in progress within OPEN_MINUTE_PEEK_SECONDS; and end to end, the real
gateway under gunicorn and ``flush_usage --follow`` show a call before its minute is over."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import formats, timezone

from apimgmt import services, usage
from apimgmt import usage_buckets as contract
from apimgmt.models import ApiKey, Consumer, Tenant, UsageRecord
from apimgmt.usage import UsageFlusher
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway
from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.servers import gunicorn
from tests.usage.helpers import manage, wait_until

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


@pytest.mark.django_db(transaction=True)
def test_last_used_is_shown_within_a_minute_through_the_real_gateway_and_a_following_flusher(
    live_env: dict[str, str],
    tmp_path: Path,
    upstream: Recorder,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    redis_client: redis.Redis,
    settings: Any,
) -> None:
    """Issue 18: "Last used" updates within a minute of use. A gateway worker sends its buckets about once a second;
    the following flusher reads the minute in progress as soon as a tenant has buckets (then every
    OPEN_MINUTE_PEEK_SECONDS), so a call with at least that long left in its minute shows before the minute is over.
    A later call is shown when its minute is copied, close_grace after the minute: still within the minute asked."""
    settings.UPSTREAM_ALLOW_PRIVATE = True
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
    env = {
        **live_env,
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    (tmp_path / "prom").mkdir()
    flusher = manage(env, "flush_usage", "--follow", "--block-ms", "250", log_path=tmp_path / "flusher.log")
    try:
        with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
            # Room for a peek (and a loaded machine) before the minute ends; the call is the only one.
            if time.time() % 60 > 60 - 2 * usage.OPEN_MINUTE_PEEK_SECONDS:
                time.sleep(60 - time.time() % 60 + 0.2)
            request = urllib.request.Request(url + "/api/users/v1/items", headers={"X-API-Key": plaintext})
            called = time.time()
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
            minute_over = contract.minute_of(called) + 60

            def shown() -> bool:
                key.refresh_from_db()
                return key.last_used_at is not None

            assert wait_until(shown, timeout=50, interval=0.25), "last used not set within 50 s of the call"
            seen = time.time()
    finally:
        flusher.send_signal(signal.SIGTERM)
        flusher.wait(timeout=30)
    assert len(upstream.seen) == 1
    assert key.last_used_at is not None
    assert key.last_used_at.timestamp() == contract.minute_of(called), "the minute of the call"
    assert seen - called < 60
    assert seen < minute_over, f"shown {seen - called:.1f} s after the call, after its minute was over"
