"""`manage.py demo --json` loads a working demo, idempotently."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import override_settings

from apimgmt import keys, selectors
from apimgmt.models import Api, ApiKey, Subscription, Tenant


def _demo(*args: str) -> dict[str, str]:
    out = StringIO()
    call_command("demo", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


@override_settings(UPSTREAM_ALLOW_PRIVATE=True)
def test_demo_prints_working_credentials_and_is_idempotent(db: Any) -> None:
    first = _demo("--upstream", "http://127.0.0.1:9999")
    assert set(first) == {"admin_username", "admin_password", "api_token", "api_key", "api_base_path", "portal_url"}
    assert keys.is_well_formed(first["api_key"])
    assert User.objects.get(username=first["admin_username"]).check_password(first["admin_password"])
    record = selectors.key_record_by_hash(keys.hash_key(first["api_key"]))
    api = Api.objects.get(base_path=first["api_base_path"])
    assert record is not None and record.tenant_id == api.tenant_id and api.id in record.subscriptions
    assert api.status == "active" and api.upstream_url == "http://127.0.0.1:9999"
    assert first["portal_url"].endswith("/portal/demo/")

    counts = (Tenant.objects.count(), Api.objects.count(), ApiKey.objects.count(), Subscription.objects.count())
    second = _demo("--upstream", "http://127.0.0.1:9998")
    assert second == first
    assert (Tenant.objects.count(), Api.objects.count(), ApiKey.objects.count(), Subscription.objects.count()) == counts
    assert Api.objects.get(pk=api.pk).upstream_url == "http://127.0.0.1:9998"


@override_settings(UPSTREAM_ALLOW_PRIVATE=False)
def test_demo_explains_a_refused_upstream(db: Any) -> None:
    with pytest.raises(CommandError, match="UPSTREAM_ALLOW_PRIVATE"):
        _demo("--upstream", "http://127.0.0.1:9999")
