"""Developer mail: notices about a developer's own keys, subscriptions, quotas and APIs, sent by the event deliverer
from the outbox (once per event and developer), switchable in the portal, through the mail throttle, as text + HTML.

Mail goes to Django's locmem backend: a mail server is not a peer these tests can run.
"""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from apimgmt import events, services, webhooks
from apimgmt.models import Api, ApiKey, Consumer, TenantMembership
from portal.models import NotificationMail, NotificationOptOut


def deliver() -> webhooks.DeliveryStats:
    """One round of the event deliverer (what ``deliver_events`` does every half second)."""
    deliverer = webhooks.Deliverer()
    try:
        return deliverer.run_once()
    finally:
        deliverer.close()


def _expiring_key(app: Consumer, actor: User, *, days: float, name: str = "ci") -> ApiKey:
    key, _ = services.api_key_create(
        consumer=app, name=name, actor=actor, expires_at=timezone.now() + timedelta(days=days)
    )
    return key


def _html(message: Any) -> str:
    (html, mimetype), *_ = message.alternatives
    assert mimetype == "text/html"
    return str(html)


def test_a_key_expiring_mails_its_owner_at_7_days_and_at_1_day_once_each(acme, bob, bob_app):
    key = _expiring_key(bob_app, bob, days=5)
    assert events.key_expiring_notices() == 1
    deliver()
    assert [m.to for m in mail.outbox] == [["bob@example.com"]]
    first = mail.outbox[0]
    assert first.subject == f"[Acme developers] Your key {key.key_prefix}… of bob-app expires within 7 days"
    assert "bob-app" in first.body and f"/portal/acme/apps/{bob_app.pk}/" in first.body
    assert "/portal/acme/notifications/" in first.body  # how to switch it off
    assert key.key_prefix in _html(first) and "<strong>bob-app</strong>" in _html(first)
    # Later rounds and later scans send nothing more for the same threshold.
    assert events.key_expiring_notices() == 0
    deliver()
    deliver()
    assert len(mail.outbox) == 1
    # Inside the last day: the 1-day notice, once.
    assert events.key_expiring_notices(now=timezone.now() + timedelta(days=4, hours=12)) == 1
    deliver()
    deliver()
    assert len(mail.outbox) == 2 and "expires within a day" in mail.outbox[1].subject
    assert NotificationMail.objects.filter(status="sent").count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_deliverers_at_once_send_a_notice_once(acme, bob, bob_app):
    for n in range(5):
        _expiring_key(bob_app, bob, days=3, name=f"k{n}")
    events.key_expiring_notices()
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            deliver()
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deliver()
    assert sorted(m.subject.split()[4] for m in mail.outbox) == sorted(
        k.key_prefix + "…" for k in ApiKey.objects.filter(consumer=bob_app)
    )
    assert len(mail.outbox) == 5
    assert NotificationMail.objects.filter(status="sent").count() == 5


def test_a_decided_subscription_mails_the_apps_owner(acme, alice, bob, bob_app, dave, acme_api):
    services.api_update(api=acme_api, subscription_approval="manual", actor=alice)
    dave_app = services.consumer_create(tenant=acme, name="dave-app", owner=dave, actor=dave)
    approved = services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    rejected = services.subscription_request(consumer=dave_app, api=acme_api, actor=dave)
    deliver()
    assert mail.outbox == []  # asking is no news to the developer who asked
    services.subscription_approve(subscription=approved, actor=alice)
    services.subscription_reject(subscription=rejected, actor=alice, note="Tell us what you build first.")
    deliver()
    by_address = {m.to[0]: m for m in mail.outbox}
    assert sorted(by_address) == ["bob@example.com", "dave@example.com"]
    assert by_address["bob@example.com"].subject == "[Acme developers] bob-app's subscription to users was approved"
    assert "Its keys work on this API now." in by_address["bob@example.com"].body
    assert by_address["dave@example.com"].subject == "[Acme developers] dave-app's subscription to users was rejected"
    assert "Tell us what you build first." in by_address["dave@example.com"].body
    assert "Tell us what you build first." in _html(by_address["dave@example.com"])


def _quota_event(app: Consumer, api: Api, *, threshold: int, used: int) -> None:
    end = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    with transaction.atomic():
        events.emit(
            tenant_id=app.tenant_id,
            event_type="quota.threshold",
            data={
                "consumer_id": app.pk,
                "key_id": None,
                "api_id": api.pk,
                "subscription_id": None,
                "plan_id": None,
                "policy_id": "pol_x",
                "policy_name": "daily",
                "window": "day",
                "window_start": (end - timedelta(days=1)).isoformat(),
                "window_end": end.isoformat(),
                "limit": 1000,
                "used": used,
                "threshold": threshold,
            },
            dedupe_key=f"quota.threshold:test:{app.pk}:{threshold}",
        )


def test_quota_at_80_and_100_percent_mails_the_apps_owner(acme, bob, bob_app, acme_api):
    _quota_event(bob_app, acme_api, threshold=80, used=800)
    deliver()
    _quota_event(bob_app, acme_api, threshold=100, used=1000)
    deliver()
    assert [m.to for m in mail.outbox] == [["bob@example.com"]] * 2
    assert mail.outbox[0].subject == "[Acme developers] bob-app used 80 % of its day quota on users"
    assert "800 of the 1000 requests" in mail.outbox[0].body
    assert mail.outbox[1].subject == "[Acme developers] bob-app used all of its day quota on users"
    assert "Further calls are refused until the window ends" in mail.outbox[1].body
    assert f"/portal/acme/apps/{bob_app.pk}/usage/" in mail.outbox[1].body


def test_a_deprecated_api_mails_each_subscribed_developer_only_about_their_own_apps(
    acme, alice, bob, bob_app, dave, vera, globex, carol, acme_api
):
    dave_app = services.consumer_create(tenant=acme, name="dave-app", owner=dave, actor=dave)
    services.consumer_create(tenant=acme, name="idle-app", owner=vera, actor=alice)  # not subscribed
    services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    services.subscription_request(consumer=dave_app, api=acme_api, actor=dave)
    # Globex has an API and a subscriber too: its developer hears nothing of acme's API.
    globex_api = services.api_create(
        tenant=globex,
        api_name="users",
        base_path="/g/users",
        upstream_url="https://g.example.com",
        status="active",
        actor=carol,
    )
    carol_app = services.consumer_create(tenant=globex, name="carol-app", owner=carol, actor=carol)
    services.subscription_request(consumer=carol_app, api=globex_api, actor=carol)
    sunset = timezone.now().replace(microsecond=0) + timedelta(days=90)
    services.api_deprecate(api=acme_api, actor=alice, sunset_at=sunset)
    deliver()
    assert sorted(m.to[0] for m in mail.outbox) == ["bob@example.com", "dave@example.com"]
    for message in mail.outbox:
        assert message.subject == f"[Acme developers] users is deprecated: it retires on {sunset:%-d %B %Y}"
        assert "/api/users/v1" in message.body
    bob_mail = next(m for m in mail.outbox if m.to == ["bob@example.com"])
    assert "bob-app" in bob_mail.body and "dave-app" not in bob_mail.body  # never another developer's app


def _csrf_client(user: User) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _csrf_token(client: Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert match
    return match.group(1)


def test_switching_a_notice_off_in_the_portal_stops_it_and_on_again_brings_it_back(acme, bob, bob_app):
    client = _csrf_client(bob)
    path = "/portal/acme/notifications/"
    page = client.get(path).content.decode()
    assert "bob@example.com" in page
    assert page.count("checked") == 4  # every notice is on until switched off
    assert client.post(path, {"enabled": ["quota"]}).status_code == 403  # no CSRF token
    token = _csrf_token(client, path)
    answer = client.post(path, {"enabled": ["quota", "api_deprecated"], "csrfmiddlewaretoken": token})
    assert answer.status_code == 302 and answer["Location"] == path
    assert set(NotificationOptOut.objects.filter(user=bob).values_list("notice", flat=True)) == {
        "key_expiring",
        "subscription_decided",
    }
    assert client.get(path).content.decode().count("checked") == 2
    _expiring_key(bob_app, bob, days=3)
    events.key_expiring_notices()
    deliver()
    assert mail.outbox == []
    assert NotificationMail.objects.get().status == "skipped"
    # Switched on again: the next notice (the 1-day one) arrives.
    token = _csrf_token(client, path)
    client.post(path, {"enabled": ["key_expiring"], "csrfmiddlewaretoken": token})
    events.key_expiring_notices(now=timezone.now() + timedelta(days=2, hours=12))
    deliver()
    assert [m.to for m in mail.outbox] == [["bob@example.com"]]


def test_the_notifications_page_refuses_unknown_notices_and_strangers(acme, bob, carol):
    client = _csrf_client(bob)
    token = _csrf_token(client, "/portal/acme/notifications/")
    answer = client.post("/portal/acme/notifications/", {"enabled": ["spam"], "csrfmiddlewaretoken": token})
    assert answer.status_code == 400 and "spam is not one of the available choices" in answer.content.decode()
    assert not NotificationOptOut.objects.exists()
    # A member of another tenant only: sent to sign in, as for every member page.
    stranger = Client()
    stranger.force_login(carol)
    assert stranger.get("/portal/acme/notifications/").status_code == 302
    assert Client().get("/portal/acme/notifications/").status_code == 302


def test_switches_are_per_portal(acme, globex, bob, bob_app):
    services.membership_set(tenant=globex, user=bob, role="developer", actor=None)
    client = _csrf_client(bob)
    token = _csrf_token(client, "/portal/globex/notifications/")
    client.post("/portal/globex/notifications/", {"enabled": [], "csrfmiddlewaretoken": token})
    assert NotificationOptOut.objects.filter(user=bob, tenant=globex).count() == 4
    _expiring_key(bob_app, bob, days=3)  # an acme app: acme's switches apply
    events.key_expiring_notices()
    deliver()
    assert [m.to for m in mail.outbox] == [["bob@example.com"]]


def test_no_mail_to_an_owner_who_left_the_tenant_nor_for_an_unowned_app(acme, alice, bob, bob_app):
    _expiring_key(bob_app, bob, days=3)
    staff_app = services.consumer_create(tenant=acme, name="staff-app", actor=alice)  # no owner
    _expiring_key(staff_app, alice, days=3)
    TenantMembership.objects.filter(user=bob, tenant=acme).delete()
    assert events.key_expiring_notices() == 2
    deliver()
    assert mail.outbox == []
    assert list(NotificationMail.objects.values_list("status", flat=True)) == ["skipped"]


def test_notices_go_through_the_mail_throttle_and_wait_for_the_next_window(acme, bob, bob_app, settings):
    settings.PORTAL_NOTICE_MAIL_LIMIT = 2
    for n in range(3):
        _expiring_key(bob_app, bob, days=3, name=f"k{n}")
    events.key_expiring_notices()
    deliver()
    assert len(mail.outbox) == 2
    waiting = NotificationMail.objects.get(status="pending")
    assert waiting.last_error == "throttled"
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at > timezone.now() + timedelta(seconds=settings.PORTAL_NOTICE_MAIL_WINDOW_SECONDS - 60)
    deliver()
    assert len(mail.outbox) == 2


def test_a_mail_server_failure_is_retried_later_not_lost(acme, bob, bob_app, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 2  # nothing listens
    _expiring_key(bob_app, bob, days=3)
    events.key_expiring_notices()
    deliver()
    waiting = NotificationMail.objects.get()
    assert (waiting.status, waiting.attempts) == ("pending", 1)
    assert "ConnectionRefusedError" in waiting.last_error
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    NotificationMail.objects.update(next_attempt_at=timezone.now())
    deliver()
    assert [m.to for m in mail.outbox] == [["bob@example.com"]]
    assert NotificationMail.objects.get().status == "sent"


def test_an_event_of_another_tenant_never_mails_this_tenants_developers(acme, globex, bob, bob_app, carol):
    carol_app = services.consumer_create(tenant=globex, name="carol-app", owner=carol, actor=carol)
    # A forged event naming bob's app under globex: the app is looked up inside the event's own tenant only.
    with transaction.atomic():
        events.emit(
            tenant_id=globex.id,
            event_type="key.expiring",
            data={"consumer_id": bob_app.pk, "key_id": "key_x", "key_prefix": "ak_live_xxxx", "name": "x"},
        )
    _expiring_key(carol_app, carol, days=3)
    events.key_expiring_notices()
    deliver()
    assert [m.to for m in mail.outbox] == [["carol@example.com"]]
    assert "[Globex developers]" in mail.outbox[0].subject


def test_the_admin_mail_log_shows_staff_only_their_tenants_mails(acme, globex, bob, bob_app, carol):
    from django.contrib.auth.models import Permission

    carol_app = services.consumer_create(tenant=globex, name="carol-app", owner=carol, actor=carol)
    _expiring_key(bob_app, bob, days=3)
    _expiring_key(carol_app, carol, days=3)
    events.key_expiring_notices()
    deliver()
    sam = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(Permission.objects.filter(content_type__app_label="portal"))
    services.membership_set(tenant=acme, user=sam, role="admin", actor=None)
    client = Client()
    client.force_login(sam)
    listing = client.get("/admin/portal/notificationmail/")
    assert listing.status_code == 200
    text = listing.content.decode()
    assert ">bob<" in text and ">carol<" not in text
    carols = NotificationMail.objects.get(user=carol)
    assert client.get(f"/admin/portal/notificationmail/{carols.pk}/change/").status_code == 404
    mine = NotificationMail.objects.get(user=bob)
    assert client.get(f"/admin/portal/notificationmail/{mine.pk}/change/").status_code == 200


def test_a_suspended_tenants_developers_get_no_notices(acme, bob, bob_app):
    _expiring_key(bob_app, bob, days=3)
    events.key_expiring_notices()
    services.tenant_suspend(tenant=acme, actor=None)
    deliver()
    assert mail.outbox == []
    assert NotificationMail.objects.get().status == "skipped"
