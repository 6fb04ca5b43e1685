"""The admin's policy form: limits as typed fields per policy type, with help and an example; JSON for the rest."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.models import AuditEvent, Policy, Tenant

pytestmark = pytest.mark.django_db

BASE = {"tenant": "acme", "description": "", "mode": "enforce", "on_store_error": "open", "config": ""}


@pytest.fixture
def root(client: Client, staff: User, acme: Tenant) -> Client:
    client.force_login(staff)
    return client


def test_a_rate_limit_is_made_from_typed_fields(root: Client) -> None:
    page = root.get(reverse("admin:apimgmt_policy_add")).content.decode()
    assert "Requests per minute" in page and "For example 1000." in page and "Burst size" in page
    response = root.post(
        reverse("admin:apimgmt_policy_add"),
        {
            **BASE,
            "name": "starter",
            "policy_type": "rate_limiting",
            "rate_requests_per_minute": 5,
            "rate_burst_size": 2,
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert Policy.objects.get(name="starter").config == {
        "requests_per_minute": 5,
        "burst_size": 2,
        "key_extraction": "consumer_id",
        "window_type": "sliding",
    }
    assert AuditEvent.objects.filter(action="policy.create").exists()


def test_a_quota_is_made_from_typed_fields(root: Client) -> None:
    response = root.post(
        reverse("admin:apimgmt_policy_add"),
        {
            **BASE,
            "name": "monthly",
            "policy_type": "quota",
            "quota_requests_per_month": 10000,
            "quota_key_extraction": "key_id",
            "rate_requests_per_minute": 99,  # another type's field: ignored
        },
    )
    assert response.status_code == 302
    assert Policy.objects.get(name="monthly").config == {"requests_per_month": 10000, "key_extraction": "key_id"}


def test_the_change_form_shows_the_config_in_typed_fields_and_saves_them(root: Client, acme: Tenant) -> None:
    policy = services.policy_create(
        tenant=acme, name="p", policy_type="rate_limiting", config={"requests_per_hour": 20}, actor=None
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    page = root.get(url).content.decode()
    assert re.search(r'name="rate_requests_per_hour" value="20"', page)
    response = root.post(url, {**BASE, "name": "p", "rate_requests_per_hour": 30, "rate_window_type": "fixed"})
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert policy.config["requests_per_hour"] == 30 and policy.config["window_type"] == "fixed"
    assert AuditEvent.objects.filter(action="policy.update", object_id=policy.pk).exists()


def test_typed_fields_are_checked_like_any_config(root: Client) -> None:
    response = root.post(
        reverse("admin:apimgmt_policy_add"),
        {
            **BASE,
            "name": "bad",
            "policy_type": "rate_limiting",
            "rate_requests_per_minute": 5,
            "rate_window_type": "fixed",
            "rate_burst_size": 3,
        },
    )
    assert response.status_code == 200
    assert "burst_size only applies to window_type &#x27;sliding&#x27;." in response.content.decode()
    response = root.post(reverse("admin:apimgmt_policy_add"), {**BASE, "name": "empty", "policy_type": "quota"})
    assert "quota config needs requests_per_day and/or requests_per_month." in response.content.decode()
    assert not Policy.objects.exists()


def test_json_config_still_works_for_what_the_fields_do_not_cover(root: Client) -> None:
    response = root.post(
        reverse("admin:apimgmt_policy_add"),
        {**BASE, "name": "json", "policy_type": "rate_limiting", "config": '{"requests_per_second": 3}'},
    )
    assert response.status_code == 302
    assert Policy.objects.get(name="json").config["requests_per_second"] == 3
