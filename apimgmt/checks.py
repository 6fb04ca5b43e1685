"""System checks that refuse unsafe production settings (shown by `manage.py check --deploy`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register


@register(deploy=True)
def check_secrets(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if settings.KEY_HASH_PEPPER.startswith("dev-only") or len(settings.KEY_HASH_PEPPER) < 32:
        messages.append(
            Error("KEY_HASH_PEPPER is a development value or shorter than 32 characters.", id="apimgmt.E001")
        )
    if settings.KEY_HASH_PEPPER == settings.SECRET_KEY:
        messages.append(Error("KEY_HASH_PEPPER must differ from SECRET_KEY.", id="apimgmt.E002"))
    return messages


@register()
def check_shared_store(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if not settings.REDIS_URL and not settings.DEBUG and not settings.TESTING:
        return [
            Warning(
                "REDIS_URL is not set: rate-limit counters and caches are per worker process.",
                hint="Set REDIS_URL so limits hold across workers and revocations reach every worker.",
                id="apimgmt.W001",
            )
        ]
    return []
