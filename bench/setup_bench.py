"""Create the benchmark's tenant, API (two-window policy never reached), consumer and key; print the key as JSON."""

from __future__ import annotations

import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
django.setup()

from apimgmt import services, usage_buckets  # noqa: E402
from apimgmt.models import Api, Policy, Tenant  # noqa: E402
from apimgmt.redis_client import get_redis  # noqa: E402


def main(upstream: str) -> None:
    client = get_redis()
    if client is not None:
        # The bench runs no usage flusher (it would share the two cores): drop earlier runs' usage buckets (a few
        # per minute of traffic) from the bench's Redis db.
        stale = list(client.scan_iter(f"{usage_buckets.tag('bench')}:*"))
        if stale:
            client.delete(*stale)
    tenant = Tenant.objects.filter(pk="bench").first() or services.tenant_create(id="bench", name="Bench", actor=None)
    policy = Policy.objects.filter(tenant=tenant, name="bench-limit").first() or services.policy_create(
        tenant=tenant,
        name="bench-limit",
        policy_type="rate_limiting",
        config={"requests_per_second": 1_000_000, "requests_per_minute": 60_000_000, "burst_size": 1000},
        actor=None,
    )
    Api.objects.filter(tenant=tenant).delete()
    api = services.api_create(
        tenant=tenant,
        api_name="bench",
        base_path="/bench",
        upstream_url=upstream,
        status="active",
        policies=[policy],
        actor=None,
    )
    consumer = services.consumer_create(tenant=tenant, name=f"bench-{api.id}", actor=None)
    services.subscription_request(consumer=consumer, api=api, actor=None)
    _, key = services.api_key_create(consumer=consumer, actor=None)
    print(json.dumps({"key": key, "base_path": api.base_path}))


if __name__ == "__main__":
    main(sys.argv[1])
