"""Events and webhooks: loopback receivers are allowed (WEBHOOK_ALLOW_PRIVATE) unless a test says otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from apimgmt.models import Event
from tests.support.webhook_receiver import Receiver, webhook_receiver


@pytest.fixture(autouse=True)
def _webhook_settings(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.WEBHOOK_TIMEOUT_SECONDS = 2.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


def event_types(tenant_id: str = "acme") -> list[str]:
    """The tenant's events, oldest first."""
    return list(
        Event.objects.filter(tenant_id=tenant_id).order_by("occurred_at", "id").values_list("event_type", flat=True)
    )
