"""A tenant's configuration as it is now: the canonical document (what ``export`` writes) and the rows behind it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Prefetch

from apimgmt.config_doc.document import (
    API_FIELDS,
    API_MODEL_FIELD,
    API_MOMENTS,
    FORMAT,
    JWT_ISSUER_FIELDS,
    Problem,
    canonical_api,
    canonical_consumer,
    canonical_jwt_issuer,
    canonical_plan,
    canonical_policy,
    consumer_key,
    format_datetime,
)
from apimgmt.models import (
    Api,
    Consumer,
    ConsumerIdentity,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    UpstreamTarget,
)


@dataclass
class TenantState:
    """The tenant's objects keyed as in the document, with their canonical form and their rows."""

    tenant: Tenant
    policies: dict[str, tuple[dict[str, Any], Policy]] = field(default_factory=dict)
    jwt_issuers: dict[str, tuple[dict[str, Any], JwtIssuer]] = field(default_factory=dict)
    plans: dict[str, tuple[dict[str, Any], Plan]] = field(default_factory=dict)
    apis: dict[str, tuple[dict[str, Any], Api]] = field(default_factory=dict)
    consumers: dict[str, tuple[dict[str, Any], Consumer]] | None = None
    # Open subscriptions by (consumer key, API name).
    subscriptions: dict[tuple[str, str], Subscription] = field(default_factory=dict)
    # Consumer identities by (consumer key, issuer name, external id).
    identities: dict[tuple[str, str, str], ConsumerIdentity] = field(default_factory=dict)
    # Names the document cannot key because two rows share them ("APIs named 'x'"), for a precise refusal.
    ambiguous: list[Problem] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"format": FORMAT}
        for section in ("policies", "jwt_issuers", "plans", "apis"):
            rows: dict[str, tuple[dict[str, Any], Any]] = getattr(self, section)
            document[section] = [rows[key][0] for key in sorted(rows)]
        if self.consumers is not None:
            ordered = sorted(self.consumers.values(), key=lambda c: (c[0]["owner"] or "", c[0]["name"]))
            document["consumers"] = [item for item, _row in ordered]
        return document

    def fingerprint(self) -> str:
        """A digest of everything read: two states with the same fingerprint would give the same plan."""
        body = json.dumps(self.document(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _keyed(state: TenantState, section: str, rows: list[tuple[str, dict[str, Any], Any]], what: str) -> dict[str, Any]:
    keyed: dict[str, tuple[dict[str, Any], Any]] = {}
    for key, item, row in rows:
        if key in keyed:
            state.ambiguous.append(
                Problem(f"{section}[{key}]", f"the tenant has more than one {what} named {key!r}; rename one first.")
            )
        keyed[key] = (item, row)
    return keyed


def read_state(tenant: Tenant, *, consumers: bool, lock: bool = False) -> TenantState:
    """Read the tenant's policies, plans and APIs (and consumers with their open subscriptions when asked).

    ``lock`` takes row locks (inside a transaction): an edit made meanwhile in the admin or the management API waits
    for the apply to finish rather than being overwritten or slipping between the check and the write.
    """
    state = TenantState(tenant=tenant)

    def rows(queryset: Any) -> Any:
        return queryset.select_for_update(of=("self",)) if lock else queryset

    policies = list(rows(Policy.objects.filter(tenant=tenant)).order_by("name", "pk"))
    policy_names = {p.pk: p.name for p in policies}
    state.policies = _keyed(
        state,
        "policies",
        [
            (
                p.name,
                canonical_policy(
                    {
                        "name": p.name,
                        "description": p.description,
                        "policy_type": p.policy_type,
                        "mode": p.mode,
                        "on_store_error": p.on_store_error,
                        "config": p.config,
                    }
                ),
                p,
            )
            for p in policies
        ],
        "policy",
    )
    issuers = list(rows(JwtIssuer.objects.filter(tenant=tenant)).order_by("name", "pk"))
    issuer_names = {i.pk: i.name for i in issuers}
    state.jwt_issuers = _keyed(
        state,
        "jwt_issuers",
        [(i.name, canonical_jwt_issuer({name: getattr(i, name) for name in JWT_ISSUER_FIELDS}), i) for i in issuers],
        "JWT issuer",
    )
    plan_policies = _links(Plan.policies.through, "plan_id", "policy_id", plan__tenant=tenant)
    plans = list(rows(Plan.objects.filter(tenant=tenant)).order_by("name", "pk"))
    plan_names = {p.pk: p.name for p in plans}
    state.plans = _keyed(
        state,
        "plans",
        [
            (
                p.name,
                canonical_plan(
                    {
                        "name": p.name,
                        "description": p.description,
                        "approval": p.approval,
                        "archived": p.archived_at is not None,
                        "policies": [policy_names[i] for i in plan_policies.get(p.pk, [])],
                        "websocket_max_connections": p.websocket_max_connections,
                    }
                ),
                p,
            )
            for p in plans
        ],
        "plan",
    )
    api_policies = _links(Api.policies.through, "api_id", "policy_id", api__tenant=tenant)
    api_plans = _links(Api.plans.through, "api_id", "plan_id", api__tenant=tenant)
    api_issuers = _links(Api.jwt_issuers.through, "api_id", "jwtissuer_id", api__tenant=tenant)
    targets: dict[str, list[dict[str, Any]]] = {}
    for api_id, url, weight in UpstreamTarget.objects.filter(api__tenant=tenant).values_list("api_id", "url", "weight"):
        targets.setdefault(api_id, []).append({"url": url, "weight": weight})
    apis = list(rows(Api.objects.filter(tenant=tenant)).order_by("api_name", "pk"))
    state.apis = _keyed(
        state,
        "apis",
        [
            (
                a.api_name,
                canonical_api(
                    {
                        **{field: getattr(a, API_MODEL_FIELD.get(field, field)) for field in _API_COLUMNS},
                        **{field: format_datetime(getattr(a, field)) for field in API_MOMENTS},
                        "targets": targets.get(a.pk, []),
                        "policies": [policy_names[i] for i in api_policies.get(a.pk, [])],
                        "plans": [plan_names[i] for i in api_plans.get(a.pk, [])],
                        "jwt_issuers": [issuer_names[i] for i in api_issuers.get(a.pk, [])],
                    }
                ),
                a,
            )
            for a in apis
        ],
        "API",
    )
    if consumers:
        _read_consumers(state, rows, plan_names, issuer_names)
    return state


# The API's document fields that are plain columns of its row.
_API_COLUMNS = tuple(name for name in API_FIELDS if name not in ("targets", "policies", "plans"))


def _links(through: Any, left: str, right: str, **tenant_filter: Any) -> dict[str, list[str]]:
    """A many-to-many table of the tenant as {left id: [right ids]} in one query."""
    links: dict[str, list[str]] = {}
    for a, b in through.objects.filter(**tenant_filter).values_list(left, right):
        links.setdefault(a, []).append(b)
    return links


def _read_consumers(state: TenantState, rows: Any, plan_names: dict[str, str], issuer_names: dict[str, str]) -> None:
    open_subscriptions = Prefetch(
        "subscriptions", queryset=Subscription.objects.open().select_related("api"), to_attr="open_subscriptions"
    )
    consumers = list(
        rows(Consumer.objects.filter(tenant=state.tenant))
        .select_related("owner")
        .prefetch_related(open_subscriptions, "identities")
    )
    keyed_rows = []
    for consumer in consumers:
        owner = consumer.owner.get_username() if consumer.owner is not None else None
        subscriptions = [
            {
                "api": s.api.api_name,
                "plan": plan_names.get(s.plan_id) if s.plan_id else None,
                "status": s.status,
            }
            for s in consumer.open_subscriptions
        ]
        item = canonical_consumer(
            {
                "name": consumer.name,
                "owner": owner,
                "description": consumer.description,
                "status": consumer.status,
                "ip_allow": consumer.ip_allow,
                "ip_deny": consumer.ip_deny,
                "identities": [
                    {"issuer": issuer_names[i.issuer_id], "external_id": i.external_id}
                    for i in consumer.identities.all()
                ],
                "subscriptions": subscriptions,
            }
        )
        key = consumer_key(item)
        keyed_rows.append((key, item, consumer))
        for identity in consumer.identities.all():
            state.identities[(key, issuer_names[identity.issuer_id], identity.external_id)] = identity
        for s in consumer.open_subscriptions:
            state.subscriptions[(key, s.api.api_name)] = s
    state.consumers = _keyed(state, "consumers", keyed_rows, "consumer")
