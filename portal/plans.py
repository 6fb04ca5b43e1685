"""Plans and limits in developers' words: "5 requests per minute, 10,000 per month"."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from apimgmt import limits
from apimgmt.models import Api, Plan, Policy

# Shortest window first, so a card reads from the limit a developer meets first to the longest quota.
_WINDOW_ORDER = ("second", "minute", "hour", "day", "month")


def limit_phrases(policies: Iterable[Policy]) -> list[str]:
    """One phrase per enforced window, shortest first: ["5 requests per minute", "10,000 per month"].

    Shadow policies only count, so they are left out; policy types without request windows say nothing here.
    """
    windows: dict[str, int] = {}
    for policy in policies:
        if policy.mode != Policy.Mode.ENFORCE:
            continue
        if policy.policy_type == Policy.Type.RATE_LIMITING:
            fields = {name: label for name, (label, _seconds) in limits.RATE_WINDOWS.items()}
        elif policy.policy_type == Policy.Type.QUOTA:
            fields = dict(limits.QUOTA_WINDOWS)
        else:
            continue
        for name, label in fields.items():
            value = policy.config.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                # Two policies on one window: the stricter one is what a developer meets.
                windows[label] = min(value, windows.get(label, value))
    phrases: list[str] = []
    for label in _WINDOW_ORDER:
        if label in windows:
            count = windows[label]
            noun = "" if phrases else (" request" if count == 1 else " requests")
            phrases.append(f"{count:,}{noun} per {label}")
    return phrases


def limits_in_words(policies: Iterable[Policy]) -> str:
    """ "5 requests per minute, 10,000 per month", or "No request limits" when none applies."""
    return ", ".join(limit_phrases(policies)) or "No request limits"


@dataclass(frozen=True)
class PlanCard:
    plan: Plan
    limits: str
    needs_approval: bool


def plan_cards(api: Api) -> list[PlanCard]:
    """The plans an API offers (archived ones take no new subscriptions: left out), each with its limits in
    words and whether subscribing waits for approval."""
    api_manual = api.subscription_approval == Api.Approval.MANUAL
    return [
        PlanCard(
            plan=plan,
            limits=limits_in_words(plan.policies.all()),
            needs_approval=api_manual or plan.approval == Plan.Approval.MANUAL,
        )
        for plan in api.plans.filter(archived_at__isnull=True).prefetch_related("policies").order_by("name")
    ]
