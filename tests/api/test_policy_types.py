"""The management API and the policy chain's control plane: every policy type round-trips, a bad field is a 400 that
names it, attachment rules answer 400, JWT issuers and consumer identities stay inside their tenant, IP lists are
CIDRs, and the schema documents one config component per type discriminated by policy_type."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, ConsumerIdentity, JwtIssuer, Tenant
from tests.apimgmt.test_policy_validation import RSA_JWK, VALID

pytestmark = pytest.mark.django_db

V1 = "/mgmt/v1"


def _create_policy(c: Any, name: str, policy_type: str, config: Any) -> Any:
    return c.post(
        f"{V1}/policies/",
        {"tenant_id": "acme", "name": name, "policy_type": policy_type, "config": config},
        format="json",
    )


@pytest.mark.parametrize("policy_type", sorted(VALID))
def test_every_policy_type_round_trips_through_the_api(alice: User, client_for: Any, policy_type: str) -> None:
    c = client_for(alice)
    given, normalised = VALID[policy_type]
    created = _create_policy(c, "p", policy_type, given)
    assert created.status_code == 201, created.json()
    assert created.json()["config"] == normalised and created.json()["policy_type"] == policy_type
    policy_id = created.json()["id"]
    assert c.get(f"{V1}/policies/{policy_id}/").json()["config"] == normalised
    # Sending back what was read changes nothing (PUT of the answer).
    body = {k: v for k, v in created.json().items() if k not in ("id", "created_at", "updated_at")}
    assert c.put(f"{V1}/policies/{policy_id}/", body, format="json").json()["config"] == normalised
    listed = c.get(f"{V1}/policies/?policy_type={policy_type}").json()["results"]
    assert [p["id"] for p in listed] == [policy_id]


@pytest.mark.parametrize(
    ("policy_type", "config", "words"),
    [
        ("cors", {"allow_origins": ["*"], "allow_credentials": True}, "allow_credentials cannot be true"),
        ("cors", {"allow_origins": ["https://a.example.com"], "max_ag": 5}, "max_ag (did you mean `max_age`?)"),
        ("ip_rules", {"allow": ["10.0.0.1/8"]}, "allow[0]: '10.0.0.1/8' has host bits set; the network is 10.0.0.0/8"),
        ("headers", {"request": {"set": {"X-A": "x\r\nSet-Cookie: a=b"}}}, "request.set.X-A contains a line break"),
        ("headers", {"request": {"set": {"Keep-Alive": "1"}}}, "'Keep-Alive' is a hop-by-hop header"),
        ("headers", {"request": {"set": {"Host": "internal"}}}, "'Host' names the upstream"),
        ("headers", {"response": {"set": {"X-A": "{secret}"}}}, "response.set.X-A uses the unknown template {secret}"),
        ("request_limits", {"max_headers": 0}, "max_headers must be an integer from 1 to 1000"),
        ("response_cache", {"ttl_seconds": 90_000}, "ttl_seconds must be an integer from 1 to 86400"),
    ],
)
def test_a_bad_config_field_is_a_400_naming_it(
    alice: User, client_for: Any, policy_type: str, config: dict[str, Any], words: str
) -> None:
    r = _create_policy(client_for(alice), "bad", policy_type, config)
    assert r.status_code == 400 and r["Content-Type"] == "application/problem+json"
    assert words in r.json()["errors"]["config"][0], r.json()


def test_a_plan_refuses_cors_and_an_api_a_second_cors_policy_naming_it(
    alice: User, acme_api: Api, acme_plan: Any, client_for: Any
) -> None:
    c = client_for(alice)
    cors = [_create_policy(c, name, "cors", VALID["cors"][0]).json()["id"] for name in ("web", "web-2")]
    r = c.patch(f"{V1}/plans/{acme_plan.pk}/", {"policies": [cors[0]]}, format="json")
    assert r.status_code == 400
    assert "Policy 'web' is a cors policy" in r.json()["errors"]["policies"][0]
    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"policies": cors}, format="json")
    assert r.status_code == 400
    assert "Policy 'web-2' is a second cors policy on this API" in r.json()["errors"]["policies"][0]
    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"policies": cors[:1]}, format="json")
    assert r.status_code == 200 and r.json()["policies"] == cors[:1]


# ---------------------------------------------------------------------------
# JWT issuers and identities
# ---------------------------------------------------------------------------

ISSUER = {
    "tenant_id": "acme",
    "name": "acme-idp",
    "issuer": "https://id.acme.example/",
    "audiences": ["orders"],
    "public_keys": {"keys": [RSA_JWK]},
    "algorithms": ["RS256"],
}


def test_an_issuer_is_created_read_updated_and_used_by_an_api(alice: User, acme_api: Api, client_for: Any) -> None:
    c = client_for(alice)
    created = c.post(f"{V1}/jwt-issuers/", ISSUER, format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["id"].startswith("jwi_") and body["leeway_seconds"] == 30 and body["consumer_claim"] == "sub"
    assert body["jwks_url"] == "" and body["auto_provision"] is False and body["token_in_query"] == ""
    issuer_id = body["id"]

    r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"algorithms": ["HS256"]}, format="json")
    assert r.status_code == 400 and "cannot include 'HS256'" in r.json()["errors"]["algorithms"][0]
    r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"leeway_seconds": 301}, format="json")
    assert r.status_code == 400 and "leeway_seconds" in r.json()["errors"]
    r = c.patch(f"{V1}/jwt-issuers/{issuer_id}/", {"leeway_seconds": 60, "consumer_claim": "azp"}, format="json")
    assert r.status_code == 200 and r.json()["leeway_seconds"] == 60 and r.json()["consumer_claim"] == "azp"

    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"auth_method": "jwt"}, format="json")
    assert r.status_code == 400 and "needs at least one JWT issuer" in r.json()["errors"]["jwt_issuers"][0]
    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"auth_method": "jwt", "jwt_issuers": [issuer_id]}, format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["auth_method"] == "jwt" and r.json()["jwt_issuers"] == [issuer_id]
    assert r.json()["validation"] == "off"

    r = c.delete(f"{V1}/jwt-issuers/{issuer_id}/")
    assert r.status_code == 409 and "accepted by 1 API (users)" in r.json()["detail"]
    c.patch(f"{V1}/apis/{acme_api.pk}/", {"auth_method": "key", "jwt_issuers": []}, format="json")
    assert c.delete(f"{V1}/jwt-issuers/{issuer_id}/").status_code == 204
    assert not JwtIssuer.objects.filter(pk=issuer_id).exists()


def test_issuers_stay_inside_their_tenant(
    alice: User, carol: User, bob: User, acme_api: Api, globex: Tenant, client_for: Any
) -> None:
    theirs = services.jwt_issuer_create(
        tenant=globex, name="globex-idp", issuer="https://id.globex.example/", audiences=["g"],
        public_keys={"keys": [RSA_JWK]}, actor=None,
    )  # fmt: skip
    c = client_for(alice)
    assert c.get(f"{V1}/jwt-issuers/{theirs.pk}/").status_code == 404
    assert c.patch(f"{V1}/jwt-issuers/{theirs.pk}/", {"leeway_seconds": 1}, format="json").status_code == 404
    assert c.delete(f"{V1}/jwt-issuers/{theirs.pk}/").status_code == 404
    assert c.get(f"{V1}/jwt-issuers/").json()["count"] == 0
    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"jwt_issuers": [theirs.pk]}, format="json")
    assert r.status_code == 400 and theirs.pk in r.json()["errors"]["jwt_issuers"][0]
    r = c.post(f"{V1}/jwt-issuers/", {**ISSUER, "tenant_id": "globex"}, format="json")
    assert r.status_code == 400 and "tenant_id" in r.json()["errors"]
    # A developer reads the tenant's issuers (to get a token) but cannot create one.
    mine = c.post(f"{V1}/jwt-issuers/", ISSUER, format="json").json()
    assert client_for(bob).get(f"{V1}/jwt-issuers/{mine['id']}/").status_code == 200
    assert client_for(bob).post(f"{V1}/jwt-issuers/", {**ISSUER, "name": "b"}, format="json").status_code == 403
    assert client_for(carol).get(f"{V1}/jwt-issuers/{mine['id']}/").status_code == 404


def test_identities_are_managed_by_tenant_admins_and_read_by_the_owner(
    alice: User, bob: User, carol: User, acme: Tenant, bob_app: Consumer, client_for: Any
) -> None:
    issuer = services.jwt_issuer_create(
        tenant=acme, name="idp", issuer="https://id.acme.example/", audiences=["orders"],
        public_keys={"keys": [RSA_JWK]}, actor=None,
    )  # fmt: skip
    path = f"{V1}/consumers/{bob_app.pk}/identities/"
    admin, developer = client_for(alice), client_for(bob)
    body = {"issuer_id": issuer.pk, "external_id": "user-42"}
    assert developer.post(path, body, format="json").status_code == 403
    created = admin.post(path, body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["consumer_id"] == bob_app.pk and created.json()["external_id"] == "user-42"
    again = admin.post(path, body, format="json")
    assert again.status_code == 400 and "already has external ID 'user-42'" in again.json()["errors"]["external_id"][0]
    unknown = admin.post(path, {"issuer_id": "jwi_nope", "external_id": "x"}, format="json")
    assert unknown.status_code == 400 and "issuer_id" in unknown.json()["errors"]
    assert [i["external_id"] for i in developer.get(path).json()] == ["user-42"]
    assert client_for(carol).get(path).status_code == 404
    identity_id = created.json()["id"]
    assert client_for(carol).delete(f"{path}{identity_id}/").status_code == 404
    assert developer.delete(f"{path}{identity_id}/").status_code == 403
    assert admin.delete(f"{path}{identity_id}/").status_code == 204
    assert not ConsumerIdentity.objects.exists()


# ---------------------------------------------------------------------------
# IP lists
# ---------------------------------------------------------------------------


def test_consumers_and_keys_take_ip_lists_of_cidrs(
    bob: User, bob_app: Consumer, bob_key: tuple[ApiKey, str], client_for: Any
) -> None:
    c = client_for(bob)  # the owner manages their app's and keys' lists
    r = c.patch(f"{V1}/consumers/{bob_app.pk}/", {"ip_allow": ["203.0.113.9/24"]}, format="json")
    assert r.status_code == 400
    assert (
        "ip_allow[0]: '203.0.113.9/24' has host bits set; the network is 203.0.113.0/24"
        in (r.json()["errors"]["ip_allow"][0])
    )
    r = c.patch(f"{V1}/consumers/{bob_app.pk}/", {"ip_allow": ["203.0.113.0/24", "2001:db8::/32"]}, format="json")
    assert r.status_code == 200 and r.json()["ip_allow"] == ["203.0.113.0/24", "2001:db8::/32"]

    key_path = f"{V1}/keys/{bob_key[0].pk}/"
    r = c.patch(key_path, {"ip_deny": ["203.0.113.66"]}, format="json")
    assert r.status_code == 200 and r.json()["ip_deny"] == ["203.0.113.66/32"] and r.json()["ip_allow"] == []
    r = c.patch(key_path, {"ip_deny": "203.0.113.66"}, format="json")
    assert r.status_code == 400 and "ip_deny" in r.json()["errors"]
    created = c.post(f"{V1}/keys/", {"consumer_id": bob_app.pk, "ip_allow": ["198.51.100.0/24"]}, format="json")
    assert created.status_code == 201 and created.json()["ip_allow"] == ["198.51.100.0/24"]
    assert c.post(f"{key_path}revoke/").status_code == 200
    r = c.patch(key_path, {"ip_deny": []}, format="json")
    assert r.status_code == 400 and "revoked" in r.json()["errors"]["key_id"][0]


# ---------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------


def test_the_schema_has_one_component_per_policy_type_discriminated_by_policy_type(client: Any) -> None:
    doc = client.get("/mgmt/schema/?format=json").json()
    components = doc["components"]["schemas"]
    types = ["rate_limiting", "quota", "cors", "ip_rules", "headers", "request_limits", "response_cache"]
    for name in ("Policy", "PolicyRequest"):
        union = components[name]
        assert union["discriminator"]["propertyName"] == "policy_type"
        mapping = union["discriminator"]["mapping"]
        assert sorted(mapping) == sorted(types)
        assert sorted(ref["$ref"] for ref in union["oneOf"]) == sorted(mapping.values())
    for policy_type in types:
        camel = "".join(part.title() for part in policy_type.split("_"))
        variant = components[f"{camel}Policy"]
        assert variant["properties"]["config"] == {"$ref": f"#/components/schemas/{camel}Config"}
        assert "policy_type" in variant["required"]
        assert components[f"{camel}PolicyRequest"]["additionalProperties"] is False
        assert components[f"{camel}ConfigRequest"]["additionalProperties"] is False
    cors = components["CorsConfig"]["properties"]
    assert {"allow_origins", "allow_methods", "allow_headers", "expose_headers", "allow_credentials", "max_age"} == set(
        cors
    )
    create = doc["paths"]["/mgmt/v1/policies/"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PolicyRequest"
    }
    assert "/mgmt/v1/jwt-issuers/{id}/" in doc["paths"]
    assert "/mgmt/v1/consumers/{id}/identities/" in doc["paths"]
    assert {"auth_method", "jwt_issuers", "validation"} <= set(components["Api"]["properties"])
    assert {"ip_allow", "ip_deny"} <= set(components["Consumer"]["properties"])
    assert {"ip_allow", "ip_deny"} <= set(components["ApiKey"]["properties"])


def test_a_developer_sees_how_an_api_authenticates_in_the_catalog(bob: User, acme_api: Api, client_for: Any) -> None:
    entry = client_for(bob).get(f"{V1}/apis/{acme_api.pk}/").json()
    assert entry["auth_method"] == "key" and "jwt_issuers" not in entry and "upstream_url" not in entry


def test_an_api_created_with_jwt_names_its_issuers(alice: User, acme: Tenant, client_for: Any) -> None:
    c = client_for(alice)
    issuer = c.post(f"{V1}/jwt-issuers/", ISSUER, format="json").json()["id"]
    body = {
        "tenant_id": "acme",
        "api_name": "orders",
        "base_path": "/orders",
        "upstream_url": "https://orders.example.com",
        "auth_method": "key_or_jwt",
        "jwt_issuers": [issuer],
    }
    r = c.post(f"{V1}/apis/", body, format="json")
    assert r.status_code == 201, r.json()
    assert r.json()["auth_method"] == "key_or_jwt" and r.json()["jwt_issuers"] == [issuer]
    api = Api.objects.get(pk=r.json()["id"])
    assert [i.pk for i in api.jwt_issuers.all()] == [issuer]
    r = c.post(f"{V1}/apis/", {**body, "base_path": "/o2", "api_name": "o2", "validation": "enforce"}, format="json")
    assert r.status_code == 400 and "needs an OpenAPI document" in r.json()["errors"]["validation"][0]
