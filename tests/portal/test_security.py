"""CSRF, Host validation, unknown tenants, and isolation between developers and between tenants."""

from __future__ import annotations

import re

from django.contrib.auth.models import User
from django.core import mail
from django.test import Client
from django.test.utils import override_settings

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Tenant


def test_a_post_without_a_csrf_token_is_refused(bob: User, bob_app: Consumer) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    assert client.post("/portal/acme/apps/new/", {"name": "sneaky"}).status_code == 403
    assert client.post(f"/portal/acme/apps/{bob_app.pk}/delete/").status_code == 403
    assert not Consumer.objects.filter(name="sneaky").exists()
    assert Consumer.objects.filter(pk=bob_app.pk).exists()
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.post("/portal/acme/login/", {"username": "bob", "password": "bob-password-123"}).status_code == 403


def test_a_post_with_the_csrf_token_goes_through(bob: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    client.get("/portal/acme/apps/new/")
    token = client.cookies["csrftoken"].value
    response = client.post("/portal/acme/apps/new/", {"name": "legit", "csrfmiddlewaretoken": token})
    assert response.status_code == 302


def test_a_foreign_host_header_is_refused(acme: Tenant) -> None:
    assert Client().get("/portal/acme/", HTTP_HOST="evil.example").status_code == 400


def test_unknown_and_suspended_tenants_are_not_found(acme: Tenant, bob: User) -> None:
    client = Client()
    client.force_login(bob)
    assert client.get("/portal/nope/").status_code == 404
    assert client.get("/portal/nope/login/").status_code == 404
    services.tenant_suspend(tenant=acme, actor=None)
    for path in ("/portal/acme/", "/portal/acme/login/", "/portal/acme/apps/"):
        assert client.get(path).status_code == 404


def test_a_developer_never_sees_another_developers_apps_or_keys(
    bob_app: Consumer, bob_key: tuple[ApiKey, str], dave: User
) -> None:
    key = bob_key[0]
    client = Client()
    client.force_login(dave)
    listing = client.get("/portal/acme/apps/")
    assert listing.status_code == 200 and b"bob-app" not in listing.content
    base = f"/portal/acme/apps/{bob_app.pk}"
    for path in (
        "/",
        "/edit/",
        "/usage/",
        "/keys/new/",
        f"/keys/{key.pk}/rotate/",
        f"/keys/{key.pk}/revoke/",
        "/delete/",
    ):
        assert client.get(base + path).status_code == 404, path
    for path in (f"/keys/{key.pk}/revoke/", "/delete/", "/keys/new/", "/edit/"):
        assert client.post(base + path, {"name": "mine now"}).status_code == 404, path
    key.refresh_from_db()
    assert key.active and Consumer.objects.get(pk=bob_app.pk).name == "bob-app"


def test_another_tenants_portal_shows_nothing_of_this_tenant(
    bob: User, bob_app: Consumer, acme_api: Api, globex: Tenant, carol: User
) -> None:
    services.api_create(
        tenant=globex,
        api_name="globex-orders",
        base_path="/globex/orders",
        upstream_url="https://o.example.com",
        status="active",
        actor=None,
    )
    client = Client()
    client.force_login(bob)
    catalog = client.get("/portal/globex/")
    assert b"globex-orders" in catalog.content and b"users" not in catalog.content
    assert client.get(f"/portal/globex/apis/{acme_api.pk}/").status_code == 404
    # Signed in, but not a member of globex: the apps pages ask for a globex account.
    response = client.get("/portal/globex/apps/")
    assert response.status_code == 302 and response["Location"].startswith("/portal/globex/login/")
    # Even as a member of both, acme's app is not reachable through globex's portal.
    services.membership_set(tenant=globex, user=bob, role="developer", actor=None)
    assert client.get(f"/portal/globex/apps/{bob_app.pk}/").status_code == 404
    assert b"bob-app" not in client.get("/portal/globex/apps/").content


def test_a_viewer_can_read_but_not_create_apps(vera: User) -> None:
    client = Client()
    client.force_login(vera)
    assert client.get("/portal/acme/apps/").status_code == 200
    response = client.post("/portal/acme/apps/new/", {"name": "nope"})
    assert response.status_code == 403
    assert b"read-only" in response.content
    assert not Consumer.objects.filter(name="nope").exists()


def test_the_catalog_lists_public_active_and_deprecated_apis_only(acme: Tenant) -> None:
    def api(name: str, status: str, visibility: str = "public") -> Api:
        return services.api_create(
            tenant=acme,
            api_name=name,
            base_path=f"/{name}",
            upstream_url="https://u.example.com",
            status=status,
            visibility=visibility,
            actor=None,
        )

    api("live", "active")
    old = api("old", "active")
    services.api_deprecate(api=old, actor=None)
    api("draft-one", "draft")
    api("hidden", "active", visibility="private")
    page = Client().get("/portal/acme/").content.decode()
    assert "live" in page and "old" in page and "Deprecated" in page
    assert "draft-one" not in page and "hidden" not in page


def test_an_empty_catalog_says_so(acme: Tenant) -> None:
    assert b"No APIs published yet" in Client().get("/portal/acme/").content


# A permissive ALLOWED_HOSTS lets any Host through to the views; the links in mails must still point at SITE_URL.
LINKS_FROM_SITE_URL = override_settings(ALLOWED_HOSTS=["*"], SITE_URL="https://portal.example.com/")
EVIL = {"HTTP_HOST": "evil.example"}


def _mailed_links() -> list[str]:
    assert mail.outbox, "no mail was sent"
    links = [link for message in mail.outbox for link in re.findall(r"https?://\S+", message.body)]
    assert links, "no link in the mails"
    assert not any("evil.example" in message.body for message in mail.outbox)
    return links


@LINKS_FROM_SITE_URL
def test_a_password_reset_link_points_at_site_url_whatever_the_host_header(bob: User) -> None:
    Client().post("/portal/acme/password-reset/", {"email": "bob@example.com"}, **EVIL)
    [link] = _mailed_links()
    assert link.startswith("https://portal.example.com/portal/acme/password-reset/")


@LINKS_FROM_SITE_URL
def test_verification_and_existing_account_links_point_at_site_url_whatever_the_host_header(
    open_acme: Tenant, bob: User
) -> None:
    form = {"password1": "a-long-pass-phrase-42", "password2": "a-long-pass-phrase-42"}
    Client().post("/portal/acme/signup/", {**form, "username": "erin", "email": "erin@example.com"}, **EVIL)
    Client().post("/portal/acme/signup/", {**form, "username": "bob2", "email": "bob@example.com"}, **EVIL)
    links = _mailed_links()
    assert len(links) == 3  # verify; then sign-in and reset for the existing member
    assert all(link.startswith("https://portal.example.com/portal/acme/") for link in links)
    assert any("/verify/" in link for link in links)


@LINKS_FROM_SITE_URL
def test_an_invitation_link_points_at_site_url_whatever_the_host_header(alice: User) -> None:
    admin = Client()
    admin.force_login(alice)
    assert admin.post("/portal/acme/invite/", {"email": "frank@example.com"}, **EVIL).status_code == 302
    [link] = _mailed_links()
    assert link.startswith("https://portal.example.com/portal/acme/signup/?invite=")
