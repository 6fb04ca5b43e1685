"""ip_rules: allow and deny lists of CIDRs against the client address the gateway trusts (ex.client_ip).

Where each list is checked:

- an API's ip_rules policies: in ``pre_auth``, before any key or token is looked at;
- a plan's ip_rules policies: in ``access``, for that plan's subscribers;
- a consumer's and a key's own lists (``KeyRecord.consumer_ip_*``/``key_ip_*``): ``check_caller(ex)``, which the
  authenticate step calls only when the record carries lists (so an API whose callers have none pays nothing).

Every list stands on its own and all must pass: a deny entry that matches refuses (deny wins), and a non-empty
allow list refuses every address outside it. An IPv4-mapped IPv6 address (``::ffff:203.0.113.5``) is the IPv4
address it maps. An address the gateway cannot read (a Unix-socket peer) is refused by any list. The refusal is a
403 problem+json naming the address the gateway saw. A policy in shadow mode only logs what it would have refused.

A policy whose config cannot be compiled (an old or hand-edited row) fails closed: its requests get 503 until the
policy is fixed, instead of running without the rule. In shadow mode it only logs that (shadow never refuses).
"""

from __future__ import annotations

import ipaddress
import logging
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from apimgmt.selectors import PolicySpec
from gateway import metrics
from gateway.chain import ACCESS, PRE_AUTH, Exchange, Result, Step
from gateway.problems import GatewayResponse, problem

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

POLICY_TYPE = "ip_rules"

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# Parsed client addresses by their text: (version, integer), or None for text that is no address.
_ADDRESSES: dict[str, tuple[int, int] | None] = {}
_ADDRESS_CACHE_SIZE = 10_000


def parse_address(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer); IPv4-mapped IPv6 counts as IPv4; None when it is no address."""
    cached = _ADDRESSES.get(text, False)
    if cached is not False:
        return cached  # type: ignore[return-value]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0] if "%" in text else text)
    except ValueError:
        parsed = None
    else:
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        parsed = (ip.version, int(ip))
    if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
        _ADDRESSES.clear()
    _ADDRESSES[text] = parsed
    return parsed


class NetworkSet:
    """CIDRs compiled to sorted, merged integer ranges per IP version: a look-up is one binary search."""

    __slots__ = ("_ends", "_starts", "size")

    def __init__(self, cidrs: Iterable[str]) -> None:
        """Raises ValueError for an entry that is no network."""
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        count = 0
        for entry in cidrs:
            if not isinstance(entry, str):
                raise ValueError(f"{entry!r} is not a CIDR")
            network = ipaddress.ip_network(entry.strip(), strict=False)
            if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
                # ::ffff:10.0.0.0/104 is 10.0.0.0/8: client addresses are compared in their IPv4 form.
                network = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
            ranges[network.version].append((int(network.network_address), int(network.broadcast_address)))
            count += 1
        self.size = count
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, spans in ranges.items():
            merged: list[list[int]] = []
            for start, end in sorted(spans):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self._starts[version] = [span[0] for span in merged]
            self._ends[version] = [span[1] for span in merged]

    def __bool__(self) -> bool:
        return self.size > 0

    def contains(self, address: tuple[int, int]) -> bool:
        version, value = address
        starts = self._starts[version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[version][index]


class Rule:
    """One allow/deny pair: ``refuses(address)`` says why it refuses, or None."""

    __slots__ = ("allow", "deny", "label", "shadow")

    def __init__(self, label: str, allow: Iterable[str], deny: Iterable[str], *, shadow: bool = False) -> None:
        self.label = label  # "this API's IP rules (policy 'office')", "your key's IP rules", ...
        self.allow = NetworkSet(allow)
        self.deny = NetworkSet(deny)
        self.shadow = shadow

    def refuses(self, address: tuple[int, int] | None) -> str | None:
        if address is None:
            return "it is not an address the gateway can check"
        if self.deny and self.deny.contains(address):
            return "it is in the deny list"
        if self.allow and not self.allow.contains(address):
            return "it is not in the allow list"
        return None


class Unbuildable:
    """A policy whose config could not be compiled: its requests are refused with 503 (fail closed), unless it is in
    shadow mode (which never refuses: the error is logged when the route table loads)."""

    __slots__ = ("label", "shadow")

    def __init__(self, label: str, *, shadow: bool = False) -> None:
        self.label = label
        self.shadow = shadow


# Compiled policies, shared by every route of one route table (plans' PolicySpecs are the same objects).
_MEMO: dict[tuple[int, str], tuple[PolicySpec, Rule | Unbuildable]] = {}


def _compile(policy: PolicySpec, owner: str) -> Rule | Unbuildable:
    memo = _MEMO.get((id(policy), owner))
    if memo is not None and memo[0] is policy:
        return memo[1]
    rule = _compile_policy(policy, owner)
    if len(_MEMO) >= 10_000:
        _MEMO.clear()
    _MEMO[(id(policy), owner)] = (policy, rule)
    return rule


def _compile_policy(policy: PolicySpec, owner: str) -> Rule | Unbuildable:
    label = f"{owner} IP rules (policy {policy.name!r})"
    config = policy.config
    try:
        if not isinstance(config, dict):
            raise ValueError("config is not an object")
        allow, deny = config.get("allow") or [], config.get("deny") or []
        if not isinstance(allow, list) or not isinstance(deny, list) or not (allow or deny):
            raise ValueError("allow and deny must be lists of CIDRs, one of them non-empty")
        return Rule(label, allow, deny, shadow=policy.mode == "shadow")
    except ValueError as exc:
        logger.error(
            "ip_rules policy %s (%s) cannot be compiled, its requests get 503: %s", policy.name, policy.id, exc
        )
        return Unbuildable(label, shadow=policy.mode == "shadow")


def _check(ex: Exchange, rules: Sequence[Rule | Unbuildable]) -> Result | None:
    """The first refusal among ``rules`` as a Result (403, or 503 for an unbuildable one), else None."""
    address = parse_address(ex.client_ip)
    for rule in rules:
        if isinstance(rule, Unbuildable):
            if rule.shadow:
                continue
            metrics.count_refusal(ex.route.tenant_id, ex.route.api_id, POLICY_TYPE, "unavailable")
            return ex.fail(unavailable(ex, rule.label))
        reason = rule.refuses(address)
        if reason is None:
            continue
        _count(ex, rule, address)
        if rule.shadow:
            logger.info("shadow %s would have refused %s: %s", rule.label, ex.client_ip, reason)
            continue
        return ex.fail(refusal(ex, rule.label, reason))
    return None


def _count(ex: Exchange, rule: Rule, address: tuple[int, int] | None) -> None:
    """api_policy_refusals_total: why, as a fixed word in Rule.refuses' order (never the address itself)."""
    why = "unreadable" if address is None else "deny" if rule.deny and rule.deny.contains(address) else "not_allowed"
    mode = "shadow" if rule.shadow else "enforce"
    metrics.count_refusal(ex.route.tenant_id, ex.route.api_id, POLICY_TYPE, why, mode)


def refusal(ex: Exchange, label: str, reason: str) -> GatewayResponse:
    """403 naming the address the gateway saw (after trusted proxies) and the rule that refused it."""
    seen = ex.client_ip or "unknown"
    return problem(
        403,
        "ip-refused",
        "Forbidden",
        f"Requests from {seen} are refused by {label}: {reason}.",
        ex.request_id,
        extra={"client_ip": seen},
    )


def unavailable(ex: Exchange, label: str) -> GatewayResponse:
    return problem(
        503,
        "ip-rules-unavailable",
        "Service unavailable",
        f"{label[0].upper()}{label[1:]} cannot be applied; requests are refused until they are fixed.",
        ex.request_id,
        headers=[("Retry-After", "60")],
    )


class ApiRules(Step):
    """The API's own ip_rules, before authentication."""

    name = "ip_rules"
    phase = PRE_AUTH

    def __init__(self, rules: list[Rule | Unbuildable]) -> None:
        self.rules = rules

    def request(self, ex: Exchange) -> Result | None:
        return _check(ex, self.rules)


class PlanRules(Step):
    """The ip_rules of the caller's plan (for this API), once the caller is known."""

    name = "ip_rules_plan"
    phase = ACCESS

    def __init__(self, by_plan: dict[str, list[Rule | Unbuildable]]) -> None:
        self.by_plan = by_plan

    def request(self, ex: Exchange) -> Result | None:
        plan_id = ex.plan_id
        if not plan_id and ex.record is not None:
            plan_id = ex.record.subscriptions.get(ex.route.api_id, "")
        rules = self.by_plan.get(plan_id) if plan_id else None
        if rules is None:
            return None
        return _check(ex, rules)


# The plans' step of the last route table: every route of one table gets the same plan_policies mapping, and the
# step holds nothing of a route's, so the routes share it.
_PLAN_STEP: tuple[dict[str, list[PolicySpec]], PlanRules | None] | None = None


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    global _PLAN_STEP
    steps: list[Step] = []
    if policies:
        steps.append(ApiRules([_compile(policy, "this API's") for policy in policies]))
    if plan_policies:
        if _PLAN_STEP is None or _PLAN_STEP[0] is not plan_policies:
            by_plan = {
                plan_id: [_compile(policy, "your plan's") for policy in specs]
                for plan_id, specs in plan_policies.items()
                if specs
            }
            _PLAN_STEP = (plan_policies, PlanRules(by_plan) if by_plan else None)
        if _PLAN_STEP[1] is not None:
            steps.append(_PLAN_STEP[1])
    return steps


# -- the caller's own lists --------------------------------------------------------------------------------------

_CALLER_RULES: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Rule | Unbuildable] = {}
_CALLER_CACHE_SIZE = 10_000


def _caller_rule(label: str, allow: tuple[str, ...], deny: tuple[str, ...]) -> Rule | Unbuildable:
    cache_key = (label, allow, deny)
    rule = _CALLER_RULES.get(cache_key)
    if rule is None:
        try:
            rule = Rule(label, allow, deny)
        except ValueError as exc:
            logger.error("%s IP list cannot be compiled, its requests get 503: %s", label, exc)
            rule = Unbuildable(label)
        if len(_CALLER_RULES) >= _CALLER_CACHE_SIZE:
            _CALLER_RULES.clear()
        _CALLER_RULES[cache_key] = rule
    return rule


def has_caller_lists(ex: Exchange) -> bool:
    """Whether the authenticated caller's consumer or key carries IP lists (the check costs nothing otherwise)."""
    record = ex.record
    return record is not None and bool(
        record.consumer_ip_allow or record.consumer_ip_deny or record.key_ip_allow or record.key_ip_deny
    )


def check_caller(ex: Exchange) -> Result | None:
    """The consumer's and the key's own IP lists against ex.client_ip: a 403 Result, or None.

    Called by the authenticate step once ex.record is set (cheap when the record has no lists: four attribute
    reads). The consumer's lists are checked first, then the key's; both must pass.
    """
    record = ex.record
    if record is None:
        return None
    rules: list[Rule | Unbuildable] = []
    if record.consumer_ip_allow or record.consumer_ip_deny:
        rules.append(_caller_rule("your app's IP rules", record.consumer_ip_allow, record.consumer_ip_deny))
    if record.key_ip_allow or record.key_ip_deny:
        rules.append(_caller_rule("your key's IP rules", record.key_ip_allow, record.key_ip_deny))
    if not rules:
        return None
    return _check(ex, rules)
