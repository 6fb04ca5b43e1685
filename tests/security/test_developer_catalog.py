"""Developers read only the public catalog of APIs through the management API, and only its catalog fields:
never an upstream address, an extra target or how the gateway reads keys."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from apimgmt import services
from apimgmt.models import Api, Tenant


def test_developers_do_not_see_private_or_draft_apis(acme: Tenant, acme_api: Api, bob: User, alice: User) -> None:
    private = services.api_create(
        tenant=acme,
        api_name="internal",
        base_path="/internal",
        upstream_url="https://internal.example.com",
        status="active",
        visibility="private",
        actor=None,
    )
    draft = services.api_create(
        tenant=acme, api_name="next", base_path="/next", upstream_url="https://next.example.com", actor=None
    )
    client = APIClient()
    client.force_authenticate(bob)
    ids = {row["id"] for row in client.get("/mgmt/v1/apis/").json()["results"]}
    assert ids == {acme_api.pk}
    for hidden in (private, draft):
        assert client.get(f"/mgmt/v1/apis/{hidden.pk}/").status_code == 404
    client.force_authenticate(alice)
    ids = {row["id"] for row in client.get("/mgmt/v1/apis/").json()["results"]}
    assert ids == {acme_api.pk, private.pk, draft.pk}


CATALOG_FIELDS = {
    "id",
    "tenant_id",
    "api_name",
    "description",
    "base_path",
    "host",
    "status",
    "sunset_at",
    "subscription_approval",
    "auth_method",  # how to call it: a developer needs to know whether a key or a token is wanted
    "plans",
    "openapi_spec",
    "created_at",
    "updated_at",
}
INTERNALS = {
    "upstream_url",
    "targets",
    "key_header",
    "accept_bearer",
    "key_query_param",
    "connect_timeout",
    "read_timeout",
    "total_timeout",
    "retries",
    "cb_failure_threshold",
    "cb_recovery_timeout",
    "policies",
    "visibility",
}


@pytest.fixture
def wired_api(acme_api: Api) -> Api:
    """acme's public API with everything a developer must not learn: an extra upstream, a key query parameter."""
    return services.api_update(
        api=acme_api,
        targets=[("https://users-internal.example.com:8443", 3)],
        key_query_param="apikey",
        key_header="X-Acme-Key",
        actor=None,
    )


def test_a_portal_developer_reads_catalog_entries_without_upstreams_targets_or_key_settings(
    wired_api: Api, bob: User
) -> None:
    portal = Client()
    portal.force_login(bob)  # the portal's session, as a developer's browser holds it
    listed = portal.get("/mgmt/v1/apis/")
    assert listed.status_code == 200
    [entry] = listed.json()["results"]
    detail = portal.get(f"/mgmt/v1/apis/{wired_api.pk}/").json()
    for body in (entry, detail):
        assert set(body) == CATALOG_FIELDS
        text = json.dumps(body)
        assert "users.example.com" not in text and "users-internal" not in text
        assert "X-Acme-Key" not in text and "apikey" not in text
    assert detail["base_path"] == "/api/users/v1" and detail["openapi_spec"] == {}


@pytest.mark.parametrize("member", ["alice", "vera"])
def test_tenant_admins_and_viewers_still_see_the_whole_api(
    member: str, wired_api: Api, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue(member)
    client = APIClient()
    client.force_authenticate(user)
    body = client.get(f"/mgmt/v1/apis/{wired_api.pk}/").json()
    assert set(body) >= INTERNALS
    assert body["upstream_url"] == "https://users.example.com"
    assert body["targets"] == [{"url": "https://users-internal.example.com:8443", "weight": 3}]


def test_someone_admin_in_one_tenant_and_developer_in_another_sees_each_as_their_role_allows(
    wired_api: Api, globex: Tenant
) -> None:
    both = User.objects.create_user("dana", "dana@example.com", "dana-password-123")
    services.membership_set(tenant=globex, user=both, role="admin", actor=None)
    services.membership_set(tenant=wired_api.tenant, user=both, role="developer", actor=None)
    own = services.api_create(
        tenant=globex,
        api_name="ledger",
        base_path="/ledger",
        upstream_url="https://ledger.internal.example.com",
        status="active",
        actor=None,
    )
    client = APIClient()
    client.force_authenticate(both)
    rows = {row["id"]: row for row in client.get("/mgmt/v1/apis/").json()["results"]}
    assert set(rows) == {wired_api.pk, own.pk}
    assert set(rows[wired_api.pk]) == CATALOG_FIELDS
    assert rows[own.pk]["upstream_url"] == "https://ledger.internal.example.com"


def test_the_schema_documents_the_catalog_entry_as_closed(alice: User) -> None:
    client = APIClient()
    client.force_authenticate(alice)
    doc = client.get("/mgmt/schema/?format=json").json()
    catalog = doc["components"]["schemas"]["ApiCatalog"]
    assert set(catalog["properties"]) == CATALOG_FIELDS
    assert catalog["additionalProperties"] is False
    listed = doc["paths"]["/mgmt/v1/apis/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    page = doc["components"]["schemas"][listed["$ref"].rsplit("/", 1)[1]]
    item = doc["components"]["schemas"][page["properties"]["results"]["items"]["$ref"].rsplit("/", 1)[1]]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in item["oneOf"]} == {"Api", "ApiCatalog"}
    assert "developers get its catalog entry" in doc["paths"]["/mgmt/v1/apis/"]["get"]["description"]
