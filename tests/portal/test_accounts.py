"""Sign-up, verification, invitations, sign-in with lockout and session rotation, password reset."""

from __future__ import annotations

import importlib
import time

import pytest
from django.apps import apps as django_apps
from django.contrib.auth.models import User
from django.core import mail
from django.test import Client
from django.test.utils import override_settings

from apimgmt import services
from apimgmt.models import Tenant, TenantMembership
from tests.portal.conftest import link_in_last_mail, path_of

SIGNUP = {
    "username": "erin",
    "email": "Erin@Example.com",
    "password1": "a-long-pass-phrase-42",
    "password2": "a-long-pass-phrase-42",
}


def _login(client: Client, username: str, password: str, tenant: str = "acme", ip: str = "127.0.0.1") -> int:
    response = client.post(f"/portal/{tenant}/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)
    return response.status_code


def test_signup_sends_a_link_and_the_account_works_only_after_confirming(open_acme: Tenant) -> None:
    client = Client()
    response = client.post("/portal/acme/signup/", SIGNUP)
    assert response.status_code == 200
    assert b"Check your inbox" in response.content
    assert mail.outbox[-1].to == ["erin@example.com"]
    user = User.objects.get(username="erin")
    assert not user.is_active

    refused = client.post("/portal/acme/login/", {"username": "erin", "password": SIGNUP["password1"]})
    assert b"Confirm your e-mail address first" in refused.content

    link = path_of(link_in_last_mail())
    assert b"Confirm my e-mail address" in client.get(link).content
    assert client.post(link).status_code == 302
    user.refresh_from_db()
    assert user.is_active
    assert TenantMembership.objects.get(user=user, tenant=open_acme).role == "developer"
    assert _login(client, "erin", SIGNUP["password1"]) == 302


def test_a_verification_link_works_once_and_only_in_its_own_portal(open_acme: Tenant, globex: Tenant) -> None:
    client = Client()
    client.post("/portal/acme/signup/", SIGNUP)
    link = path_of(link_in_last_mail())
    assert client.post(link.replace("/portal/acme/", "/portal/globex/")).status_code == 400
    assert client.post(link).status_code == 302
    again = client.post(link)
    assert again.status_code == 400
    assert b"already been used" in again.content
    assert not TenantMembership.objects.filter(tenant=globex, user__username="erin").exists()


def test_signup_is_closed_when_the_tenant_is_invitation_only(acme: Tenant) -> None:
    response = Client().post("/portal/acme/signup/", SIGNUP)
    assert response.status_code == 403
    assert b"by invitation only" in response.content
    assert not User.objects.filter(username="erin").exists()


def test_a_tenant_admin_invites_a_developer_who_then_signs_up(alice: User, bob: User) -> None:
    admin = Client()
    admin.force_login(alice)
    assert admin.post("/portal/acme/invite/", {"email": "frank@example.com"}).status_code == 302
    link = path_of(link_in_last_mail())
    developer = Client()
    assert b"You were invited" in developer.get(link).content
    token = link.split("invite=")[1]
    response = developer.post(
        "/portal/acme/signup/",
        {
            "username": "frank",
            "email": "someone-else@example.com",
            "password1": "a-long-pass-phrase-42",
            "password2": "a-long-pass-phrase-42",
            "invite": token,
        },
    )
    assert response.status_code == 302
    frank = User.objects.get(username="frank")
    assert frank.is_active and frank.email == "frank@example.com"  # the invited address, not the posted one
    assert TenantMembership.objects.get(user=frank, tenant__id="acme").role == "developer"

    developer_client = Client()
    developer_client.force_login(bob)
    assert developer_client.post("/portal/acme/invite/", {"email": "x@example.com"}).status_code == 403


def test_sign_in_rotates_the_session_key(bob: User) -> None:
    client = Client()
    client.get("/portal/acme/login/")
    client.session.save()
    session = client.session
    session["planted"] = "by an attacker"
    session.save()
    before = session.session_key
    client.cookies["sessionid"] = before
    assert _login(client, "bob", "bob-password-123") == 302
    after = client.cookies["sessionid"].value
    assert after and after != before
    assert client.get("/portal/acme/apps/").status_code == 200


def test_a_member_of_another_tenant_cannot_sign_in_here(carol: User, acme: Tenant) -> None:
    client = Client()
    response = client.post("/portal/acme/login/", {"username": "carol", "password": "carol-password-123"})
    assert response.status_code == 403
    assert b"no access to the Acme portal" in response.content
    assert "_auth_user_id" not in client.session


@override_settings(PORTAL_LOGIN_ACCOUNT_FAILURES=3, PORTAL_LOGIN_IP_FAILURES=100)
def test_an_account_is_locked_after_repeated_failures_even_for_the_right_password(bob: User) -> None:
    client = Client()
    for _ in range(3):
        assert _login(client, "bob", "wrong") == 400
    response = client.post("/portal/acme/login/", {"username": "BOB", "password": "bob-password-123"})
    assert response.status_code == 429
    assert b"Too many failed sign-ins" in response.content
    assert int(response["Retry-After"]) > 0
    # Another address is locked out of this account too: the lock is per account.
    assert _login(Client(), "bob", "bob-password-123", ip="10.9.9.9") == 429


@override_settings(PORTAL_LOGIN_ACCOUNT_FAILURES=100, PORTAL_LOGIN_IP_FAILURES=4)
def test_an_address_guessing_many_accounts_is_locked_out(bob: User, dave: User) -> None:
    client = Client()
    for name in ("bob", "dave", "nobody", "alice"):
        _login(client, name, "wrong", ip="10.0.0.66")
    assert _login(client, "dave", "dave-password-123", ip="10.0.0.66") == 429
    assert _login(Client(), "dave", "dave-password-123", ip="10.0.0.67") == 302


@override_settings(PORTAL_LOGIN_ACCOUNT_FAILURES=2, PORTAL_LOGIN_LOCKOUT_SECONDS=1)
def test_the_lockout_ends_after_the_cool_off(bob: User) -> None:
    client = Client()
    _login(client, "bob", "wrong")
    _login(client, "bob", "wrong")
    assert _login(client, "bob", "bob-password-123") == 429
    time.sleep(1.2)
    assert _login(client, "bob", "bob-password-123") == 302


def test_password_reset_mails_only_members_and_sets_a_new_password(bob: User, carol: User) -> None:
    client = Client()
    response = client.post("/portal/acme/password-reset/", {"email": "carol@example.com"})
    assert response.status_code == 200 and not mail.outbox  # not a member of acme: same page, no mail
    client.post("/portal/acme/password-reset/", {"email": "bob@example.com"})
    link = path_of(link_in_last_mail())
    assert link.startswith("/portal/acme/password-reset/")
    form_page = client.get(link, follow=True)
    assert b"Choose a new password" in form_page.content
    set_url = form_page.redirect_chain[-1][0]
    done = client.post(set_url, {"new_password1": "brand-new-pass-77", "new_password2": "brand-new-pass-77"})
    assert done.status_code == 302 and done["Location"] == "/portal/acme/login/"
    assert _login(Client(), "bob", "brand-new-pass-77") == 302


@pytest.mark.parametrize("method", ["get", "post"])
def test_sign_out_needs_a_post(bob_client: Client, method: str) -> None:
    response = getattr(bob_client, method)("/portal/acme/logout/")
    assert response.status_code == (405 if method == "get" else 302)
    assert ("_auth_user_id" in bob_client.session) is (method == "get")


def _switch_off(user: User, tenant: Tenant) -> None:
    """What staff do to remove a developer: deactivate the account and delete its membership."""
    user.is_active = False
    user.save(update_fields=["is_active"])
    TenantMembership.objects.filter(user=user, tenant=tenant).delete()


@pytest.mark.parametrize("signed_in_before", [False, True])
def test_a_switched_off_developer_cannot_come_back_with_the_old_verification_link(
    open_acme: Tenant, signed_in_before: bool
) -> None:
    client = Client()
    client.post("/portal/acme/signup/", SIGNUP)
    link = path_of(link_in_last_mail())
    assert client.post(link).status_code == 302
    if signed_in_before:
        assert _login(client, "erin", SIGNUP["password1"]) == 302
    erin = User.objects.get(username="erin")
    _switch_off(erin, open_acme)

    replay = Client()
    assert b"already been used" in replay.get(link).content
    response = replay.post(link)
    assert response.status_code == 400
    assert b"already been used" in response.content
    erin.refresh_from_db()
    assert not erin.is_active
    assert not TenantMembership.objects.filter(user=erin).exists()
    assert _login(replay, "erin", SIGNUP["password1"]) == 400


def test_signing_up_again_after_being_switched_off_mails_no_new_verification_link(open_acme: Tenant) -> None:
    client = Client()
    client.post("/portal/acme/signup/", SIGNUP)
    assert client.post(path_of(link_in_last_mail())).status_code == 302
    erin = User.objects.get(username="erin")
    _switch_off(erin, open_acme)  # before erin ever signed in

    mail.outbox.clear()
    again = Client().post("/portal/acme/signup/", {**SIGNUP, "username": "erin2"})
    assert again.status_code == 200 and b"Check your inbox" in again.content  # the same page as ever
    assert len(mail.outbox) == 1
    assert "/verify/" not in mail.outbox[0].body
    assert "no access to the Acme portal" in mail.outbox[0].body
    erin.refresh_from_db()
    assert not erin.is_active and not User.objects.filter(username="erin2").exists()


def test_a_reset_link_mailed_before_the_account_was_switched_off_no_longer_works(bob: User, acme: Tenant) -> None:
    client = Client()
    client.post("/portal/acme/password-reset/", {"email": "bob@example.com"})
    link = path_of(link_in_last_mail())
    _switch_off(bob, acme)

    form_page = client.get(link, follow=True)
    assert b"invalid or was already used" in form_page.content
    assert b"Set the password" not in form_page.content
    set_url = form_page.redirect_chain[-1][0] if form_page.redirect_chain else link
    client.post(set_url, {"new_password1": "brand-new-pass-77", "new_password2": "brand-new-pass-77"})
    bob.refresh_from_db()
    assert bob.check_password("bob-password-123")


def test_a_reset_link_stops_working_in_a_portal_the_account_was_removed_from(bob: User, acme: Tenant) -> None:
    client = Client()
    client.post("/portal/acme/password-reset/", {"email": "bob@example.com"})
    link = path_of(link_in_last_mail())
    TenantMembership.objects.filter(user=bob, tenant=acme).delete()  # still active: a member elsewhere, say

    assert b"invalid or was already used" in client.get(link, follow=True).content


def test_an_invitation_is_withdrawn_when_its_admin_is_no_longer_an_admin(alice: User, acme: Tenant) -> None:
    admin = Client()
    admin.force_login(alice)
    assert admin.post("/portal/acme/invite/", {"email": "frank@example.com"}).status_code == 302
    link = path_of(link_in_last_mail())
    assert Client().get(link).status_code == 200

    services.membership_set(tenant=acme, user=alice, role=TenantMembership.Role.DEVELOPER, actor=None)
    response = Client().get(link)
    assert response.status_code == 400
    assert b"invitation was withdrawn" in response.content
    signup = Client().post(link, {**SIGNUP, "username": "frank"})
    assert signup.status_code == 400
    assert not User.objects.filter(username="frank").exists()


def test_a_used_invitation_cannot_bring_back_a_switched_off_account(alice: User, acme: Tenant) -> None:
    admin = Client()
    admin.force_login(alice)
    admin.post("/portal/acme/invite/", {"email": "frank@example.com"})
    link = path_of(link_in_last_mail())
    token = link.split("invite=")[1]
    form = {"password1": "a-long-pass-phrase-42", "password2": "a-long-pass-phrase-42", "invite": token}
    assert Client().post("/portal/acme/signup/", {**form, "username": "frank"}).status_code == 302
    frank = User.objects.get(username="frank")
    _switch_off(frank, acme)

    again = Client().post("/portal/acme/signup/", {**form, "username": "frank2"})
    assert again.status_code in (200, 400)  # the form again (400 once invalid sign-ups answer 400), no account
    assert b"An account with this e-mail already exists" in again.content
    frank.refresh_from_db()
    assert not frank.is_active and not TenantMembership.objects.filter(user=frank).exists()
    assert not User.objects.filter(username="frank2").exists()


def test_accounts_confirmed_before_this_release_cannot_earn_a_new_verification_link(open_acme: Tenant) -> None:
    migration = importlib.import_module("portal.migrations.0001_mark_confirmed_accounts")
    lena = User.objects.create_user("lena", "lena@example.com", "a-long-pass-phrase-42")  # confirmed, never signed in
    services.membership_set(tenant=open_acme, user=lena, role=TenantMembership.Role.DEVELOPER, actor=None)
    Client().post("/portal/acme/signup/", SIGNUP)  # erin: signed up, not confirmed
    migration.mark_confirmed_accounts(django_apps, None)
    lena.refresh_from_db()
    assert lena.last_login == lena.date_joined
    assert User.objects.get(username="erin").last_login is None

    _switch_off(lena, open_acme)
    mail.outbox.clear()
    for email in ("lena@example.com", SIGNUP["email"]):
        Client().post("/portal/acme/signup/", {**SIGNUP, "username": "someone-new", "email": email})
    lena_mail, erin_mail = mail.outbox
    assert "/verify/" not in lena_mail.body and "no access to the Acme portal" in lena_mail.body
    assert "/verify/" in erin_mail.body  # a pending sign-up still gets its link again
