"""Security regressions: one tenant cannot capture another's traffic, hand itself hidden APIs, or lock everyone out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.test.utils import override_settings
from rest_framework.test import APIClient

from apimgmt import services
from apimgmt.models import Api, Consumer, Subscription, Tenant
from apimgmt.tokens import api_token_create


@pytest.fixture
def client_for(db: Any) -> Callable[[User], APIClient]:
    def make(user: User) -> APIClient:
        _token, plaintext = api_token_create(user=user, actor=None, name="tests")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
        return client

    return make


def _api(tenant: Tenant, base_path: str, host: str = "") -> Api:
    return services.api_create(
        tenant=tenant,
        api_name=f"{tenant.id}{base_path}",
        base_path=base_path,
        host=host,
        upstream_url="https://upstream.example.com",
        status=Api.Status.ACTIVE,
        actor=None,
    )


@pytest.mark.parametrize(
    ("base_path", "host"),
    [
        ("/api/users/v1/admin", ""),  # longer prefix wins: nested under acme's route
        ("/api/users/v1", "gw.example.com"),  # host-bound wins over acme's host-less route
        ("/api", "gw.example.com"),  # host-bound and above acme's route still takes its requests on that host
    ],
)
def test_a_tenant_cannot_publish_a_route_that_captures_another_tenants_traffic(
    acme_api: Api, globex: Tenant, base_path: str, host: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        _api(globex, base_path, host)
    assert "another tenant" in str(exc.value.message_dict["base_path"])
    assert not Api.objects.filter(tenant=globex).exists()


def test_moving_an_api_under_another_tenants_route_is_refused(acme_api: Api, globex: Tenant) -> None:
    own = _api(globex, "/globex/orders")
    with pytest.raises(ValidationError):
        services.api_update(api=own, actor=None, base_path="/api/users/v1/orders")
    own.refresh_from_db()
    assert own.base_path == "/globex/orders"


def test_routes_that_do_not_capture_anything_stay_allowed(acme_api: Api, acme: Tenant, globex: Tenant) -> None:
    _api(globex, "/api/users/v10")  # not on a segment boundary
    _api(globex, "/api")  # shorter and host-less: acme's longer route still wins
    _api(acme, "/api/users/v1/beta")  # nesting inside one's own tenant is fine
    _api(globex, "/globex", "gw.example.com")


def test_the_management_api_answers_a_clear_400_for_a_capturing_route(
    acme_api: Api, carol: User, client_for: Callable[[User], APIClient]
) -> None:
    body = {
        "tenant_id": "globex",
        "api_name": "sneaky",
        "base_path": "/api/users/v1/x",
        "upstream_url": "https://upstream.example.com",
    }
    response = client_for(carol).post("/mgmt/v1/apis/", body, format="json")
    assert response.status_code == 400
    assert "base_path" in response.json()["errors"]


def test_a_developer_cannot_subscribe_to_a_private_api_through_the_management_api(
    acme: Tenant, alice: User, bob: User, bob_app: Consumer, client_for: Callable[[User], APIClient]
) -> None:
    private = services.api_create(
        tenant=acme,
        api_name="internal",
        base_path="/internal/v1",
        upstream_url="https://internal.example.com",
        status=Api.Status.ACTIVE,
        visibility=Api.Visibility.PRIVATE,
        actor=None,
    )
    body = {"consumer_id": bob_app.pk, "api_id": private.pk}
    response = client_for(bob).post("/mgmt/v1/subscriptions/", body, format="json")
    assert response.status_code == 400
    assert not Subscription.objects.filter(api=private).exists()
    # A tenant admin may still hand the private API to bob's app.
    assert client_for(alice).post("/mgmt/v1/subscriptions/", body, format="json").status_code == 201


@override_settings(PORTAL_LOGIN_ACCOUNT_FAILURES=100, PORTAL_LOGIN_IP_FAILURES=3)
def test_guessing_behind_the_load_balancer_does_not_lock_out_other_clients(bob: User, settings: Any) -> None:
    settings.GATEWAY = {**settings.GATEWAY, "TRUSTED_PROXIES": ["10.0.0.0/8"]}
    attacker = Client(REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.66")
    for _ in range(5):
        attacker.post("/portal/acme/login/", {"username": "nobody", "password": "wrong"})
    victim = Client(REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="198.51.100.7")
    response = victim.post("/portal/acme/login/", {"username": "bob", "password": "bob-password-123"})
    assert response.status_code == 302
    # The guesser itself is locked out.
    locked = attacker.post("/portal/acme/login/", {"username": "bob", "password": "bob-password-123"})
    assert locked.status_code == 429
