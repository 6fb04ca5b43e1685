"""A consumer subscribed to an API through a plan with one quota policy, and the Redis counter of that quota: what the
quota.threshold, retention and carry-over tests set up before they move a counter."""

from __future__ import annotations

from typing import Any

from apimgmt import limits, services
from apimgmt.models import Api, Consumer, Policy, Tenant


def subscribed_on_quota(
    tenant: Tenant,
    consumer: Consumer,
    config: dict[str, Any],
    *,
    name: str = "ten",
    base_path: str = "/orders",
    actor: Any = None,
) -> tuple[Policy, Api]:
    """``consumer`` subscribed to a new API whose one plan holds one quota policy of ``config``."""
    quota = services.policy_create(tenant=tenant, name=name, policy_type="quota", config=config, actor=actor)
    plan = services.plan_create(tenant=tenant, name=name, policies=[quota], actor=actor)
    api = services.api_create(
        tenant=tenant,
        api_name="orders",
        base_path=base_path,
        upstream_url="https://93.184.215.14",
        status="active",
        plans=[plan],
        actor=actor,
    )
    services.subscription_request(consumer=consumer, api=api, plan=plan, actor=actor)
    return quota, api


def quota_window(policy: Policy, scope: str, now: float) -> limits.CounterWindow:
    """The counter window of ``policy`` (one calendar window) for ``scope`` at ``now``, in its tenant's time zone."""
    (window,) = limits.counter_windows(
        tenant_id=policy.tenant_id,
        tz_name=policy.tenant.timezone,
        policy_id=policy.pk,
        policy_name=policy.name,
        policy_type=policy.policy_type,
        config=policy.config,
        scope=scope,
        now=now,
    )
    return window
