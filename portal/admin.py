"""Admin pages of the portal's tables: the notice mails owed and sent (read-only, scoped to the staff's tenants)."""

from __future__ import annotations

from django.contrib import admin

from apimgmt.admin import ReadOnlyAdmin
from portal.models import NotificationMail


@admin.register(NotificationMail)
class NotificationMailAdmin(ReadOnlyAdmin):
    """The mail log of developer notices: which event, to whom, sent, skipped (switched off) or failed, and why."""

    tenant_path = "event__tenant"
    list_display = ["created_at", "notice", "event", "user", "status", "attempts", "completed_at", "last_error"]
    list_filter = ["status", "notice"]
    search_fields = ["event__id", "user__username", "user__email"]
    list_select_related = ["event", "user"]
    readonly_fields = [
        "event",
        "user",
        "notice",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
        "completed_at",
    ]
    show_full_result_count = False
