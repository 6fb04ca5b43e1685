"""Two holes found after the policy chain's control plane landed: a rotation lifted a key's IP restriction, and an
issuer's iss could not be changed (a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.models import ApiKey, AuditEvent, Consumer, JwtIssuer
from tests.api.test_policy_types import ISSUER, V1

pytestmark = pytest.mark.django_db


def test_a_rotated_key_keeps_the_ip_lists_of_the_key_it_replaces(
    bob: User, bob_app: Consumer, bob_key: tuple[ApiKey, str], client_for: Any
) -> None:
    c = client_for(bob)
    key_path = f"{V1}/keys/{bob_key[0].pk}/"
    restricted = {"ip_allow": ["198.51.100.0/24"], "ip_deny": ["198.51.100.66/32"]}
    assert c.patch(key_path, restricted, format="json").status_code == 200
    rotated = c.post(f"{key_path}rotate/", {"overlap_seconds": 60}, format="json")
    assert rotated.status_code in (200, 201), rotated.content
    successor = ApiKey.objects.get(pk=rotated.json()["key_id"])
    assert (successor.ip_allow, successor.ip_deny) == (["198.51.100.0/24"], ["198.51.100.66/32"])
    audit = AuditEvent.objects.filter(action="api_key.create", object_id=successor.pk).get()
    assert audit.changes["ip_allow"] == ["198.51.100.0/24"]


def test_an_issuers_iss_can_be_changed_like_any_field(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    issuer_id = c.post(f"{V1}/jwt-issuers/", ISSUER, format="json").json()["id"]
    r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"issuer": "https://login.acme.example/"}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["issuer"] == "https://login.acme.example/"
    assert JwtIssuer.objects.get(pk=issuer_id).issuer == "https://login.acme.example/"
    r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"issuer": "not a url"}, format="json")
    assert r.status_code == 400 and "issuer" in r.json()["errors"]


def test_an_issuers_iss_or_claim_cannot_change_under_its_identities(
    alice: User, bob_app: Consumer, client_for: Any
) -> None:
    c = client_for(alice)
    issuer_id = c.post(f"{V1}/jwt-issuers/", ISSUER, format="json").json()["id"]
    created = c.post(
        f"{V1}/consumers/{bob_app.pk}/identities/", {"issuer_id": issuer_id, "external_id": "u-1"}, format="json"
    )
    assert created.status_code == 201, created.content
    for field, value in (("issuer", "https://other-idp.example/"), ("consumer_claim", "email")):
        r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {field: value}, format="json")
        assert r.status_code == 400, r.content
        assert "1 consumer identity" in r.json()["errors"][field][0]
    assert JwtIssuer.objects.get(pk=issuer_id).issuer == ISSUER["issuer"]
    # Other settings still change.
    assert c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"leeway_seconds": 5}, format="json").status_code == 200


def test_an_api_name_with_a_control_character_is_refused(alice: User, client_for: Any) -> None:
    r = client_for(alice).post(
        f"{V1}/apis/",
        {"tenant_id": "acme", "api_name": "bad\nname", "base_path": "/bad", "upstream_url": "https://x.example.com"},
        format="json",
    )
    assert r.status_code == 400 and "control characters" in r.json()["errors"]["api_name"][0]
