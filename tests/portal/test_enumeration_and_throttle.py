"""Sign-up and password reset never tell a visitor whether an address has an account; the mails they send are throttled."""

from __future__ import annotations

import difflib
import logging
import re
import time
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.core import mail
from django.test import Client
from django.test.utils import override_settings

from apimgmt.models import Tenant, TenantMembership
from portal.mail_throttle import address_digest
from tests.portal.conftest import link_in_last_mail, path_of

PASSWORD = "a-long-pass-phrase-42"


def _signup(email: str, username: str = "newcomer", ip: str = "127.0.0.1", **fields: str) -> Any:
    data = {"username": username, "email": email, "password1": PASSWORD, "password2": PASSWORD, **fields}
    return Client().post("/portal/acme/signup/", data, REMOTE_ADDR=ip)


def _reset(email: str, ip: str = "127.0.0.1", **extra: str) -> Any:
    return Client().post("/portal/acme/password-reset/", {"email": email}, REMOTE_ADDR=ip, **extra)


def _page(response: Any, email: str) -> tuple[int, list[str], str]:
    """What a visitor can tell a response by: status, templates and the page, with the typed address blanked."""
    content = response.content.decode().replace(email, "<address>")
    content = re.sub(r'name="csrfmiddlewaretoken" value="[^"]+"', 'name="csrfmiddlewaretoken"', content)  # new per page
    pages = [t.name for t in response.templates if not t.name.startswith("portal/email/")]  # mails are not the page
    return response.status_code, pages, content


def assert_same_page(*answers: tuple[Any, str]) -> None:
    """Every (response, address typed) pair looks the same to the visitor."""
    first, *others = [_page(response, email) for response, email in answers]
    for other in others:
        diff = "\n".join(difflib.unified_diff(first[2].splitlines(), other[2].splitlines(), lineterm="", n=1))
        assert other[:2] == first[:2] and not diff, diff or f"{first[:2]} != {other[:2]}"


def _users() -> list[tuple[str, str, bool, str]]:
    return list(User.objects.order_by("pk").values_list("username", "email", "is_active", "password"))


# ---------------------------------------------------------------------------
# Sign-up: no account enumeration
# ---------------------------------------------------------------------------


def test_signing_up_with_a_registered_address_looks_exactly_like_a_new_sign_up(open_acme: Tenant, bob: User) -> None:
    new = _signup("erin@example.com", username="erin")
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["erin@example.com"]
    before = _users()
    memberships = list(TenantMembership.objects.values_list("user_id", "tenant_id", "role"))

    taken = _signup("Bob@Example.com", username="bobby")

    assert_same_page((new, "erin@example.com"), (taken, "bob@example.com"))
    assert taken.status_code == 200 and b"Check your inbox" in taken.content
    # Nothing created, nothing about bob changed; bob's old password still signs him in.
    assert _users() == before
    assert list(TenantMembership.objects.values_list("user_id", "tenant_id", "role")) == memberships
    client = Client()
    assert client.post("/portal/acme/login/", {"username": "bob", "password": "bob-password-123"}).status_code == 302


def test_the_owner_of_a_registered_address_is_told_of_the_attempt_with_sign_in_and_reset_links(
    open_acme: Tenant, bob: User
) -> None:
    _signup("bob@example.com", username="bobby")

    assert len(mail.outbox) == 1
    notice = mail.outbox[0]
    assert notice.to == ["bob@example.com"]
    assert notice.subject == "Someone tried to sign up for the Acme developer portal with your e-mail"
    assert "bob" in notice.body and "nothing about your account changed" in notice.body
    links = [path_of(link) for link in notice.body.split() if link.startswith("http")]
    assert links == ["/portal/acme/login/", "/portal/acme/password-reset/"]
    assert "verify" not in notice.body
    # The reset link leads to the real thing.
    Client().post(links[1], {"email": "bob@example.com"})
    assert path_of(link_in_last_mail()).startswith("/portal/acme/password-reset/")


def test_signing_up_again_before_confirming_resends_the_link_and_keeps_the_first_choices(open_acme: Tenant) -> None:
    first = _signup("erin@example.com", username="erin")
    again = _signup(
        "erin@example.com", username="erin-again", password1="other-pass-phrase-77", password2="other-pass-phrase-77"
    )

    assert_same_page((first, "erin@example.com"), (again, "erin@example.com"))
    assert [m.to for m in mail.outbox] == [["erin@example.com"], ["erin@example.com"]]
    assert mail.outbox[1].subject == mail.outbox[0].subject  # the verification mail again
    assert list(User.objects.values_list("username", flat=True)) == ["erin"]

    client = Client()
    assert client.post(path_of(link_in_last_mail())).status_code == 302
    assert client.post("/portal/acme/login/", {"username": "erin", "password": PASSWORD}).status_code == 302


def test_an_address_registered_in_another_portal_gets_a_notice_and_no_second_account(
    open_acme: Tenant, carol: User
) -> None:
    new = _signup("erin@example.com", username="erin")
    taken = _signup("carol@example.com", username="carol2")

    assert_same_page((new, "erin@example.com"), (taken, "carol@example.com"))
    notice = mail.outbox[-1]
    assert notice.to == ["carol@example.com"]
    assert "no access to the Acme portal" in notice.body and "http" not in notice.body
    assert not User.objects.filter(username="carol2").exists()
    assert not TenantMembership.objects.filter(user=carol, tenant=open_acme).exists()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"password2": "not-the-same-42"}, b"The two password fields didn"),
        ({"password1": "12345678", "password2": "12345678"}, b"This password is too common"),
        ({"email": "not-an-address"}, b"Enter a valid email address"),
    ],
)
def test_form_errors_are_the_same_for_registered_and_new_addresses(
    open_acme: Tenant, bob: User, fields: dict[str, str], error: bytes
) -> None:
    new = _signup(**{"email": "erin@example.com", "username": "erin", **fields})
    taken = _signup(**{"email": "bob@example.com", "username": "erin", **fields})

    assert new.status_code == taken.status_code == 400  # an invalid sign-up is a 400, whoever's the address
    assert error in new.content and error in taken.content
    assert b"already exists" not in taken.content
    assert not mail.outbox
    assert not User.objects.filter(username="erin").exists()


def test_an_invited_sign_up_with_a_registered_address_still_says_so(alice: User, bob: User) -> None:
    admin = Client()
    admin.force_login(alice)
    admin.post("/portal/acme/invite/", {"email": "bob@example.com"})
    token = link_in_last_mail().split("invite=")[1]
    mail.outbox.clear()

    response = _signup("ignored@example.com", username="bob2", invite=token)

    # Only whoever reads bob's mailbox holds this link, so saying so reveals nothing to anyone else.
    assert b"already exists" in response.content
    assert not User.objects.filter(username="bob2").exists() and not mail.outbox


# ---------------------------------------------------------------------------
# Password reset: no account enumeration
# ---------------------------------------------------------------------------


def test_password_reset_answers_the_same_for_members_non_members_and_unknown_addresses(bob: User, carol: User) -> None:
    member = _reset("bob@example.com")
    elsewhere = _reset("carol@example.com")
    unknown = _reset("nobody@example.com")

    assert_same_page((member, "bob@example.com"), (elsewhere, "carol@example.com"), (unknown, "nobody@example.com"))
    assert member.status_code == 200
    assert [m.to for m in mail.outbox] == [["bob@example.com"]]


# ---------------------------------------------------------------------------
# Mail throttle
# ---------------------------------------------------------------------------

LIMITS = {
    "PORTAL_MAIL_ADDRESS_LIMIT": 3,
    "PORTAL_MAIL_ADDRESS_WINDOW_SECONDS": 900,
    "PORTAL_MAIL_IP_LIMIT": 20,
    "PORTAL_MAIL_IP_WINDOW_SECONDS": 3600,
}


@override_settings(**LIMITS)
def test_the_fourth_mail_to_one_address_is_refused_and_another_address_is_unaffected(bob: User, dave: User) -> None:
    for email in ("bob@example.com", "BOB@example.com", "bob@Example.COM"):
        assert _reset(email).status_code == 200
    assert len(mail.outbox) == 3

    refused = _reset("bob@example.com", ip="10.1.1.1")  # from anywhere: the limit is the address's

    assert refused.status_code == 429
    assert b"Too many e-mails were requested" in refused.content
    assert refused["Retry-After"] == "900"
    assert len(mail.outbox) == 3
    assert _reset("dave@example.com").status_code == 200
    assert [m.to for m in mail.outbox][-1] == ["dave@example.com"]


@override_settings(**LIMITS)
def test_sign_ups_and_resets_share_one_allowance_per_address_and_a_throttled_sign_up_creates_nothing(
    open_acme: Tenant, bob: User
) -> None:
    _reset("bob@example.com")
    _signup("bob@example.com", username="bobby")
    _signup("bob+portal@example.com", username="bob-portal")  # a "+tag" reaches the same inbox
    # The reset, the notice to bob, and the verification mail of the new bob+portal account.
    assert [m.to for m in mail.outbox] == [["bob@example.com"], ["bob@example.com"], ["bob+portal@example.com"]]
    before = _users()

    refused = _signup("bob@example.com", username="bob-again")

    assert refused.status_code == 429
    assert b"Too many e-mails were requested" in refused.content
    assert len(mail.outbox) == 3
    assert _users() == before


@override_settings(**LIMITS)
def test_a_throttled_answer_is_the_same_for_registered_and_unknown_addresses(bob: User) -> None:
    for _ in range(3):
        _reset("bob@example.com")
        _reset("nobody@example.com")
    sent = len(mail.outbox)

    member = _reset("bob@example.com")
    unknown = _reset("nobody@example.com")

    assert member.status_code == unknown.status_code == 429
    assert_same_page((member, "bob@example.com"), (unknown, "nobody@example.com"))
    assert member["Retry-After"] == unknown["Retry-After"]
    assert len(mail.outbox) == sent == 3


@override_settings(**{**LIMITS, "PORTAL_MAIL_IP_LIMIT": 4})
def test_one_client_address_may_ask_for_only_so_many_mails(bob: User, dave: User, alice: User) -> None:
    for email in ("bob@example.com", "dave@example.com", "x@example.com", "y@example.com"):
        assert _reset(email, ip="10.0.0.66").status_code == 200
    sent = len(mail.outbox)

    refused = _reset("alice@example.com", ip="10.0.0.66")

    assert refused.status_code == 429 and refused["Retry-After"] == "3600"
    assert len(mail.outbox) == sent
    # Another client is not held up, and alice's own allowance was not used up by the refused request.
    for _ in range(3):
        assert _reset("alice@example.com", ip="10.0.0.67").status_code == 200
    assert [m.to for m in mail.outbox][-3:] == [["alice@example.com"]] * 3


@override_settings(
    **{**LIMITS, "PORTAL_MAIL_IP_LIMIT": 2}, GATEWAY={**settings.GATEWAY, "TRUSTED_PROXIES": ["10.0.0.1"]}
)
def test_behind_a_trusted_proxy_each_client_has_its_own_allowance(bob: User, dave: User) -> None:
    via = {"HTTP_X_FORWARDED_FOR": "203.0.113.5"}
    assert _reset("bob@example.com", ip="10.0.0.1", **via).status_code == 200
    assert _reset("dave@example.com", ip="10.0.0.1", **via).status_code == 200
    assert _reset("dave@example.com", ip="10.0.0.1", **via).status_code == 429
    other = {"HTTP_X_FORWARDED_FOR": "203.0.113.6"}
    assert _reset("dave@example.com", ip="10.0.0.1", **other).status_code == 200


@override_settings(**{**LIMITS, "PORTAL_MAIL_ADDRESS_LIMIT": 1, "PORTAL_MAIL_ADDRESS_WINDOW_SECONDS": 1})
def test_the_allowance_comes_back_after_the_window(bob: User) -> None:
    assert _reset("bob@example.com").status_code == 200
    assert _reset("bob@example.com").status_code == 429
    time.sleep(1.2)
    assert _reset("bob@example.com").status_code == 200
    assert len(mail.outbox) == 2


@override_settings(**LIMITS)
def test_a_throttle_warning_names_neither_the_address_nor_keys_it_in_the_cache(
    bob: User, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(4):
        _reset("bob@example.com")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "mail throttled" in r.getMessage()]
    assert len(warnings) == 1
    record = vars(warnings[0])
    assert record["email_domain"] == "example.com" and len(record["email_hash"]) == 12
    assert "bob@" not in repr(record)
    keys = [key.decode() for key in redis_client.keys("*")]
    assert any("portal:mail:address:" in key for key in keys)
    assert not any("bob" in key or "example" in key for key in keys)


@override_settings(
    **{**LIMITS, "PORTAL_MAIL_ADDRESS_LIMIT": 1},
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there: every cache call is refused
            "OPTIONS": {"socket_connect_timeout": 0.25},
        }
    },
)
def test_when_the_cache_is_unreachable_mail_still_goes_out(bob: User, caplog: pytest.LogCaptureFixture) -> None:
    assert _reset("bob@example.com").status_code == 200
    assert _reset("bob@example.com").status_code == 200
    assert len(mail.outbox) == 2
    assert any("mail throttle counters unavailable" in r.getMessage() for r in caplog.records)


def test_the_address_hash_is_the_same_for_one_inbox_and_differs_between_inboxes() -> None:
    assert address_digest(" Bob+news@Example.com ") == address_digest("bob@example.com")
    assert address_digest("bob@example.com") != address_digest("bob@example.org")
    assert "bob" not in address_digest("bob@example.com")
