"""Shared fixtures: a small fixed cast (tenant acme: alice admin, bob developer, vera viewer; tenant globex:
carol admin), a clean Redis database per test, and settings for servers started as subprocesses."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Tenant
from apimgmt.redis_client import get_redis, reset_redis
from tests.support.servers import app_server_env


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> None:
    """The usage tables are partitioned by month: tests write rows from January 2025 on, so those months exist (in
    production the flusher creates each month ahead of its rows)."""
    from datetime import UTC, datetime

    from apimgmt import usage_partitions

    first = datetime(2025, 1, 1, tzinfo=UTC)
    months = range((datetime.now(tz=UTC).year - 2025) * 12 + datetime.now(tz=UTC).month + 3)
    with django_db_blocker.unblock():
        usage_partitions.ensure([usage_partitions.add_months(first, n) for n in months])


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[redis.Redis | None]:
    """Every test starts with an empty Redis database (the one REDIS_URL names)."""
    reset_redis()
    client = get_redis()
    if client is not None:
        client.flushdb()
    yield client
    reset_redis()


@pytest.fixture
def redis_client(clean_redis: redis.Redis | None) -> redis.Redis:
    if clean_redis is None:
        pytest.skip("REDIS_URL is not set")
    return clean_redis


@pytest.fixture
def staff(db: Any) -> User:
    return User.objects.create_superuser("root", "root@example.com", "root-password-123")


@pytest.fixture
def acme(db: Any) -> Tenant:
    return services.tenant_create(id="acme", name="Acme", actor=None)


@pytest.fixture
def globex(db: Any) -> Tenant:
    return services.tenant_create(id="globex", name="Globex", actor=None)


def _member(username: str, tenant: Tenant, role: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.com", f"{username}-password-123")
    services.membership_set(tenant=tenant, user=user, role=role, actor=None)
    return user


@pytest.fixture
def alice(acme: Tenant) -> User:
    """Admin of acme."""
    return _member("alice", acme, "admin")


@pytest.fixture
def bob(acme: Tenant) -> User:
    """Developer in acme."""
    return _member("bob", acme, "developer")


@pytest.fixture
def vera(acme: Tenant) -> User:
    """Viewer in acme."""
    return _member("vera", acme, "viewer")


@pytest.fixture
def carol(globex: Tenant) -> User:
    """Admin of globex."""
    return _member("carol", globex, "admin")


@pytest.fixture
def acme_api(acme: Tenant) -> Api:
    return services.api_create(
        tenant=acme,
        api_name="users",
        base_path="/api/users/v1",
        upstream_url="https://users.example.com",
        status="active",
        actor=None,
    )


@pytest.fixture
def bob_app(acme: Tenant, bob: User) -> Consumer:
    return services.consumer_create(tenant=acme, name="bob-app", owner=bob, actor=bob)


@pytest.fixture
def bob_key(bob_app: Consumer, bob: User) -> tuple[ApiKey, str]:
    return services.api_key_create(consumer=bob_app, name="default", actor=bob)


@pytest.fixture
def live_env(transactional_db: Any) -> dict[str, str]:
    """Environment for a gunicorn subprocess that sees this test's (committed) database and Redis."""
    return app_server_env()


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """No key, token, password or Authorization header in any log line of the suite (in-process or servers')."""
    from tests.support.secrets_scan import SERVER_LOG_DIR, install_capture, leaked_secrets

    handler = install_capture()
    yield
    try:
        leaks = leaked_secrets(handler)
    finally:
        shutil.rmtree(SERVER_LOG_DIR, ignore_errors=True)
    assert not leaks, "secrets in captured log lines:\n" + "\n".join(leaks[:20])
