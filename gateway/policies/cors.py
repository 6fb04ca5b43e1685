"""cors: which browser origins may call an API, answered by the gateway before authentication.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) never needs a key and never reaches
the upstream. When the origin, the method and every requested header are allowed it gets ``204`` with
``Access-Control-Allow-Origin`` (the origin echoed; ``*`` only for an ``["*"]`` policy without credentials),
``-Allow-Methods``, ``-Allow-Headers`` (the requested ones), ``-Max-Age`` and, with credentials,
``-Allow-Credentials: true``. Otherwise it gets a ``403`` problem+json without any CORS header (a browser blocks
the actual request either way; the detail tells a developer which part was refused).

Any other request from an allowed origin with an allowed method gets ``Access-Control-Allow-Origin``,
``-Allow-Credentials`` and ``-Expose-Headers`` on its answer, whoever made it: the upstream, or the gateway's own
401, 403 or 429, so browser code can read why it was refused. A disallowed origin gets no CORS headers and the
request still goes on as usual. Every answer of the API carries ``Vary: Origin``, and CORS headers the upstream sent
itself are dropped, so a cache or a browser never sees two answers to the question.

Besides the policy's ``allow_headers``, a preflight may always ask for the CORS-safelisted request headers (Accept,
Accept-Language, Content-Language, Content-Type) and for the API's own credential header (its key header, and
Authorization where bearer tokens or JWTs are accepted): without those a browser could not call the API at all.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import cors as cors_config
from apimgmt.selectors import PolicySpec
from gateway import metrics
from gateway.chain import PRE_AUTH, Exchange, Result, Step
from gateway.problems import GatewayResponse, problem

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

POLICY_TYPE = "cors"

SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
_LABELS = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
# The CORS answer headers the gateway owns on an API with a cors policy: the upstream's own are dropped.
_CORS_RESPONSE_HEADERS = frozenset(
    {
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "access-control-max-age",
    }
)
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def is_preflight(environ: dict[str, Any]) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method (answered by a cors step, if any)."""
    return (
        environ.get("REQUEST_METHOD") == "OPTIONS"
        and "HTTP_ORIGIN" in environ
        and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
    )


class OriginMatcher:
    """Exact origins in a set, ``scheme://*.domain[:port]`` patterns in one regex, or any (``*``)."""

    __slots__ = ("any", "exact", "pattern")

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.exact = frozenset(o for o in origins if "*" not in o)
        patterns = []
        for origin in origins:
            if origin == "*" or "*" not in origin:
                continue
            scheme, _, rest = origin.partition("://*.")
            # One or more whole labels in front of the domain: https://a.b.example.com matches, example.com itself,
            # evil-example.com and example.com.evil.org do not.
            patterns.append(re.escape(scheme) + "://" + _LABELS + re.escape(rest))
        self.pattern = re.compile("(?:" + "|".join(patterns) + r")\Z") if patterns else None

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        return self.pattern is not None and self.pattern.match(origin) is not None


class Cors(Step):
    """The API's cors policy: preflights answered in pre_auth, CORS headers added to every other answer."""

    name = "cors"
    phase = PRE_AUTH
    has_response = True

    def __init__(self, config: dict[str, Any], route: Route) -> None:
        self.origins = OriginMatcher(config["allow_origins"])
        self.credentials = bool(config["allow_credentials"])
        if self.credentials and self.origins.any:
            # Never "*" with credentials (the validator refuses it; an older row may still say so): no credentials.
            logger.warning(
                "cors policy of API %s allows any origin with credentials; credentials dropped", route.api_id
            )
            self.credentials = False
        self.star = self.origins.any and not self.credentials  # answer "*" rather than the origin
        self.methods = frozenset(config["allow_methods"])
        self.methods_value = ", ".join(config["allow_methods"])
        allowed = [h.lower() for h in config["allow_headers"]]
        self.any_header = "*" in allowed and not self.credentials
        credential_headers = {route.spec.key_header.lower()}
        if route.spec.accept_bearer or route.auth_method != "key":
            credential_headers.add("authorization")
        self.headers = frozenset(allowed) | SAFELISTED_HEADERS | credential_headers
        self.expose_value = ", ".join(config["expose_headers"])
        self.max_age = str(config["max_age"])

    # -- preflight ----------------------------------------------------------------------------------------------

    def request(self, ex: Exchange) -> Result | None:
        environ = ex.environ
        if ex.method != "OPTIONS" or "HTTP_ACCESS_CONTROL_REQUEST_METHOD" not in environ:
            return None
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return None  # not a preflight: an OPTIONS request for the upstream
        requested_method = environ["HTTP_ACCESS_CONTROL_REQUEST_METHOD"].strip()
        requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
        names = [name.strip().lower() for name in requested.split(",") if name.strip()]
        refused = self._refused(origin, requested_method, names)
        if refused is not None:
            # api_policy_refusals_total: which check refused, in _refused's order (never the origin itself)
            why = (
                "origin"
                if not self.origins.allows(origin)
                else "method"
                if requested_method not in self.methods
                else "headers"
            )
            metrics.count_refusal(ex.route.tenant_id, ex.route.api_id, POLICY_TYPE, why)
            return ex.fail(
                problem(403, "cors-refused", "CORS preflight refused", refused, ex.request_id),
                [("Vary", _PREFLIGHT_VARY)],
            )
        headers = [("Access-Control-Allow-Origin", "*" if self.star else origin)]
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        headers.append(("Access-Control-Allow-Methods", self.methods_value))
        if names:
            headers.append(("Access-Control-Allow-Headers", ", ".join(names)))
        headers.append(("Access-Control-Max-Age", self.max_age))
        headers.append(("Vary", _PREFLIGHT_VARY))
        return ex.fail(GatewayResponse(status=204, headers=headers, body=b""))

    def _refused(self, origin: str, method: str, names: list[str]) -> str | None:
        """Why the preflight is refused, or None."""
        if not self.origins.allows(origin):
            return f"The origin {origin[:200]!r} may not call this API from a browser."
        if method not in self.methods:
            return f"{method[:50]!r} is not among the methods this API allows from a browser: {self.methods_value}."
        if not self.any_header:
            others = [name for name in names if name not in self.headers]
            if others:
                return f"This API does not allow the request header(s) {', '.join(others)[:500]} from a browser."
        return None

    # -- actual requests ----------------------------------------------------------------------------------------

    def response(self, ex: Exchange, result: Result) -> Result:
        environ = ex.environ
        if ex.method == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ and "HTTP_ORIGIN" in environ:
            return result  # the preflight's own answer, complete
        vary_origin = False
        upstream_cors = False
        for name, value in result.headers:
            initial = name[:1]
            if initial == "V" or initial == "v":
                if name.lower() == "vary":
                    tokens = {token.strip().lower() for token in value.split(",")}
                    if "origin" in tokens or "*" in tokens:
                        vary_origin = True
            elif (initial == "A" or initial == "a") and name.lower() in _CORS_RESPONSE_HEADERS:
                upstream_cors = True
        # A new list: the result's may be shared (a cached answer's, the route's extra headers).
        if upstream_cors:
            headers = [h for h in result.headers if h[0].lower() not in _CORS_RESPONSE_HEADERS]
        else:
            headers = list(result.headers)
        if not vary_origin:
            headers.append(("Vary", "Origin"))
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and ex.method in self.methods and self.origins.allows(origin):
            headers.append(("Access-Control-Allow-Origin", "*" if self.star else origin))
            if self.credentials:
                headers.append(("Access-Control-Allow-Credentials", "true"))
            if self.expose_value:
                headers.append(("Access-Control-Expose-Headers", self.expose_value))
        result.headers = headers
        return result


def _step(route: Route) -> Cors | None:
    step = route.chain.step(Cors.name)
    return step if isinstance(step, Cors) else None


def origin_allowed(route: Route, origin: str) -> bool:
    """Whether the API's cors policy lets a page of ``origin`` call it (True when the API has no cors policy)."""
    step = _step(route)
    return step is None or step.origins.allows(origin)


def answers_preflight(route: Route, environ: dict[str, Any]) -> bool:
    """Whether the request is a CORS preflight that the API's cors step answers (in pre_auth, before any key)."""
    return is_preflight(environ) and _step(route) is not None


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    """One Cors step from the API's cors policy (an API takes one; plans take none)."""
    if not policies:
        return []
    if len(policies) > 1:
        logger.warning("API %s has %d cors policies; only %r applies", route.api_id, len(policies), policies[0].name)
    policy = policies[0]
    try:
        config = cors_config.validate(dict(policy.config))
    except (ValidationError, TypeError, ValueError) as exc:
        # No step: no CORS headers, so browsers keep blocking cross-origin calls (the safe side).
        logger.error("cors policy %s (%s) is invalid and does not apply: %s", policy.name, policy.id, exc)
        return []
    return [Cors(config, route)]
