"""The API page says how to call the API: where the key or the token goes, the token issuers, and a curl line."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from django.test import Client

from apimgmt import services
from apimgmt.models import Api, JwtIssuer, Tenant

pytestmark = pytest.mark.django_db


def _issuer(tenant: Tenant, name: str, issuer: str, audiences: list[str], **options: Any) -> JwtIssuer:
    return services.jwt_issuer_create(
        tenant=tenant,
        name=name,
        issuer=issuer,
        audiences=audiences,
        jwks_url="https://id.example.com/.well-known/jwks.json",
        actor=None,
        **options,
    )


def _with_auth(api: Api, auth_method: str, issuers: list[JwtIssuer]) -> Api:
    return services.api_update(api=api, auth_method=auth_method, jwt_issuers=issuers, actor=None)


def _section(client: Client, api: Api) -> str:
    page = client.get(f"/portal/acme/apis/{api.pk}/")
    assert page.status_code == 200
    match = re.search(r'<section[^>]*data-testid="how-to-call".*?</section>', page.content.decode(), re.S)
    assert match, "no how-to-call section"
    return html.unescape(re.sub(r"<[^>]+>", " ", match.group(0)))


def _words(text: str) -> str:
    return " ".join(text.split())


def test_a_key_api_says_where_the_key_goes_and_gives_a_curl_line(bob_client: Client, acme_api: Api) -> None:
    text = _words(_section(bob_client, acme_api))
    assert "Your key goes in X-API-Key: <key>" in text
    assert 'curl -H "X-API-Key: $API_KEY" http://testserver/api/users/v1/' in text
    assert "Bearer <token>" not in text and "Issuer" not in text

    api = services.api_update(
        api=acme_api, key_header="X-Key", accept_bearer=True, key_query_param="apikey", actor=None
    )
    text = _words(_section(bob_client, api))
    assert "Your key goes in X-Key: <key> or Authorization: Bearer <key> or ?apikey=<key>" in text
    assert 'curl -H "X-Key: $API_KEY" http://testserver/api/users/v1/' in text


def test_a_jwt_api_names_its_issuers_and_their_audiences(bob_client: Client, acme: Tenant, acme_api: Api) -> None:
    corporate = _issuer(acme, "corporate", "https://id.example.com/", ["users-api", "https://api.example.com"])
    partners = _issuer(
        acme,
        "partners",
        "https://login.partner.example/",
        ["partner-api"],
        consumer_claim="azp",
        token_in_query="access_token",
    )
    _issuer(acme, "unlisted", "https://other.example.com/", ["x"])  # the tenant's, but this API does not take it
    api = _with_auth(acme_api, "jwt", [corporate, partners])

    text = _words(_section(bob_client, api))
    assert "Your token goes in Authorization: Bearer <token> Access" in text, "the Bearer header only"
    assert "key goes in" not in text and "X-API-Key" not in text
    assert (
        "corporate Issuer ( iss ) https://id.example.com/ Audience ( aud ) users-api or https://api.example.com" in text
    )
    assert "Your app is the token's sub claim" in text
    assert (
        "partners Issuer ( iss ) https://login.partner.example/ Audience ( aud ) partner-api "
        "Your app is the token's azp claim Also accepted in ?access_token=<token>"
    ) in text
    assert text.count("Also accepted in") == 1, "only with the issuer that allows the query parameter"
    assert "unlisted" not in text and "https://other.example.com/" not in text
    assert 'curl -H "Authorization: Bearer $TOKEN" http://testserver/api/users/v1/' in text


def test_a_key_or_jwt_api_shows_both_ways_in(bob_client: Client, acme: Tenant, acme_api: Api) -> None:
    api = _with_auth(acme_api, "key_or_jwt", [_issuer(acme, "corporate", "https://id.example.com/", ["users-api"])])
    text = _words(_section(bob_client, api))
    assert "An API key goes in X-API-Key: <key>" in text
    assert "Or a token, in Authorization: Bearer <token>" in text
    assert "https://id.example.com/" in text and "users-api" in text
    assert 'curl -H "X-API-Key: $API_KEY" http://testserver/api/users/v1/' in text
    assert 'curl -H "Authorization: Bearer $TOKEN" http://testserver/api/users/v1/' in text


def test_the_page_uses_developer_words(bob_client: Client, acme: Tenant, acme_api: Api) -> None:
    api = _with_auth(acme_api, "key_or_jwt", [_issuer(acme, "corporate", "https://id.example.com/", ["users-api"])])
    text = _section(bob_client, api).lower()
    assert "consumer" not in text and "tenant" not in text


def test_a_new_keys_curl_lines_leave_out_apis_that_take_only_tokens(
    bob_client: Client, acme: Tenant, acme_api: Api, bob_app: Any
) -> None:
    tokens_only = services.api_create(
        tenant=acme,
        api_name="ledger",
        base_path="/ledger",
        upstream_url="https://ledger.example.com",
        status="active",
        actor=None,
    )
    _with_auth(tokens_only, "jwt", [_issuer(acme, "corporate", "https://id.example.com/", ["ledger"])])
    for api in (acme_api, tokens_only):
        services.subscription_request(consumer=bob_app, api=api, actor=None)
    page = bob_client.post(f"/portal/acme/apps/{bob_app.pk}/keys/new/", {"name": "laptop"})
    assert page.status_code == 200
    text = page.content.decode()
    assert f"{acme_api.base_path}/" in text  # the key API's line
    assert "/ledger/" not in text  # a key does nothing there: no line that cannot work
