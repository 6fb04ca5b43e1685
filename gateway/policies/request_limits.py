"""request_limits: the methods an API answers (405), its body size (413) and its header count and size (431).

A method-override header (``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``) must name an
allowed method too, or the request gets 405: many frameworks run a POST carrying one as the method it names.
All checks run in ``pre_auth``: a request over a limit is refused before any key look-up and before the upstream
hears of it. ``max_body_bytes`` refuses a ``Content-Length`` over the cap at once; a chunked body (no length) is
counted while it streams and cut off with 413 as soon as it crosses the cap (the step leaves the cap in
``ex.state["max_body_bytes"]`` for the proxy step, which applies the smaller of it and the gateway's own
MAX_BODY_BYTES). ``max_headers`` and ``max_header_bytes`` count the request's header fields as the server hands
them over: a name sent twice arrives joined into one field, and a field's size is its name, ": ", its value and
the line end. A policy in shadow mode only logs what it would have refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import request_limits as limits_config
from apimgmt.selectors import PolicySpec
from gateway import metrics
from gateway.chain import PRE_AUTH, Exchange, Result, Step
from gateway.problems import GatewayResponse, problem

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

POLICY_TYPE = "request_limits"
STATE_KEY = "max_body_bytes"  # ex.state[STATE_KEY]: this API's body cap, read by the proxy step
# Headers with which many frameworks run a POST as another method: what they name must be allowed as well.
METHOD_OVERRIDES = (
    ("HTTP_X_HTTP_METHOD_OVERRIDE", "X-HTTP-Method-Override"),
    ("HTTP_X_HTTP_METHOD", "X-HTTP-Method"),
    ("HTTP_X_METHOD_OVERRIDE", "X-Method-Override"),
)


class RequestLimits(Step):
    name = "request_limits"
    phase = PRE_AUTH

    def __init__(self, config: dict[str, Any], *, shadow: bool = False) -> None:
        methods = config.get("allowed_methods")
        self.methods = frozenset(methods) if methods else None
        self.allow_value = ", ".join(methods) if methods else ""
        self.max_body: int | None = config.get("max_body_bytes")
        self.max_headers: int | None = config.get("max_headers")
        self.max_header_bytes: int | None = config.get("max_header_bytes")
        self.count_headers = self.max_headers is not None or self.max_header_bytes is not None
        self.shadow = shadow

    def request(self, ex: Exchange) -> Result | None:
        refusal = self._refusal(ex)
        if refusal is None:
            return None
        why = metrics.REQUEST_LIMIT_REASONS.get(refusal.status, "other")  # api_policy_refusals_total
        route = ex.route
        metrics.count_refusal(route.tenant_id, route.api_id, POLICY_TYPE, why, "shadow" if self.shadow else "enforce")
        if self.shadow:
            logger.info("shadow request_limits of API %s would have answered %d", ex.route.api_id, refusal.status)
            return None
        return ex.fail(refusal)

    def _refusal(self, ex: Exchange) -> GatewayResponse | None:
        if self.methods is not None and ex.method not in self.methods:
            return problem(
                405,
                "method-not-allowed",
                "Method not allowed",
                f"This API does not answer {ex.method[:50]}; it allows {self.allow_value}.",
                ex.request_id,
                headers=[("Allow", self.allow_value)],
            )
        environ = ex.environ
        if self.methods is not None:
            refused = self._override_refusal(ex, environ)
            if refused is not None:
                return refused
        if self.count_headers:
            refused = self._headers_refusal(ex, environ)
            if refused is not None:
                return refused
        cap = self.max_body
        if cap is not None:
            length = environ.get("CONTENT_LENGTH")
            if length:
                try:
                    over = int(length) > cap
                except ValueError:
                    over = False  # the proxy step answers 400 for a length that is no number
                if over:
                    return too_large(cap, ex.request_id)
            if not self.shadow:
                if ex.state is None:
                    ex.state = {}
                ex.state[STATE_KEY] = cap
        return None

    def _override_refusal(self, ex: Exchange, environ: dict[str, Any]) -> GatewayResponse | None:
        """405 when a method-override header names a method outside the list (the upstream may run that method)."""
        assert self.methods is not None
        for key, name in METHOD_OVERRIDES:
            value = environ.get(key)
            if value is None:
                continue
            method = value.strip().upper()
            if method not in self.methods:
                return problem(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    f"{name} asks for {method[:50]}; this API allows {self.allow_value}.",
                    ex.request_id,
                    headers=[("Allow", self.allow_value)],
                )
        return None

    def _headers_refusal(self, ex: Exchange, environ: dict[str, Any]) -> GatewayResponse | None:
        count = 0
        size = 0
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name_length = len(key) - 5
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                name_length = len(key)
            else:
                continue
            count += 1
            size += name_length + len(value) + 4  # "Name: value\r\n"
        if self.max_headers is not None and count > self.max_headers:
            detail = f"The request has {count} header fields; this API takes at most {self.max_headers}."
        elif self.max_header_bytes is not None and size > self.max_header_bytes:
            detail = f"The request's header fields take {size} bytes; this API takes at most {self.max_header_bytes}."
        else:
            return None
        return problem(431, "headers-too-large", "Request header fields too large", detail, ex.request_id)


def too_large(cap: int, request_id: str) -> GatewayResponse:
    return problem(
        413,
        "body-too-large",
        "Request body too large",
        f"The request body may be at most {cap} bytes for this API.",
        request_id,
    )


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    """One step from the API's request_limits policy (an API takes one; plans take none)."""
    if not policies:
        return []
    if len(policies) > 1:
        logger.warning(
            "API %s has %d request_limits policies; only %r applies", route.api_id, len(policies), policies[0].name
        )
    policy = policies[0]
    try:
        config = limits_config.validate(dict(policy.config))
    except (ValidationError, TypeError, ValueError) as exc:
        logger.error("request_limits policy %s (%s) is invalid and does not apply: %s", policy.name, policy.id, exc)
        return []
    return [RequestLimits(config, shadow=policy.mode == "shadow")]
