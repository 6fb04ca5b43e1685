"""Management API fixtures: token-authenticated clients for the cast, and one object of every kind in acme."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Plan, Policy, Subscription, Tenant, UsageRecord
from apimgmt.tokens import api_token_create

V1 = "/mgmt/v1"


@pytest.fixture
def client_for(db: Any) -> Callable[[User], APIClient]:
    """An API client that sends ``Authorization: Token <token>`` for the user."""

    def make(user: User) -> APIClient:
        _token, plaintext = api_token_create(user=user, actor=None, name="tests")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
        return client

    return make


@pytest.fixture
def acme_policy(acme: Tenant) -> Policy:
    return services.policy_create(
        tenant=acme, name="standard", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=None
    )


@pytest.fixture
def acme_plan(acme: Tenant, acme_policy: Policy) -> Plan:
    return services.plan_create(tenant=acme, name="gold", policies=[acme_policy], actor=None)


@pytest.fixture
def bob_subscription(bob_app: Consumer, acme_api: Api, acme_plan: Plan, bob: User) -> Subscription:
    return services.subscription_request(consumer=bob_app, api=acme_api, plan=acme_plan, actor=bob)


@pytest.fixture
def acme_world(
    acme: Tenant,
    alice: User,
    bob: User,
    vera: User,
    acme_api: Api,
    acme_policy: Policy,
    acme_plan: Plan,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    bob_subscription: Subscription,
) -> dict[str, Any]:
    """One object of every kind in tenant acme, keyed by the router basename."""
    UsageRecord.objects.create(
        tenant=acme,
        api_id=acme_api.pk,
        consumer_id=bob_app.pk,
        key_id=bob_key[0].pk,
        timestamp="2026-01-01T10:00:00Z",
        status_code=200,
        request_count=5,
    )
    from apimgmt.models import AuditEvent

    return {
        "tenant": acme,
        "api": acme_api,
        "policy": acme_policy,
        "plan": acme_plan,
        "consumer": bob_app,
        "key": bob_key[0],
        "subscription": bob_subscription,
        "audit-event": AuditEvent.objects.filter(tenant_id="acme").order_by("id").first(),
        "jwt-issuer": services.jwt_issuer_create(
            tenant=acme,
            name="acme-idp",
            issuer="https://id.acme.example/",
            audiences=["acme-api"],
            jwks_url="https://93.184.215.14/jwks.json",
            actor=None,
        ),
        **_acme_events_out(acme, bob_subscription, acme_plan),
    }


def _acme_events_out(acme: Tenant, subscription: Subscription, plan: Plan) -> dict[str, Any]:
    """The events-out resources (apimgmt/api/webhook_views.py): a webhook endpoint with one delivery, and the
    subscription and plan again under the basenames of their change-plan and archive actions."""
    from apimgmt import webhooks
    from apimgmt.models import Event, WebhookDelivery

    endpoint, _secret = webhooks.webhook_endpoint_create(tenant=acme, url="https://93.184.215.14/hooks", actor=None)
    event = Event.objects.create(tenant=acme, event_type="key.created", data={})
    # An id no other row of the matrix shows (the list tests look for `"<pk>"` in other tenants' answers).
    delivery = WebhookDelivery.objects.create(id=9_876_543_210, endpoint=endpoint, event=event)
    return {"webhook": endpoint, "webhook-delivery": delivery, "subscription-plan": subscription, "plan-archive": plan}
