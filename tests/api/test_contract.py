"""The DESIGN.md "Contract" table, exercised as written: exactly those bodies, exactly those answer fields."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.usage import add_minute

pytestmark = pytest.mark.django_db


def test_contract_table(staff: User, client_for: Any) -> None:
    c = client_for(staff)

    r = c.post("/mgmt/v1/tenants/", {"id": "acme", "name": "Acme"}, format="json")
    assert r.status_code == 201 and r["Content-Type"] == "application/json"
    assert r.json()["id"] == "acme" and r.json()["name"] == "Acme"

    r = c.post(
        "/mgmt/v1/policies/",
        {
            "tenant_id": "acme",
            "name": "standard",
            "policy_type": "rate_limiting",
            "config": {
                "requests_per_minute": 1000,
                "burst_size": 100,
                "key_extraction": "consumer_id",
                "window_type": "sliding",
            },
            "mode": "enforce",
            "on_store_error": "open",
        },
        format="json",
    )
    assert r.status_code == 201, r.json()
    policy_id = r.json()["id"]
    assert policy_id.startswith("pol_")

    r = c.post(
        "/mgmt/v1/plans/",
        {"tenant_id": "acme", "name": "gold", "policies": [policy_id], "approval": "auto"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    plan_id = r.json()["id"]
    assert plan_id.startswith("pln_")

    r = c.post(
        "/mgmt/v1/apis/",
        {
            "tenant_id": "acme",
            "api_name": "users",
            "base_path": "/api/users/v1",
            "upstream_url": "https://users.example.com",
            "status": "active",
            "strip_path": True,
            "key_header": "X-API-Key",
            "key_query_param": "api_key",
            "policies": [policy_id],
            "subscription_approval": "auto",
            "visibility": "public",
        },
        format="json",
    )
    assert r.status_code == 201, r.json()
    api_id = r.json()["id"]
    assert api_id.startswith("api_")

    r = c.post("/mgmt/v1/consumers/", {"tenant_id": "acme", "name": "mobile-app"}, format="json")
    assert r.status_code == 201, r.json()
    consumer_id = r.json()["id"]
    assert consumer_id.startswith("con_")

    r = c.post(
        "/mgmt/v1/subscriptions/", {"consumer_id": consumer_id, "api_id": api_id, "plan_id": plan_id}, format="json"
    )
    assert r.status_code == 201, r.json()
    assert r.json()["id"].startswith("sub_") and r.json()["status"] == "active"

    r = c.post(
        "/mgmt/v1/keys/",
        {"consumer_id": consumer_id, "name": "prod", "expires_at": "2031-01-01T00:00:00Z"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    created = r.json()
    assert created["key_id"].startswith("key_") and created["key"].startswith("ak_live_") and len(created["key"]) == 46
    assert created["key_prefix"] == created["key"][:12]

    r = c.post(f"/mgmt/v1/keys/{created['key_id']}/rotate/", {"overlap_seconds": 300}, format="json")
    assert r.status_code == 201, r.json()
    rotated = r.json()
    assert rotated["key_id"] != created["key_id"] and rotated["key"] != created["key"]
    assert rotated["key_prefix"] == rotated["key"][:12] and rotated["previous_key_expires_at"]

    r = c.post(f"/mgmt/v1/keys/{rotated['key_id']}/revoke/")
    assert r.status_code == 200 and r.json()["key_id"] == rotated["key_id"] and r.json()["active"] is False
    assert "key" not in r.json()

    add_minute(
        tenant_id="acme",
        api_id=api_id,
        consumer_id=consumer_id,
        key_id=created["key_id"],
        timestamp="2026-01-01T10:05:00Z",
        status_code=200,
        request_count=8,
        error_count=0,
        bytes_in=80,
        bytes_out=800,
        latency_ms_sum=80.0,
        latency_ms_max=30.0,
    )
    add_minute(
        tenant_id="acme",
        api_id=api_id,
        consumer_id=consumer_id,
        key_id=created["key_id"],
        timestamp="2026-01-01T10:40:00Z",
        status_code=429,
        request_count=2,
        error_count=2,
        bytes_in=20,
        bytes_out=40,
        latency_ms_sum=2.0,
        latency_ms_max=1.5,
    )
    r = c.get(
        "/mgmt/v1/usage/",
        {
            "tenant_id": "acme",
            "api_id": api_id,
            "consumer_id": consumer_id,
            "key_id": created["key_id"],
            "interval": "hour",
            "from": "2026-01-01T00:00:00Z",
            "to": "2026-01-02T00:00:00Z",
        },
    )
    assert r.status_code == 200, r.json()
    assert r.json()["results"] == [
        {
            "bucket": "2026-01-01T10:00:00Z",
            "requests": 10,
            "errors": 2,
            "rate_limited": 2,
            "bytes_in": 100,
            "bytes_out": 840,
            "latency_ms_avg": 8.2,
            "latency_ms_max": 30.0,
            "connections": 0,
            "connection_seconds": 0.0,
            "messages_in": 0,
            "messages_out": 0,
        }
    ]


def test_errors_are_problem_json_with_field_errors_under_errors(staff: User, client_for: Any) -> None:
    r = client_for(staff).post("/mgmt/v1/tenants/", {"id": "Not A Slug", "name": ""}, format="json")
    assert r.status_code == 400 and r["Content-Type"] == "application/problem+json"
    body = r.json()
    assert {"type", "title", "status", "detail", "errors"} <= set(body)
    assert body["status"] == 400 and set(body["errors"]) == {"id", "name"}
