"""What developers read: "app", never "consumer" or "tenant"; a new key that wraps, with a curl line to copy; a
rotated key that says which one it replaces; the portal's own 404; an invalid sign-up answered with 400."""

from __future__ import annotations

import re
from html import escape

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Tenant

pytestmark = pytest.mark.django_db

STAFF_WORDS = re.compile(r"\b(consumers?|tenants?)\b", re.IGNORECASE)


def visible_text(html: str) -> str:
    """The words a reader sees: no scripts, styles, tags or attribute values."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture
def subscribed(bob: User, bob_app: Consumer, acme_api: Api) -> Consumer:
    services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    return bob_app


def test_a_new_key_wraps_and_comes_with_a_curl_line_and_its_own_copy_button(
    bob_client: Client, subscribed: Consumer
) -> None:
    response = bob_client.post(f"/portal/acme/apps/{subscribed.pk}/keys/new/", {"name": "ci", "expires_in_days": ""})
    html = response.content.decode()
    key = re.search(r'<textarea id="new-key"[^>]*data-testid="new-key">(ak_live_\w+)</textarea>', html)
    assert key, "the key is in a textarea, which wraps instead of cutting the key off"
    curl = f'curl -H "X-API-Key: {key.group(1)}" http://testserver/api/users/v1/'
    assert f'data-testid="curl-line">{escape(curl)}</textarea>' in html
    assert re.search(r'<button[^>]*data-copy-target="curl-1"[^>]*>Copy</button>', html)
    assert re.search(r'<button[^>]*data-copy-target="new-key"[^>]*>Copy</button>', html)
    assert response["Cache-Control"].startswith("max-age=0") or "no-store" in response["Cache-Control"]


def test_an_app_without_subscriptions_is_told_to_subscribe_instead_of_a_curl_line(
    bob_client: Client, bob_app: Consumer
) -> None:
    html = bob_client.post(f"/portal/acme/apps/{bob_app.pk}/keys/new/", {"name": "", "expires_in_days": ""})
    assert b"curl-line" not in html.content
    assert b"Subscribe bob-app to an API to call it with this key." in html.content


def test_a_rotated_key_says_which_key_it_replaces(bob_client: Client, subscribed: Consumer) -> None:
    old, _plaintext = services.api_key_create(consumer=subscribed, name="ci", actor=None)
    page = bob_client.post(f"/portal/acme/apps/{subscribed.pk}/keys/{old.pk}/rotate/", {"overlap_seconds": "3600"})
    html = page.content.decode()
    assert f'data-testid="replaces">replaces {old.key_prefix}…</span>' in html
    assert 'data-testid="curl-line"' in html
    app_page = bob_client.get(f"/portal/acme/apps/{subscribed.pk}/").content.decode()
    assert f"replaces <code>{old.key_prefix}…</code>" in app_page
    assert ApiKey.objects.get(rotated_from=old).key_prefix in app_page


def test_the_portal_has_its_own_404_page(bob_client: Client, dave: User, bob_app: Consumer) -> None:
    for client, path in (
        (Client(), "/portal/acme/no-such-page/"),
        (bob_client, "/portal/acme/apps/con_nope/"),
        (bob_client, "/portal/acme/apis/api_nope/"),
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        text = visible_text(response.content.decode())
        assert "Page not found" in text and "Acme developers" in text and "Browse the APIs" in text
    # Another developer's app is "not found" in the same words.
    dave_client = Client()
    dave_client.force_login(dave)
    response = dave_client.get(f"/portal/acme/apps/{bob_app.pk}/")
    assert response.status_code == 404 and b"Page not found" in response.content
    # A missing trailing slash still leads to the page, not to the 404.
    assert bob_client.get("/portal/acme/apps").status_code == 301
    # An unknown portal has no brand to show.
    assert Client().get("/portal/nope/").status_code == 404


def test_an_invalid_sign_up_answers_400(open_acme: Tenant) -> None:
    response = Client().post(
        "/portal/acme/signup/",
        {"username": "erin", "email": "not-an-address", "password1": "x", "password2": "y"},
    )
    assert response.status_code == 400
    assert b"Enter a valid email address" in response.content
    assert Client().get("/portal/acme/signup/").status_code == 200


def test_developer_pages_say_app_never_consumer_or_tenant(
    bob_client: Client, bob: User, vera: User, subscribed: Consumer, acme_api: Api, open_acme: Tenant
) -> None:
    key, _plaintext = services.api_key_create(consumer=subscribed, name="ci", actor=None)
    app = f"/portal/acme/apps/{subscribed.pk}"
    pages = {
        "catalog": bob_client.get("/portal/acme/"),
        "api": bob_client.get(f"/portal/acme/apis/{acme_api.pk}/"),
        "apps": bob_client.get("/portal/acme/apps/"),
        "app": bob_client.get(f"{app}/"),
        "new app": bob_client.get("/portal/acme/apps/new/"),
        "taken app name": bob_client.post("/portal/acme/apps/new/", {"name": "bob-app"}),
        "key form": bob_client.get(f"{app}/keys/new/"),
        "rotate": bob_client.get(f"{app}/keys/{key.pk}/rotate/"),
        "revoke": bob_client.get(f"{app}/keys/{key.pk}/revoke/"),
        "usage": bob_client.get(f"{app}/usage/"),
        "subscribed twice": bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": subscribed.pk}),
        "404": bob_client.get("/portal/acme/nope/"),
        "sign-in": Client().get("/portal/acme/login/"),
        "sign-up": Client().get("/portal/acme/signup/"),
    }
    viewer = Client()
    viewer.force_login(vera)
    pages["read-only"] = viewer.get("/portal/acme/apps/new/")
    services.consumer_block(consumer=subscribed, actor=None)
    pages["blocked app"] = bob_client.post(f"{app}/keys/new/", {"name": "x", "expires_in_days": ""})
    for name, response in pages.items():
        text = visible_text(response.content.decode())
        assert not STAFF_WORDS.findall(text), (name, STAFF_WORDS.findall(text), text[:3000])
    assert "You already have an app with this name." in visible_text(pages["taken app name"].content.decode())
    assert "This app already has a pending or active subscription" in visible_text(
        pages["subscribed twice"].content.decode()
    )
    assert "This app is blocked" in visible_text(pages["blocked app"].content.decode())
