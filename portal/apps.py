"""Django app config for the developer portal: registers developer mail as a reader of the event outbox."""

from __future__ import annotations

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Developer portal"

    def ready(self) -> None:
        from apimgmt.events import OUTBOX_READERS, OutboxReader
        from portal import notifications

        OUTBOX_READERS["developer_mail"] = OutboxReader(fan_out=notifications.fan_out, send_due=notifications.send_due)
