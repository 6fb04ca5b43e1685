"""What applying a document would change: creates, field-by-field updates and (with prune) deletes or refusals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q

from apimgmt import services
from apimgmt.config_doc.document import ConfigError, Problem, consumer_key
from apimgmt.config_doc.secrets import REFERENCES, masked_configs
from apimgmt.config_doc.state import TenantState
from apimgmt.models import Api, Subscription

CREATE = "create"
UPDATE = "update"
DELETE = "delete"
# The document section of each kind of object (subscriptions are listed under their consumer).
SECTION_OF = {
    "policy": "policies",
    "jwt_issuer": "jwt_issuers",
    "plan": "plans",
    "api": "apis",
    "consumer": "consumers",
}
# Where an API's status may go from where (the services' transitions; draft is only ever a starting point).
_API_REACHABLE = {
    Api.Status.DRAFT: {Api.Status.ACTIVE, Api.Status.DEPRECATED, Api.Status.RETIRED},
    Api.Status.ACTIVE: {Api.Status.DEPRECATED, Api.Status.RETIRED},
    Api.Status.DEPRECATED: {Api.Status.ACTIVE, Api.Status.RETIRED},
    Api.Status.RETIRED: set(),
}


@dataclass
class Change:
    """One object to create, update or delete. ``fields`` (updates): {field: [old, new]}; ``refusal``: why a delete
    would be refused. The plan lists changes in the order: policies, JWT issuers, plans, APIs, consumers,
    subscriptions, then
    deletes; apply makes them in its own order (apimgmt/config_doc/apply.py, ``_STEPS``)."""

    action: str
    kind: str
    key: str
    fields: dict[str, list[Any]] = field(default_factory=dict)
    refusal: str | None = None
    # Create/update: the object as the document wants it; subscriptions: the consumer's key and the API's name.
    desired: dict[str, Any] = field(default_factory=dict)
    row: Any = None
    # A policy's config pointers whose values come from a variable (in the document or as applied): shown masked.
    secrets: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"{self.kind} {self.key}"

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"action": self.action, "kind": self.kind, "name": self.key}
        if self.action == UPDATE:
            body["fields"] = {}
            for name, (old, new) in self.fields.items():
                shown_old, shown_new = _shown(name, old, new, self.secrets)
                body["fields"][name] = {"old": shown_old, "new": shown_new}
        if self.refusal:
            body["refused"] = self.refusal
        return body


@dataclass
class ConfigPlan:
    tenant_id: str
    source: str
    prune: bool
    fingerprint: str
    changes: list[Change] = field(default_factory=list)

    @property
    def refusals(self) -> list[Change]:
        return [c for c in self.changes if c.refusal]

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[str, int]:
        return {
            "create": sum(c.action == CREATE for c in self.changes),
            "update": sum(c.action == UPDATE for c in self.changes),
            "delete": sum(c.action == DELETE and not c.refusal for c in self.changes),
            "refused": len(self.refusals),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "prune": self.prune,
            "fingerprint": self.fingerprint,
            "summary": self.counts(),
            "changes": [c.as_json() for c in self.changes],
        }

    def text(self) -> str:
        """The plan as people read it in a terminal or a pull-request comment."""
        counts = self.counts()
        lines = [
            f"Plan for tenant {self.tenant_id} from {self.source}: {counts['create']} to create, "
            f"{counts['update']} to update, {counts['delete']} to delete"
            + (f", {counts['refused']} refused" if counts["refused"] else "")
            + ("" if self.prune else " (without --prune nothing is deleted)")
            + "."
        ]
        for change in self.changes:
            if change.refusal:
                lines.append(f"! delete {change.label}: refused: {change.refusal}")
            elif change.action == CREATE:
                lines.append(f"+ {change.label}")
            elif change.action == DELETE:
                lines.append(f"- {change.label}")
            else:
                lines.append(f"~ {change.label}")
                for name, (raw_old, raw_new) in change.fields.items():
                    old, new = _shown(name, raw_old, raw_new, change.secrets)
                    if name == "config" and isinstance(old, dict) and isinstance(new, dict):
                        # A policy's limits one by one: "config.requests_per_minute: 100 → 250".
                        for sub, (was, now) in _diff(old, new).items():
                            lines.append(f"    {name}.{sub}: {_show(sub, was)} → {_show(sub, now)}")
                    else:
                        lines.append(f"    {name}: {_show(name, old)} → {_show(name, new)}")
        if not self.changes:
            lines.append("No changes: the tenant already matches the document.")
        lines.append(f"fingerprint: {self.fingerprint}")
        return "\n".join(lines) + "\n"


def _shown(name: str, old: Any, new: Any, secrets: frozenset[str]) -> tuple[Any, Any]:
    """A field's old and new value as a plan shows them: a policy's values from variables and its credential-shaped
    header values masked, whatever the header's name."""
    return masked_configs(old, new, secrets) if name == "config" else (old, new)


def _show(name: str, value: Any) -> str:
    if name == "openapi_spec" and isinstance(value, dict):
        return f"(an OpenAPI document, {len(json.dumps(value))} bytes)"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _diff(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    return {
        name: [old.get(name), new.get(name)]
        for name in dict.fromkeys([*old, *new])
        if name not in skip and old.get(name) != new.get(name)
    }


def make_plan(*, state: TenantState, document: dict[str, Any], source: str, prune: bool) -> ConfigPlan:
    """Compare the document with the tenant's state. Raises ConfigError for a change no service can make."""
    if state.ambiguous:
        raise ConfigError(source, state.ambiguous)
    plan = ConfigPlan(tenant_id=state.tenant.id, source=source, prune=prune, fingerprint=state.fingerprint())
    problems: list[Problem] = []
    for kind in ("policy", "jwt_issuer", "plan", "api"):
        section = SECTION_OF[kind]
        current: dict[str, tuple[dict[str, Any], Any]] = getattr(state, section)
        for item in document[section]:
            key = item["name"]
            if key not in current:
                plan.changes.append(Change(CREATE, kind, key, desired=item))
                continue
            old, row = current[key]
            fields = _diff(old, item)
            if not fields:
                continue
            where = f"{section}[{key}]"
            if kind == "policy" and "policy_type" in fields:
                problems.append(
                    Problem(f"{where}.policy_type", "policy_type cannot be changed; give the new policy another name.")
                )
            if kind == "api" and "status" in fields:
                was, wanted = fields["status"]
                if wanted not in _API_REACHABLE[was]:
                    problems.append(Problem(f"{where}.status", f"an API that is {was} cannot become {wanted}."))
            secrets: frozenset[str] = frozenset()
            if kind == "policy":
                # What the document takes from a variable now, and what the stored policy took from one at apply.
                secrets = frozenset(document.get(REFERENCES, {}).get(key, {})) | frozenset(row.config_references or {})
            plan.changes.append(Change(UPDATE, kind, key, fields=fields, desired=item, row=row, secrets=secrets))
    if "consumers" in document and state.consumers is not None:
        _plan_consumers(plan, state, document, problems, source)
    if problems:
        raise ConfigError(source, problems)
    if prune:
        _plan_deletes(plan, state, document)
    return plan


def _plan_consumers(
    plan: ConfigPlan, state: TenantState, document: dict[str, Any], problems: list[Problem], source: str
) -> None:
    assert state.consumers is not None
    usernames = {c["owner"] for c in document["consumers"] if c["owner"]}
    user_model = get_user_model()
    # Owners the tenant may have (services.consumer_owner_check): its members and superusers. Anyone else gets the
    # same answer whether or not the name exists, so planning (viewers may) does not list the platform's users.
    known = set(
        user_model._default_manager.filter(**{f"{user_model.USERNAME_FIELD}__in": usernames})
        .filter(Q(is_superuser=True) | Q(memberships__tenant_id=state.tenant.pk))
        .values_list(user_model.USERNAME_FIELD, flat=True)
    )
    for item in document["consumers"]:
        key = consumer_key(item)
        where = f"consumers[{key}]"
        if item["owner"] and item["owner"] not in known:
            problems.append(Problem(f"{where}.owner", "The owner must be a member of this consumer's tenant."))
        current = state.consumers.get(key)
        if current is None:
            plan.changes.append(Change(CREATE, "consumer", key, desired=item))
        else:
            fields = _diff(current[0], item, skip=("subscriptions",))
            if fields:
                plan.changes.append(Change(UPDATE, "consumer", key, fields=fields, desired=item, row=current[1]))
        for sub in item["subscriptions"]:
            sub_key = f"{key} → {sub['api']}"
            existing = state.subscriptions.get((key, sub["api"]))
            desired = {**sub, "consumer": key}
            if existing is None:
                plan.changes.append(Change(CREATE, "subscription", sub_key, desired=desired))
                continue
            old = {"api": sub["api"], "plan": _plan_name(state, existing), "status": existing.status}
            fields = _diff(old, sub)
            if not fields:
                continue
            if (
                fields.get("status") == [Subscription.Status.ACTIVE, Subscription.Status.PENDING]
                and "plan" not in fields
            ):
                problems.append(
                    Problem(
                        f"{where}.subscriptions[{sub['api']}].status",
                        "an active subscription cannot go back to pending.",
                    )
                )
            plan.changes.append(Change(UPDATE, "subscription", sub_key, fields=fields, desired=desired, row=existing))


def _plan_name(state: TenantState, subscription: Subscription) -> str | None:
    if subscription.plan_id is None:
        return None
    for name, (_item, row) in state.plans.items():
        if row.pk == subscription.plan_id:
            return name
    return None


def _plan_deletes(plan: ConfigPlan, state: TenantState, document: dict[str, Any]) -> None:
    """What the document does not mention, each with the refusal its DELETE would meet after the other changes."""
    wanted = {
        section: {item["name"] for item in document[section]}
        for section in ("policies", "jwt_issuers", "plans", "apis")
    }
    deleted_consumers: set[str] = set()
    cancelled: set[str] = set()
    if "consumers" in document and state.consumers is not None:
        wanted_consumers = {consumer_key(c): c for c in document["consumers"]}
        for (consumer, api_name), subscription in sorted(state.subscriptions.items()):
            item = wanted_consumers.get(consumer)
            if item is not None and api_name not in {s["api"] for s in item["subscriptions"]}:
                cancelled.add(subscription.pk)
                plan.changes.append(Change(DELETE, "subscription", f"{consumer} → {api_name}", row=subscription))
        for key in sorted(set(state.consumers) - set(wanted_consumers)):
            consumer_row = state.consumers[key][1]
            deleted_consumers.add(consumer_row.pk)
            plan.changes.append(Change(DELETE, "consumer", key, row=consumer_row))
    kept_apis: list[str] = []  # deletes that are refused: these stay, with what they refer to
    deleted_apis: set[str] = set()
    for key in sorted(set(state.apis) - wanted["apis"]):
        api_row = state.apis[key][1]
        refusal = services.api_delete_refusal(api_row)
        if refusal:
            kept_apis.append(key)
        else:
            deleted_apis.add(api_row.pk)
        plan.changes.append(Change(DELETE, "api", key, refusal=refusal, row=api_row))
    kept_plans: list[str] = []
    for key in sorted(set(state.plans) - wanted["plans"]):
        plan_row = state.plans[key][1]
        # What plan_delete refuses for (open subscriptions on it, or scheduled to move to it), less what goes first.
        staying = Subscription.objects.exclude(pk__in=cancelled).exclude(api_id__in=deleted_apis)
        staying = staying.exclude(consumer_id__in=deleted_consumers)
        still = staying.open().filter(plan=plan_row).exists() or staying.filter(pending_plan=plan_row).exists()
        refusal = services.plan_delete_refusal(plan_row) if still else None
        if refusal:
            kept_plans.append(key)
        plan.changes.append(Change(DELETE, "plan", key, refusal=refusal, row=plan_row))
    # Who still uses each policy after the plan: only kept objects can (the document refers to its own policies).
    users_of: dict[str, list[str]] = {}
    for key in kept_apis:
        for name in state.apis[key][0]["policies"]:
            users_of.setdefault(name, []).append(f"API {key!r}")
    for key in kept_plans:
        for name in state.plans[key][0]["policies"]:
            users_of.setdefault(name, []).append(f"plan {key!r}")
    for key in sorted(set(state.policies) - wanted["policies"]):
        refusal = None
        if key in users_of:
            refusal = (
                f"Policy {key!r} stays attached to {', '.join(users_of[key])}, whose deletion is refused; "
                "detach it from them first, then delete it."
            )
        plan.changes.append(Change(DELETE, "policy", key, refusal=refusal, row=state.policies[key][1]))
    accepted_by: dict[str, list[str]] = {}
    for key in kept_apis:
        for name in state.apis[key][0]["jwt_issuers"]:
            accepted_by.setdefault(name, []).append(key)
    for key in sorted(set(state.jwt_issuers) - wanted["jwt_issuers"]):
        refusal = None
        if key in accepted_by:
            refusal = (
                f"JWT issuer {key!r} stays accepted by API(s) {', '.join(map(repr, accepted_by[key]))}, whose "
                "deletion is refused; take it off their jwt_issuers first, then delete it."
            )
        plan.changes.append(Change(DELETE, "jwt_issuer", key, refusal=refusal, row=state.jwt_issuers[key][1]))
