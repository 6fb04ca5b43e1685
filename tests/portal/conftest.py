"""Portal test helpers: a second developer in acme (dave), plans, and a signed-in client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.core.cache import cache
from django.test import Client

from apimgmt import services
from apimgmt.models import Api, Plan, Tenant


@pytest.fixture(autouse=True)
def clean_cache() -> Iterator[None]:
    """Lockout and mail-throttle counters start at zero in every test, with or without REDIS_URL."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def dave(acme: Tenant) -> User:
    """A second developer in acme, who must never see bob's apps."""
    user = User.objects.create_user("dave", "dave@example.com", "dave-password-123")
    services.membership_set(tenant=acme, user=user, role="developer", actor=None)
    return user


@pytest.fixture
def bob_client(bob: User) -> Client:
    client = Client()
    client.force_login(bob)
    return client


@pytest.fixture
def free_plan(acme: Tenant) -> Plan:
    return services.plan_create(tenant=acme, name="Free", actor=None)


@pytest.fixture
def gold_plan(acme: Tenant) -> Plan:
    return services.plan_create(tenant=acme, name="Gold", approval="manual", actor=None)


@pytest.fixture
def open_acme(acme: Tenant) -> Tenant:
    return services.tenant_update(tenant=acme, open_signup=True, actor=None)


@pytest.fixture
def acme_api_with_docs(acme_api: Api) -> Api:
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "Users", "version": "1.0"},
        "paths": {"/users": {"get": {"summary": "List users", "responses": {"200": {"description": "ok"}}}}},
    }
    return services.api_update(api=acme_api, openapi_spec=spec, description="People and their accounts.", actor=None)


def link_in_last_mail(pattern: str = r"https?://\S+") -> str:
    assert mail.outbox, "no mail was sent"
    match = re.search(pattern, mail.outbox[-1].body)
    assert match, f"no link in: {mail.outbox[-1].body}"
    return match.group(0)


def path_of(url: str) -> str:
    return re.sub(r"^https?://[^/]+", "", url)
