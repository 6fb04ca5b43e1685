"""The portal's own tables: which notices a developer switched off, and the notice mails owed and sent."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.timezone import now

from apimgmt.models import Event, Tenant


class Notice(models.TextChoices):
    """The kinds of mail a developer gets about their own apps, keys and subscriptions (each can be switched off)."""

    KEY_EXPIRING = "key_expiring", "A key of mine expires soon (7 days and 1 day before)"
    SUBSCRIPTION_DECIDED = "subscription_decided", "A subscription of mine was approved or rejected"
    QUOTA = "quota", "An app of mine used 80 % and 100 % of a quota"
    API_DEPRECATED = "api_deprecated", "An API my apps use was deprecated (with its sunset date)"


class NotificationOptOut(models.Model):
    """A developer switched one kind of notice off in one portal; no row means the notice is on."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    notice = models.CharField(max_length=32, choices=Notice.choices)
    created_at = models.DateTimeField(default=now, editable=False)

    class Meta:
        db_table = "am_notification_opt_outs"
        verbose_name = "notification opt-out"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "tenant", "notice"],
                name="uniq_notification_opt_out",
                violation_error_message="This notice is already switched off for this developer.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.tenant_id} {self.notice} off"


class NotificationMail(models.Model):
    """One notice mail owed to one developer for one event: made when the event is dispatched, sent later.

    The unique (event, user) pair is what makes a mail go out at most once per event and recipient however many
    deliverers run; a deliverer leases a row (``next_attempt_at``) while it sends, and a row whose deliverer died
    mid-send is taken again after the lease (at least once).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        SKIPPED = "skipped", "Skipped (switched off, or no longer the developer's)"
        FAILED = "failed", "Failed"

    id = models.BigAutoField(primary_key=True)
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    notice = models.CharField(max_length=32, choices=Notice.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(default=now, editable=False)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "am_notification_mails"
        verbose_name = "notification mail"
        constraints = [
            models.UniqueConstraint(
                fields=["event", "user"],
                name="uniq_notification_mail",
                violation_error_message="This developer already has this event's mail.",
            )
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="idx_notice_mails_due"),
        ]

    def __str__(self) -> str:
        return f"{self.notice} {self.event_id} → {self.user_id} ({self.status})"
