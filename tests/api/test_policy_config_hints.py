"""A policy config field nobody knows is named, with the closest valid one, in the management API and the admin."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from apimgmt.models import Policy, Tenant

pytestmark = pytest.mark.django_db

HINT = "requests_per_minut (did you mean `requests_per_minute`?)"


def test_the_management_api_suggests_the_field_meant(alice: User, client_for: Any) -> None:
    r = client_for(alice).post(
        "/mgmt/v1/policies/",
        {"tenant_id": "acme", "name": "typo", "policy_type": "rate_limiting", "config": {"requests_per_minut": 5}},
        format="json",
    )
    assert r.status_code == 400
    assert any(HINT in message for message in r.json()["errors"]["config"]), r.json()
    assert not Policy.objects.exists()


def test_the_admin_suggests_the_field_meant(client: Client, staff: User, acme: Tenant) -> None:
    client.force_login(staff)
    r = client.post(
        reverse("admin:apimgmt_policy_add"),
        {
            "tenant": "acme",
            "name": "typo",
            "policy_type": "rate_limiting",
            "config": '{"requests_per_minute": 5, "burst": 2}',
            "mode": "enforce",
            "on_store_error": "open",
        },
    )
    assert r.status_code == 200
    assert "burst (did you mean `burst_size`?)" in r.content.decode()
    assert not Policy.objects.exists()
