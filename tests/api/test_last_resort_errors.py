"""Errors no view raises on purpose still answer the management API's problem documents (admin and portal keep
Django's pages)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apimgmt import services
from apimgmt.models import Consumer, Tenant

pytestmark = pytest.mark.django_db


def _client(user: User) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def test_a_body_over_the_upload_limit_is_a_413_problem_naming_the_limit(
    alice: User, acme: Tenant, settings: Any
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    response = _client(alice).post(
        "/mgmt/v1/consumers/",
        data=json.dumps({"tenant_id": acme.pk, "name": "big", "description": "y" * 20_000}),
        content_type="application/json",
    )
    assert response.status_code == 413
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 413
    assert "10000 bytes" in body["detail"]
    assert body["request_id"] == response["X-Request-ID"]
    assert not Consumer.objects.filter(name="big").exists()


def test_an_unexpected_exception_is_a_500_problem_with_the_request_id(
    alice: User, acme: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> Consumer:
        raise RuntimeError("boom: a bug in a service")

    monkeypatch.setattr(services, "consumer_create", broken)
    response = _client(alice).post(
        "/mgmt/v1/consumers/", data=json.dumps({"tenant_id": acme.pk, "name": "x"}), content_type="application/json"
    )
    assert response.status_code == 500
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["request_id"] == response["X-Request-ID"]
    assert "boom" not in response.content.decode()  # no internals in the answer


def test_the_portal_keeps_djangos_own_error_pages(bob: User, acme: Tenant, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    response = client.post(f"/portal/{acme.pk}/apps/new/", data={"name": "x" * 5_000})
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
