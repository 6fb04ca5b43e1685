"""headers: request headers edited on the way to the upstream, response headers on the way back.

Each side of a policy runs its operations in this order: ``remove`` (every field of that name, any case), then
``set`` (replaces the field, or adds it), then ``add`` (only when no field of that name is there yet: it never
overrides what the client or the upstream sent). An API's own headers policies run first (in name order), then
those of the caller's plan, so a plan's ``set`` wins.

Request transforms (phase ``request_transforms``) edit ``ex.upstream_headers`` once the caller is authenticated and
within its limits. Response transforms (phase ``response_transforms``) edit the upstream's answer, or a cached one
replayed by the response cache (a templated value is rendered again for a hit, so no caller gets another's); the
gateway's own answers (errors such as 401/403/429/502, CORS preflights) are left as they are.

Values are templates rendered per request: ``{consumer_id}``, ``{key_id}``, ``{tenant_id}``, ``{api_id}``,
``{request_id}``, ``{client_ip}``, ``{jwt.<claim>}`` (a dotted path into the verified token's claims). A value that
needs something the request does not have (a JWT claim of a key-authenticated call, a claim that is an object) is
not written. A rendered value with a control character, CR/LF or anything outside printable ASCII (a token's claim
is the caller's text) is not written either: it never reaches the upstream or the client. Names and literal values
were checked when the policy was saved (apimgmt.policy_types.headers); they are checked again here, and an invalid
policy (an old row) is left out of the route, with an error in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import headers as headers_config
from apimgmt.selectors import PolicySpec
from gateway.chain import REQUEST_TRANSFORMS, RESPONSE_TRANSFORMS, Exchange, Result, Step

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

POLICY_TYPE = "headers"

MAX_RENDERED = 8192
_UNSAFE = re.compile(r"[^\t\x20-\x7e]")
_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")

Getter = Callable[[Exchange], str | None]


class Template:
    """A value with templates: literal parts and getters. Only values with a JWT claim (the caller's text) need the
    run-time check: the other templates are ids the gateway made, a validated request id, or an address."""

    __slots__ = ("check", "parts")

    def __init__(self, parts: tuple[str | Getter, ...], check: bool) -> None:
        self.parts = parts
        self.check = check


Value = str | Template  # a literal, or a template


def _claim(path: str) -> Getter:
    keys = path.split(".")

    def get(ex: Exchange) -> str | None:
        value: Any = ex.claims
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            return ",".join(str(v) for v in value)  # e.g. "aud" or a list of scopes
        return None

    return get


def _record_field(name: str) -> Getter:
    def get(ex: Exchange) -> str | None:
        record = ex.record
        value = getattr(record, name, None) if record is not None else None
        return value or None

    return get


_TEMPLATES: dict[str, Getter] = {
    "consumer_id": _record_field("consumer_id"),
    "key_id": _record_field("key_id"),
    "tenant_id": lambda ex: ex.route.tenant_id,
    "api_id": lambda ex: ex.route.api_id,
    "request_id": lambda ex: ex.request_id,
    "client_ip": lambda ex: ex.client_ip or None,
}


def compile_value(text: str) -> Value:
    """A literal (braces unescaped) or a tuple of literal parts and getters; ValueError for an unknown template."""
    if "{" not in text and "}" not in text:
        return text
    parts: list[str | Getter] = []
    literal: list[str] = []
    position = 0
    check = False
    for match in _PART.finditer(text):
        literal.append(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        name = match.group(1)
        getter = _TEMPLATES.get(name) or (_claim(name[4:]) if name.startswith("jwt.") and len(name) > 4 else None)
        if getter is None:
            raise ValueError(f"unknown template {{{name}}}")
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(getter)
        check = check or name.startswith("jwt.")
    literal.append(text[position:])
    if "".join(literal):
        parts.append("".join(literal))
    if all(isinstance(part, str) for part in parts):
        return "".join(part for part in parts if isinstance(part, str))
    return Template(tuple(parts), check)


def render(value: Value, ex: Exchange) -> str | None:
    """The value for this request, or None when a template has nothing to give or the result is unsafe."""
    if isinstance(value, str):
        return value
    out: list[str] = []
    for part in value.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        piece = part(ex)
        if not piece:
            return None
        out.append(piece)
    text = "".join(out)
    if value.check and (len(text) > MAX_RENDERED or _UNSAFE.search(text)):
        logger.warning(
            "a header template rendered an unsafe value for API %s (request %s); the header is not written",
            ex.route.api_id,
            ex.request_id,
        )
        return None
    return text


class Operations:
    """One side (request or response) of one policy, compiled.

    A name is in at most one of remove, set and add (the validator's rule), so one pass over the existing fields
    finds both what goes and which added names are already there. Only names whose first letter is one of the
    policy's are lower-cased.
    """

    __slots__ = ("add", "add_names", "drop", "initials", "replay_drop", "set")

    def __init__(self, side: dict[str, Any]) -> None:
        self.set = [(name, compile_value(v)) for name, v in side["set"].items()]
        self.add = [(name, name.lower(), compile_value(v)) for name, v in side["add"].items()]
        self.drop = frozenset(name.lower() for name in side["remove"]) | {name.lower() for name, _ in self.set}
        self.add_names = frozenset(lower for _, lower, _ in self.add)
        # A cached answer's templated adds were rendered for another request: on a hit they are replaced (as set).
        self.replay_drop = self.drop | {lower for _, lower, value in self.add if not isinstance(value, str)}
        names = self.replay_drop | self.add_names
        self.initials = frozenset(c for name in names for c in (name[:1], name[:1].upper()))

    def __bool__(self) -> bool:
        return bool(self.drop or self.add)

    def apply_request(self, ex: Exchange, headers: dict[str, str]) -> None:
        """Edit the upstream request's headers (a dict whose names come in any case)."""
        drop, add_names, initials = self.drop, self.add_names, self.initials
        doomed: list[str] = []
        present: set[str] = set()
        for name in headers:
            if name[:1] in initials:
                lower = name.lower()
                if lower in drop:
                    doomed.append(name)
                elif lower in add_names:
                    present.add(lower)
        for name in doomed:
            del headers[name]
        for name, value in self.set:
            rendered = value if value.__class__ is str else render(value, ex)
            if rendered is not None:
                headers[name] = rendered
        for name, lower, value in self.add:
            if lower not in present:
                rendered = value if value.__class__ is str else render(value, ex)
                if rendered is not None:
                    headers[name] = rendered

    def apply_response(self, ex: Exchange, headers: list[tuple[str, str]], replay: bool) -> list[tuple[str, str]]:
        """The answer's headers edited (a new list; the old one may be shared)."""
        drop = self.replay_drop if replay else self.drop
        add_names, initials = self.add_names, self.initials
        kept: list[tuple[str, str]] = []
        present: set[str] = set()
        for field in headers:
            if field[0][:1] in initials:
                lower = field[0].lower()
                if lower in drop:
                    continue
                if lower in add_names:
                    present.add(lower)
            kept.append(field)
        for name, value in self.set:
            rendered = value if value.__class__ is str else render(value, ex)
            if rendered is not None:
                kept.append((name, rendered))
        for name, lower, value in self.add:
            if lower not in present:
                rendered = value if value.__class__ is str else render(value, ex)
                if rendered is not None:
                    kept.append((name, rendered))
        return kept


def _plan_id(ex: Exchange) -> str:
    if ex.plan_id:
        return ex.plan_id
    record = ex.record
    return record.subscriptions.get(ex.route.api_id, "") if record is not None else ""


class RequestHeaders(Step):
    name = "headers_request"
    phase = REQUEST_TRANSFORMS

    def __init__(self, own: list[Operations], by_plan: dict[str, list[Operations]]) -> None:
        self.own = own
        self.by_plan = by_plan

    def request(self, ex: Exchange) -> Result | None:
        headers = ex.upstream_headers
        for ops in self.own:
            ops.apply_request(ex, headers)
        if self.by_plan:
            for ops in self.by_plan.get(_plan_id(ex), ()):
                ops.apply_request(ex, headers)
        return None


class ResponseHeaders(Step):
    name = "headers_response"
    phase = RESPONSE_TRANSFORMS
    has_response = True

    def __init__(self, own: list[Operations], by_plan: dict[str, list[Operations]]) -> None:
        self.own = own
        self.by_plan = by_plan

    def response(self, ex: Exchange, result: Result) -> Result:
        replay = False
        if ex.done.upstream_s is None:
            cached = ex.state.get("response_cache") if ex.state else None
            replay = bool(getattr(cached, "hit", False))
            if not replay:
                return result  # the gateway's own answer
        headers = result.headers
        for ops in self.own:
            headers = ops.apply_response(ex, headers, replay)
        if self.by_plan:
            for ops in self.by_plan.get(_plan_id(ex), ()):
                headers = ops.apply_response(ex, headers, replay)
        result.headers = headers
        return result


# Compiled plan policies, shared by every route of one route table (plans' PolicySpecs are the same objects).
_MEMO: dict[tuple[int, str], tuple[PolicySpec, tuple[Operations, Operations] | None]] = {}


def _compile(policy: PolicySpec, route: Route) -> tuple[Operations, Operations] | None:
    memo_key = (id(policy), route.spec.key_header.lower())
    memo = _MEMO.get(memo_key)
    if memo is not None and memo[0] is policy:
        return memo[1]
    compiled = _compile_policy(policy, route)
    if len(_MEMO) >= 10_000:
        _MEMO.clear()
    _MEMO[memo_key] = (policy, compiled)
    return compiled


def _compile_policy(policy: PolicySpec, route: Route) -> tuple[Operations, Operations] | None:
    """The policy's request and response operations, or None (logged) when its config is not valid."""
    try:
        config = headers_config.validate(dict(policy.config))
        credential = route.spec.key_header.lower()
        for side in ("request", "response"):
            ops = config[side]
            for name in [*ops["add"], *ops["set"], *ops["remove"]]:
                if name.lower() == credential:
                    raise ValueError(f"{side} names {name!r}, the API's key header")
        return Operations(config["request"]), Operations(config["response"])
    except (ValidationError, TypeError, ValueError) as exc:
        logger.error("headers policy %s (%s) is invalid and does not apply: %s", policy.name, policy.id, exc)
        return None


PlanSides = tuple[dict[str, list[Operations]], dict[str, list[Operations]]]
# The plans' operations of the last route table, by the API key header they were checked against: every route of
# one table gets the same plan_policies mapping, so the routes share them.
_PLAN_SIDES: tuple[dict[str, list[PolicySpec]], dict[str, PlanSides]] | None = None


def _plan_sides(route: Route, plan_policies: dict[str, list[PolicySpec]]) -> PlanSides:
    global _PLAN_SIDES
    if _PLAN_SIDES is None or _PLAN_SIDES[0] is not plan_policies:
        _PLAN_SIDES = (plan_policies, {})
    key_header = route.spec.key_header.lower()
    sides = _PLAN_SIDES[1].get(key_header)
    if sides is None:
        request: dict[str, list[Operations]] = {}
        response: dict[str, list[Operations]] = {}
        for plan_id, specs in plan_policies.items():
            for compiled in (_compile(p, route) for p in specs):
                if compiled is None:
                    continue
                if compiled[0]:
                    request.setdefault(plan_id, []).append(compiled[0])
                if compiled[1]:
                    response.setdefault(plan_id, []).append(compiled[1])
        sides = _PLAN_SIDES[1][key_header] = (request, response)
    return sides


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    """A request step and a response step, each only when some policy (the API's or a plan's) has that side."""
    own = [ops for ops in (_compile(p, route) for p in policies) if ops is not None]
    plans: PlanSides = _plan_sides(route, plan_policies) if plan_policies else ({}, {})
    steps: list[Step] = []
    for index, step_class in ((0, RequestHeaders), (1, ResponseHeaders)):
        side_own = [pair[index] for pair in own if pair[index]]
        if side_own or plans[index]:
            steps.append(step_class(side_own, plans[index]))
    return steps
