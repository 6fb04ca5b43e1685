"""Developers read only the public catalog of APIs through the management API."""

from __future__ import annotations

from django.contrib.auth.models import User
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
