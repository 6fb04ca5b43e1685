"""Developer mail from the event outbox: who gets which notice, the switches in the portal, and sending.

The event deliverer (``manage.py deliver_events``) calls ``fan_out`` with each batch of new events inside the
transaction that marks them dispatched, and ``send_due`` once per round (registered in portal/apps.py as an
``apimgmt.events.OUTBOX_READERS`` entry, so apimgmt never imports the portal). ``fan_out`` writes one
``NotificationMail`` row per event and developer, unique on the pair, so a notice is owed once however many
deliverers run. ``send_due`` leases due rows, checks the developer still wants the notice and still owns the
object, counts the mail in the portal's mail throttle, renders text and HTML from templates and sends it.

Recipients are only ever the owners of the event's own apps in the event's own tenant, and only while they are
members of that tenant: an app's owner who left the tenant, or another developer, is never told.
"""

from __future__ import annotations

import logging
import zoneinfo
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import EmailMultiAlternatives
from django.db import transaction
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from apimgmt.models import OPEN_SUBSCRIPTION_STATUSES, Api, ApiKey, Consumer, Event, Tenant, TenantMembership
from portal import mail_throttle
from portal.models import Notice, NotificationMail, NotificationOptOut

logger = logging.getLogger("portal")

# Which notice an event type is (event types not named here send no mail).
NOTICE_OF_EVENT: dict[str, str] = {
    "key.expiring": Notice.KEY_EXPIRING,
    "subscription.approved": Notice.SUBSCRIPTION_DECIDED,
    "subscription.rejected": Notice.SUBSCRIPTION_DECIDED,
    "quota.threshold": Notice.QUOTA,
    "api.deprecated": Notice.API_DEPRECATED,
}
# A deliverer holds a mail this long while it sends it; past it another deliverer may take it (at least once).
SEND_LEASE = timedelta(seconds=120)
# A mail that could not go out (mail server down, throttled) is retried for this long, then marked failed.
GIVE_UP_AFTER = timedelta(hours=24)
RETRY_SECONDS = (30, 60, 300, 900, 3600)


# ---------------------------------------------------------------------------
# Switches (the portal's Notifications page)
# ---------------------------------------------------------------------------


def notices_switched_off(*, user: Any, tenant: Tenant) -> set[str]:
    return set(NotificationOptOut.objects.filter(user_id=user.pk, tenant=tenant).values_list("notice", flat=True))


@transaction.atomic
def notification_preferences_set(*, user: User, tenant: Tenant, enabled: Iterable[str]) -> dict[str, bool]:
    """Switch the developer's notices in this portal: those in ``enabled`` on, every other one off. Returns what
    changed (notice → now on), audited as ``portal.notifications``."""
    wanted_on = set(enabled)
    unknown = wanted_on - set(Notice.values)
    if unknown:
        raise ValueError(f"unknown notices: {', '.join(sorted(unknown))}")
    off_now = notices_switched_off(user=user, tenant=tenant)
    changes: dict[str, bool] = {}
    for notice in Notice.values:
        if notice in wanted_on and notice in off_now:
            NotificationOptOut.objects.filter(user=user, tenant=tenant, notice=notice).delete()
            changes[notice] = True
        elif notice not in wanted_on and notice not in off_now:
            NotificationOptOut.objects.get_or_create(user=user, tenant=tenant, notice=notice)
            changes[notice] = False
    if changes:
        from apimgmt.services import audit_record

        audit_record(
            actor=user,
            tenant_id=tenant.id,
            action="portal.notifications",
            obj=user,
            changes={notice: ["off", "on"] if on else ["on", "off"] for notice, on in changes.items()},
        )
    return changes


# ---------------------------------------------------------------------------
# Fan-out: who is owed a mail (in the dispatching transaction)
# ---------------------------------------------------------------------------


def _owners(event: Event) -> set[int]:
    """The developers the event is about: owners of the event's apps in the event's tenant."""
    apps = Consumer.objects.filter(tenant_id=event.tenant_id, owner__isnull=False)
    if event.event_type == "api.deprecated":
        # Everyone whose app holds a pending or active subscription to the API.
        apps = apps.filter(
            subscriptions__api_id=event.data.get("api_id"), subscriptions__status__in=OPEN_SUBSCRIPTION_STATUSES
        )
    else:
        apps = apps.filter(pk=event.data.get("consumer_id"))
    return {owner for owner in apps.values_list("owner_id", flat=True).distinct() if owner is not None}


def fan_out(batch: list[Event]) -> None:
    """One pending mail per (event, developer) for the events that are notices. Runs inside the transaction that
    marks ``batch`` dispatched, so the rows commit exactly once with it."""
    rows: list[NotificationMail] = []
    now = timezone.now()
    for event in batch:
        notice = NOTICE_OF_EVENT.get(event.event_type)
        if notice is None:
            continue
        for user_id in sorted(_owners(event)):
            rows.append(
                NotificationMail(event=event, user_id=user_id, notice=notice, next_attempt_at=now, created_at=now)
            )
    if rows:
        NotificationMail.objects.bulk_create(rows, ignore_conflicts=True)


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------


def _claim(batch_size: int) -> list[NotificationMail]:
    now = timezone.now()
    with transaction.atomic():
        due = list(
            NotificationMail.objects.filter(status=NotificationMail.Status.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at", "id")
            .select_for_update(skip_locked=True)[:batch_size]
        )
        if due:
            NotificationMail.objects.filter(pk__in=[m.pk for m in due]).update(next_attempt_at=now + SEND_LEASE)
    if not due:
        return []
    return list(
        NotificationMail.objects.filter(pk__in=[m.pk for m in due])
        .select_related("event__tenant", "user")
        .order_by("id")
    )


def _finish(mail: NotificationMail, status: str, error: str = "") -> None:
    NotificationMail.objects.filter(pk=mail.pk, status=NotificationMail.Status.PENDING).update(
        status=status,
        attempts=mail.attempts + (status != NotificationMail.Status.SKIPPED),
        next_attempt_at=None,
        completed_at=timezone.now(),
        last_error=error[:500],
    )


def _later(mail: NotificationMail, *, seconds: float, error: str, counts: bool) -> None:
    """Try again in ``seconds``, or mark it failed once it is older than GIVE_UP_AFTER."""
    now = timezone.now()
    attempts = mail.attempts + counts
    if now + timedelta(seconds=seconds) > mail.created_at + GIVE_UP_AFTER:
        _finish(mail, NotificationMail.Status.FAILED, error)
        return
    NotificationMail.objects.filter(pk=mail.pk, status=NotificationMail.Status.PENDING).update(
        attempts=attempts, next_attempt_at=now + timedelta(seconds=seconds), last_error=error[:500]
    )


def _still_theirs(mail: NotificationMail) -> bool:
    """The developer is active, has an address, is a member of the event's (active) tenant and still owns the
    app(s). A suspended tenant's portal answers 404, so its developers are not sent there."""
    user = mail.user
    if not user.is_active or not user.email or mail.event.tenant.status != Tenant.Status.ACTIVE:
        return False
    if not TenantMembership.objects.filter(user=user, tenant_id=mail.event.tenant_id).exists():
        return False
    return user.pk in _owners(mail.event)


def send_due(*, batch_size: int = 50) -> int:
    """Send due notice mails; return how many went out. Outside any transaction (a slow mail server holds no
    row lock)."""
    sent = 0
    for mail in _claim(batch_size):
        if mail.notice in notices_switched_off(user=mail.user, tenant=mail.event.tenant):
            _finish(mail, NotificationMail.Status.SKIPPED, "switched off by the developer")
            continue
        if not _still_theirs(mail):
            _finish(mail, NotificationMail.Status.SKIPPED, "no longer the developer's, or no address")
            continue
        throttle = mail_throttle.check_and_count_notice(email=mail.user.email, tenant_id=mail.event.tenant_id)
        if throttle.throttled:
            _later(mail, seconds=throttle.retry_after_seconds, error="throttled", counts=False)
            continue
        try:
            message = render_mail(mail)
            message.send()
        except Exception as exc:  # a mail server outage must not stop the deliverer: retried with backoff
            logger.warning("notice mail not sent", extra={"mail": mail.pk, "error": type(exc).__name__})
            delay = RETRY_SECONDS[min(mail.attempts, len(RETRY_SECONDS) - 1)]
            _later(mail, seconds=delay, error=f"{type(exc).__name__}: {exc}", counts=True)
            continue
        _finish(mail, NotificationMail.Status.SENT)
        sent += 1
    return sent


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def site_link(path: str) -> str:
    """An absolute link for a mail: always SITE_URL (there is no request here to take a host from)."""
    return settings.SITE_URL.rstrip("/") + path


def _context(mail: NotificationMail) -> dict[str, Any]:
    event = mail.event
    tenant = event.tenant
    data = event.data
    app = Consumer.objects.filter(tenant=tenant, pk=data.get("consumer_id")).first()
    api = Api.objects.filter(tenant=tenant, pk=data.get("api_id")).first()
    if api is None and event.event_type.startswith("subscription."):
        api = Api.objects.filter(tenant=tenant, subscriptions__pk=data.get("subscription_id")).first()
    key = ApiKey.objects.filter(consumer__tenant=tenant, pk=data.get("key_id")).first() if data.get("key_id") else None
    apps: list[Consumer] = []
    if event.event_type == "api.deprecated":
        apps = list(
            Consumer.objects.filter(
                tenant=tenant,
                owner=mail.user,
                subscriptions__api_id=data.get("api_id"),
                subscriptions__status__in=OPEN_SUBSCRIPTION_STATUSES,
            )
            .distinct()
            .order_by("name")
        )
    return {
        "tenant": tenant,
        "user": mail.user,
        "event": event,
        "data": data,
        "app": app,
        "apps": apps,
        "api": api,
        "key": key,
        "expires_at": _when(data.get("expires_at")),
        "sunset_at": _when(data.get("sunset_at")),
        "window_end": _when(data.get("window_end")),
        "approved": event.event_type == "subscription.approved",
        "app_link": site_link(reverse("portal:app", args=[tenant.id, app.pk])) if app else "",
        "api_link": site_link(reverse("portal:api", args=[tenant.id, api.pk])) if api else "",
        "usage_link": site_link(reverse("portal:usage", args=[tenant.id, app.pk])) if app else "",
        "settings_link": site_link(reverse("portal:notifications", args=[tenant.id])),
    }


def render_mail(mail: NotificationMail) -> EmailMultiAlternatives:
    """The notice as a text mail with an HTML alternative, dates in the tenant's time zone."""
    tenant = mail.event.tenant
    try:
        zone = zoneinfo.ZoneInfo(tenant.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    context = _context(mail)
    with timezone.override(zone):
        text = render_to_string(f"portal/email/notice_{mail.notice}.txt", context)
        html = render_to_string(f"portal/email/notice_{mail.notice}.html", context)
    subject, _, body = text.partition("\n\n")
    message = EmailMultiAlternatives(subject=" ".join(subject.split()), body=body.strip() + "\n", to=[mail.user.email])
    message.attach_alternative(html, "text/html")
    return message
