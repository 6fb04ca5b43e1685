"""Configuration-as-code fixtures: a tenant with one of everything a document describes, and a database snapshot."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db.models import Q

from apimgmt import services
from apimgmt.models import (
    Api,
    ApiKey,
    AuditEvent,
    Consumer,
    ConsumerIdentity,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    UpstreamTarget,
)


def build_world(tenant: Tenant, *, actor: Any = None, prefix: str = "") -> dict[str, Any]:
    """Policies, plans and APIs in every state a document can describe (targets, offered plans, a sunset…)."""
    standard = services.policy_create(
        tenant=tenant, name="standard", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=actor
    )
    burst = services.policy_create(
        tenant=tenant,
        name="burst",
        policy_type="rate_limiting",
        config={"requests_per_second": 10, "burst_size": 5},
        mode="shadow",
        on_store_error="local",
        description="Spikes,\nmeasured before they are enforced.",
        actor=actor,
    )
    monthly = services.policy_create(
        tenant=tenant, name="monthly", policy_type="quota", config={"requests_per_month": 10_000}, actor=actor
    )
    gold = services.plan_create(tenant=tenant, name="gold", policies=[standard, monthly], actor=actor)
    free = services.plan_create(tenant=tenant, name="free", approval="manual", description="Try it", actor=actor)
    users = services.api_create(
        tenant=tenant,
        api_name="users",
        base_path=f"{prefix}/api/users/v1",
        upstream_url="https://users.example.com",
        status="active",
        policies=[standard, burst],
        plans=[gold, free],
        targets=[("https://users-2.example.com", 3), ("https://users-3.example.com", 1)],
        description="Users and their ${placeholders}",
        actor=actor,
    )
    orders = services.api_create(
        tenant=tenant,
        api_name="orders",
        base_path=f"{prefix}/api/orders",
        host="api.example.com",
        upstream_url="https://orders.example.com/base",
        status="active",
        visibility="private",
        subscription_approval="manual",
        key_query_param="apikey",
        accept_bearer=False,
        connect_timeout=1.5,
        retries=0,
        openapi_spec={"openapi": "3.1.0", "info": {"title": "Orders", "version": "1"}, "paths": {}},
        actor=actor,
    )
    services.api_deprecate(api=orders, actor=actor, sunset_at=datetime(2027, 6, 1, tzinfo=UTC))
    draft = services.api_create(
        tenant=tenant,
        api_name="beta",
        base_path=f"{prefix}/api/beta",
        upstream_url="http://beta.example.com",
        actor=actor,
    )
    return {"policies": [standard, burst, monthly], "plans": [gold, free], "apis": [users, orders, draft]}


def snapshot(*tenants: str) -> dict[str, Any]:
    """Every row a document could touch, of these tenants, plus the audit log: equal before and after = no change."""
    return {
        "policies": sorted(Policy.objects.filter(tenant__in=tenants).values_list()),
        "plans": sorted(Plan.objects.filter(tenant__in=tenants).values_list()),
        "plan_policies": sorted(Plan.policies.through.objects.filter(plan__tenant__in=tenants).values_list()),
        "apis": sorted(map(repr, Api.objects.filter(tenant__in=tenants).values_list())),
        "api_policies": sorted(Api.policies.through.objects.filter(api__tenant__in=tenants).values_list()),
        "api_plans": sorted(Api.plans.through.objects.filter(api__tenant__in=tenants).values_list()),
        "api_jwt_issuers": sorted(Api.jwt_issuers.through.objects.filter(api__tenant__in=tenants).values_list()),
        "jwt_issuers": sorted(map(repr, JwtIssuer.objects.filter(tenant__in=tenants).values_list())),
        "identities": sorted(map(repr, ConsumerIdentity.objects.filter(consumer__tenant__in=tenants).values_list())),
        "targets": sorted(UpstreamTarget.objects.filter(api__tenant__in=tenants).values_list()),
        "consumers": sorted(map(repr, Consumer.objects.filter(tenant__in=tenants).values_list())),
        "keys": sorted(map(repr, ApiKey.objects.filter(consumer__tenant__in=tenants).values_list())),
        "subscriptions": sorted(map(repr, Subscription.objects.filter(consumer__tenant__in=tenants).values_list())),
        "audit": AuditEvent.objects.filter(Q(tenant__in=tenants) | Q(tenant__isnull=True)).count(),
    }


@pytest.fixture
def run_config(tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    """Run ``manage.py config …`` in-process: (exit code, stdout, stderr)."""
    from io import StringIO

    def run(*args: str) -> tuple[int, str, str]:
        out, err = StringIO(), StringIO()
        try:
            call_command("config", *args, stdout=out, stderr=err)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def world(acme: Tenant, alice: User) -> dict[str, Any]:
    return build_world(acme, actor=alice)


@pytest.fixture
def client_for(db: Any) -> Callable[[User], Any]:
    """An API client that sends ``Authorization: Token <token>`` for the user."""
    from rest_framework.test import APIClient

    from apimgmt.tokens import api_token_create

    def make(user: User) -> APIClient:
        _token, plaintext = api_token_create(user=user, actor=None, name="tests")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
        return client

    return make
