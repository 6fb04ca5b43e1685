"""Bad input gets a 400 problem+json naming the field, never a 500 and never silently ignored."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.models import Api, Policy

pytestmark = pytest.mark.django_db

BASE = {"tenant_id": "acme", "api_name": "orders", "base_path": "/orders", "upstream_url": "https://orders.example.com"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"surprise": True}, "surprise"),
        ({"id": "api_mine"}, "id"),
        ({"retries": "three"}, "retries"),
        ({"retries": 99}, "retries"),
        ({"strip_path": "maybe"}, "strip_path"),
        ({"status": "live"}, "status"),
        ({"visibility": "secret"}, "visibility"),
        ({"api_name": "x" * 101}, "api_name"),
        ({"upstream_url": "ftp://orders.example.com"}, "upstream_url"),
        ({"upstream_url": "https://user:pw@orders.example.com"}, "upstream_url"),
        ({"base_path": "/admin/x"}, "base_path"),
        ({"base_path": "/a/../b"}, "base_path"),
        ({"key_header": "Bad Header"}, "key_header"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"policies": ["pol_doesnotexist"]}, "policies"),
        ({"policies": "pol_x"}, "policies"),
        ({"targets": [{"url": "https://t.example.com", "weight": 0}]}, "targets.0.weight"),
        ({"targets": [{"url": "https://t.example.com", "extra": 1}]}, "targets.0.extra"),
        ({"targets": [{"weight": 1}]}, "targets.0.url"),
        ({"api_name": 0}, "api_name"),
        ({"description": 7}, "description"),
        ({"retries": "3"}, "retries"),
        ({"connect_timeout": "1.5"}, "connect_timeout"),
        ({"strip_path": "true"}, "strip_path"),
        ({"accept_bearer": 1}, "accept_bearer"),
        ({"policies": [7]}, "policies.0"),
        ({"openapi_spec": None}, "openapi_spec"),
        ({"openapi_spec": ["not", "an", "object"]}, "openapi_spec"),
        ({"openapi_spec": {"info": "nul \u0000 inside"}}, "openapi_spec"),
        ({"api_name": None}, "api_name"),
        ({"tenant_id": "nope"}, "tenant_id"),
        ({"sunset_at": "next tuesday"}, "sunset_at"),
    ],
)
def test_bad_api_fields_are_named_in_a_400(change: dict[str, Any], field: str, alice: User, client_for: Any) -> None:
    r = client_for(alice).post("/mgmt/v1/apis/", {**BASE, **change}, format="json")
    assert r.status_code == 400, r.content
    assert r["Content-Type"] == "application/problem+json"
    assert field in r.json()["errors"], r.json()
    assert field in r.json()["detail"]
    assert not Api.objects.exists()


def test_missing_required_fields_are_all_listed(alice: User, client_for: Any) -> None:
    r = client_for(alice).post("/mgmt/v1/apis/", {"tenant_id": "acme"}, format="json")
    assert r.status_code == 400
    assert {"api_name", "base_path", "upstream_url"} <= set(r.json()["errors"])


def test_duplicate_base_path_is_a_400_not_a_500(alice: User, acme_api: Api, client_for: Any) -> None:
    r = client_for(alice).post("/mgmt/v1/apis/", {**BASE, "base_path": acme_api.base_path}, format="json")
    assert r.status_code == 400 and r.json()["errors"]


def test_policy_type_cannot_change(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    pol = c.post(
        "/mgmt/v1/policies/",
        {"tenant_id": "acme", "name": "q", "policy_type": "quota", "config": {"requests_per_day": 10}},
        format="json",
    ).json()
    r = c.patch(f"/mgmt/v1/policies/{pol['id']}/", {"policy_type": "rate_limiting"}, format="json")
    assert r.status_code == 400 and "policy_type" in r.json()["errors"]
    assert Policy.objects.get(pk=pol["id"]).policy_type == "quota"


def test_non_json_body_and_malformed_json_are_rejected(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post("/mgmt/v1/consumers/", "tenant_id=acme&name=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and r["Content-Type"] == "application/problem+json"
    r = c.post("/mgmt/v1/consumers/", '{"tenant_id": "acme",', content_type="application/json")
    assert r.status_code == 400 and r["Content-Type"] == "application/problem+json"
    r = c.post("/mgmt/v1/consumers/", "[1, 2]", content_type="application/json")
    assert r.status_code == 400


def test_unknown_ids_in_paths_and_odd_characters_are_404(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    assert c.get("/mgmt/v1/apis/api_nothere/").status_code == 404
    assert c.get("/mgmt/v1/apis/%00/").status_code == 404
    assert c.get("/mgmt/v1/apis/?tenant_id=%00").status_code == 400


def test_wrong_method_is_405_problem(alice: User, client_for: Any) -> None:
    r = client_for(alice).delete("/mgmt/v1/keys/key_x/")
    assert r.status_code == 405 and r["Content-Type"] == "application/problem+json"


def test_service_errors_keep_their_field_names(bob: User, client_for: Any, bob_app: Any) -> None:
    c = client_for(bob)
    r = c.post("/mgmt/v1/keys/", {"consumer_id": bob_app.pk, "expires_at": "2001-01-01T00:00:00Z"}, format="json")
    assert r.status_code == 400 and r.json()["errors"]["expires_at"] == ["expires_at must be in the future."]


def test_a_patched_target_without_url_is_a_400_naming_it_not_a_500(alice: User, acme_api: Api, client_for: Any) -> None:
    """A PATCH replaces the whole target list, so every target needs its url even though the PATCH is partial."""
    r = client_for(alice).patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"targets": [{"weight": 1}]}, format="json")
    assert r.status_code == 400, r.content
    assert r["Content-Type"] == "application/problem+json"
    assert r.json()["errors"] == {"targets.0.url": ["This field is required."]}
    assert "targets.0.url" in r.json()["detail"]
    assert not acme_api.targets.exists()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/mgmt/v1/consumers/", {"tenant_id": "acme", "name": 0}),
        ("/mgmt/v1/keys/", {"consumer_id": 12345}),
        ("/mgmt/v1/subscriptions/", {"consumer_id": "con_x", "api_id": True}),
        ("/mgmt/v1/policies/", {"tenant_id": "acme", "name": 5, "policy_type": "quota", "config": {}}),
    ],
)
def test_numbers_and_booleans_are_not_taken_as_text(
    path: str, body: dict[str, Any], alice: User, client_for: Any
) -> None:
    """The schema says string: 0 is refused, not stored as "0" (schemathesis' negative data found these)."""
    r = client_for(alice).post(path, body, format="json")
    assert r.status_code == 400, r.content
    wrong = next(name for name, value in body.items() if not isinstance(value, (str, dict)))
    assert wrong in r.json()["errors"], r.json()


def test_null_openapi_spec_is_refused_with_a_hint(alice: User, acme_api: Api, client_for: Any) -> None:
    r = client_for(alice).patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"openapi_spec": None}, format="json")
    assert r.status_code == 400, r.content
    assert r.json()["errors"]["openapi_spec"] == ["Send {} for no OpenAPI document, not null."]
