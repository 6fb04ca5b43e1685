"""The gateway's order of work as a chain of named steps, and the per-route chains built from an API's policies.

One request passes these phases, in this order (``PHASES``):

    route                the API by host and base path; restrict_to_spec's operation check      (gateway.pipeline)
    pre_auth             policies that need no caller: CORS preflight, request limits, API IP rules
    authenticate         the API key, or a JWT from an accepted issuer                          (gateway.pipeline)
    access               policies that need the caller: consumer/key/plan IP rules, request validation
    limits               rate limits and quotas in Redis                                        (gateway.pipeline)
    request_transforms   header transforms on the way to the upstream (they shape only what the upstream hears)
    cache_lookup         a cached response answers without the upstream
    proxy                the upstream call                                                      (gateway.pipeline)
    cache_store          a cacheable answer is kept, as the upstream gave it
    response_transforms  header transforms on the way back, on every answer (a cache hit too)
    record               metrics, access log, usage event                                       (gateway.pipeline)

The cache keeps the upstream's answer before the response transforms, and the transforms run on each answer, a hit
included: a header made from the request (its id, the caller) is then always the current request's, never the one
of the request that filled the cache.

The fixed steps (route, authenticate, limits, proxy, record) are the Gateway's own methods. Everything a policy does
is a ``Step`` that a module in ``gateway.policies`` builds for one route from that API's policies of its type (adding a
policy type means adding one module there). A route's ``Chain`` holds only the steps its policies asked for: an API
without policies of a type pays nothing for that type.

A step of a request phase (pre_auth .. cache_lookup) has its ``request`` run in its phase, and may end the request by
returning a ``Result`` (an error, a preflight answer or a cache hit). Every such step whose ``request`` ran, if it set
``has_response``, then gets the final ``Result`` in its ``response``, whatever answered: the upstream, a later step or
the gateway's own error (so CORS headers reach a browser on a 401 or a 429 as well). A step of a response phase
(cache_store, response_transforms) has no ``request``: its ``response`` sees every answer of its route, and it decides
itself what to leave alone (``result.status_code``; ``ex.done.upstream_s`` is None when the upstream was not asked).
The answer passes the ``response`` methods in phase order. A response transform runs on a cache hit as on a miss.

The first cache_lookup step may read its Redis key in the limits step's own write (``Step.reads_with_limits``): the
limiter's round trip brings the cached answer with the decision, and a hit ends the request in the limits step,
before the request transforms and the upstream request are prepared (both only shape what the upstream would hear).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from apimgmt.selectors import PolicySpec
from gateway.problems import GatewayResponse, status_line

if TYPE_CHECKING:
    from apimgmt.selectors import KeyRecord
    from gateway.auth import Credential
    from gateway.pipeline import Gateway
    from gateway.routing import Route

logger = logging.getLogger(__name__)

ROUTE = "route"
PRE_AUTH = "pre_auth"
AUTHENTICATE = "authenticate"
ACCESS = "access"
LIMITS = "limits"
REQUEST_TRANSFORMS = "request_transforms"
CACHE_LOOKUP = "cache_lookup"
PROXY = "proxy"
RESPONSE_TRANSFORMS = "response_transforms"
CACHE_STORE = "cache_store"
RECORD = "record"

PHASES = (
    ROUTE,
    PRE_AUTH,
    AUTHENTICATE,
    ACCESS,
    LIMITS,
    REQUEST_TRANSFORMS,
    CACHE_LOOKUP,
    PROXY,
    CACHE_STORE,
    RESPONSE_TRANSFORMS,
    RECORD,
)
# The phases a policy step may declare: the others are the gateway's own.
POLICY_PHASES = frozenset({PRE_AUTH, ACCESS, REQUEST_TRANSFORMS, CACHE_LOOKUP, RESPONSE_TRANSFORMS, CACHE_STORE})
_ORDER = {phase: index for index, phase in enumerate(PHASES)}


class Finished:
    """What the access log, metrics and usage event need once a response is complete."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "key",
        "method",
        "record",
        "request_id",
        "route",
        "started",
        "status",
        "upstream_s",
    )

    def __init__(self, request_id: str, method: str, started: float) -> None:
        self.request_id = request_id
        self.method = method
        self.started = started
        self.route: Route | None = None
        self.record: KeyRecord | None = None
        self.key = ""
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_s: float | None = None


class Result:
    """The gateway's answer, ready for a WSGI server: status line, headers, and an iterable body.

    ``recorded`` is true once the request's record is taken care of: written already (a WebSocket handshake), or
    written when the body is closed (a streamed upstream body). The runner records every other result itself.
    """

    recorded = False

    def __init__(self, status: str, headers: list[tuple[str, str]], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def status_code(self) -> int:
        return int(self.status[:3])


class Exchange:
    """One request as it moves through the chain: what earlier steps found, for later steps to use."""

    __slots__ = (
        "claims",
        "client_ip",
        "credential",
        "done",
        "environ",
        "gateway",
        "method",
        "path",
        "plan_id",
        "query",
        "ran",
        "record",
        "request_id",
        "route",
        "state",
        "target_path",
        "upgrade",
        "upstream_headers",
    )

    def __init__(
        self,
        gateway: Gateway,
        environ: dict[str, Any],
        route: Route,
        method: str,
        path: str,
        query: str,
        request_id: str,
        client_ip: str,
        done: Finished,
    ) -> None:
        self.gateway = gateway
        self.environ = environ
        self.route = route
        self.method = method
        self.path = path
        self.query = query  # the raw query; the credential's parameter is stripped before the proxy
        self.request_id = request_id
        self.client_ip = client_ip
        self.done = done
        self.upgrade = False  # a WebSocket handshake the API allows
        self.record: KeyRecord | None = None  # the caller, once authenticated
        self.credential: Credential | None = None
        self.claims: dict[str, Any] | None = None  # a verified JWT's claims
        self.plan_id = ""
        self.upstream_headers: dict[str, str] = {}  # built after authenticate; request transforms edit them
        self.target_path = path
        self.ran: list[Step] | None = None  # steps whose request() ran and want response()
        self.state: dict[str, Any] | None = None  # per-request scratch space of steps, by step name

    def fail(self, response: GatewayResponse, extra_headers: list[tuple[str, str]] | None = None) -> Result:
        """The gateway's own answer (a problem document) as a Result; recorded by the runner like any other."""
        done = self.done
        done.status = response.status
        done.bytes_out = len(response.body)
        headers = response.headers + (extra_headers or []) + [("X-Request-ID", done.request_id)]
        headers += self.route.extra_headers
        return Result(status_line(response.status), headers, [response.body])


class Step:
    """One policy's work at one place in the order. Subclasses set ``name`` and ``phase`` and override what they do:
    ``request`` for a request phase (with ``has_response`` if its ``response`` is wanted too), ``response`` alone for a
    response phase."""

    name = "step"
    phase = PRE_AUTH
    # Place within the phase, lowest first (then the modules' name order): a step that must come last in its phase
    # (the response cache's lookup in access, which ends the request on a hit) says so here.
    order = 0
    # Whether response() has anything to do: steps without it are not remembered per request.
    has_response = False

    # A cache_lookup step that reads one Redis key may have it read in the limiter's round trip (first step of its
    # phase only): limits_read names the key for this request (None: none), limits_reply gets its reply once the
    # caller is within its limits (not when refused) and may end the request there. Otherwise request() runs.
    reads_with_limits = False

    def request(self, ex: Exchange) -> Result | None:
        """Run in this step's phase; a Result ends the request (the steps that ran still see it in response())."""
        return None

    def limits_read(self, ex: Exchange) -> str | None:
        """The Redis key to GET in the limiter's write (it must share the limiter keys' hash tag), or None."""
        return None

    def limits_reply(self, ex: Exchange, reply: bytes | None) -> Result | None:
        """The GET's reply; a Result ends the request as request() would (then request() does not run)."""
        return None

    def response(self, ex: Exchange, result: Result) -> Result:
        """See (and possibly change) the final answer: called only if request() ran (and has_response is set)."""
        return result


class Chain:
    """A route's policy steps by phase, in order; phases with no step are empty tuples (skipped at no cost)."""

    __slots__ = ("by_phase", "empty", "limits_reader", "responders", "steps")

    def __init__(self, steps: list[Step]) -> None:
        for step in steps:
            if step.phase not in POLICY_PHASES:
                raise ValueError(f"step {step.name!r} declares phase {step.phase!r}, not one a policy may use")
        # Stable: within a phase and order, the modules' name order.
        self.steps = sorted(steps, key=lambda s: (_ORDER[s.phase], s.order))
        self.by_phase: dict[str, tuple[Step, ...]] = {
            phase: tuple(s for s in self.steps if s.phase == phase) for phase in POLICY_PHASES
        }
        self.responders = tuple(s for s in self.steps if s.phase in (RESPONSE_TRANSFORMS, CACHE_STORE))
        self.empty = not self.steps
        lookups = self.by_phase[CACHE_LOOKUP]
        self.limits_reader = lookups[0] if lookups and lookups[0].reads_with_limits else None

    def step(self, name: str) -> Step | None:
        """The first step of this name, or None."""
        return next((step for step in self.steps if step.name == name), None)

    def names(self) -> list[str]:
        return [f"{step.phase}:{step.name}" for step in self.steps]

    def run(self, ex: Exchange, phase: str) -> Result | None:
        """Run one phase's steps; the first Result ends the request."""
        for step in self.by_phase[phase]:
            if step.has_response:
                if ex.ran is None:
                    ex.ran = []
                ex.ran.append(step)
            result = step.request(ex)
            if result is not None:
                return result
        return None

    def answered_with_limits(self, ex: Exchange, step: Step) -> None:
        """``step`` ended the request from limits_reply: it sees the answer in response() like a step that ran."""
        if step.has_response:
            if ex.ran is None:
                ex.ran = []
            ex.ran.append(step)

    def respond(self, ex: Exchange, result: Result) -> Result:
        """The final answer through response() of the request steps that ran and of the response phases' steps, in
        phase order."""
        ran = ex.ran
        steps = sorted([*ran, *self.responders], key=lambda s: (_ORDER[s.phase], s.order)) if ran else self.responders
        for step in steps:
            result = step.response(ex, result)
        return result


EMPTY = Chain([])

# -- policy modules ----------------------------------------------------------------------------------------------

# build(route, policies, plan_policies): the API's own policies of the module's type (name order), and every plan's
# policies of that type by plan id (a step that applies plan policies looks up the caller's plan per request).
Builder = Callable[["Route", list[PolicySpec], dict[str, list[PolicySpec]]], list[Step]]
_BUILDERS: dict[str, Builder] | None = None


def builders() -> dict[str, Builder]:
    """policy_type -> build(route, policies): every module of gateway.policies, found once per process."""
    global _BUILDERS
    if _BUILDERS is None:
        from gateway import policies

        found: dict[str, Builder] = {}
        for info in sorted(pkgutil.iter_modules(policies.__path__), key=lambda i: i.name):
            module: ModuleType = importlib.import_module(f"{policies.__name__}.{info.name}")
            policy_type = getattr(module, "POLICY_TYPE", None)
            build = getattr(module, "build", None)
            if policy_type is None or build is None:
                continue
            found[policy_type] = build
        _BUILDERS = found
    return _BUILDERS


PlansByType = dict[str, dict[str, dict[str, list[PolicySpec]]]]


def plan_policies_by_type(plan_policies: dict[str, list[PolicySpec]], plan_tenants: dict[str, str]) -> PlansByType:
    """{tenant_id: {policy_type: {plan_id: [policies]}}}: built once per route table for build_chain (so a plan's
    policy puts a step only on its own tenant's routes)."""
    by_type: PlansByType = {}
    for plan_id, specs in plan_policies.items():
        tenant = by_type.setdefault(plan_tenants.get(plan_id, ""), {})
        for spec in specs:
            tenant.setdefault(spec.policy_type, {}).setdefault(plan_id, []).append(spec)
    return by_type


def build_chain(route: Route, plans_by_type: PlansByType | None = None) -> Chain:
    """The steps a route's policies ask for (its plans' policies are found per request by the steps that use them).

    A policy type without a module (rate_limiting and quota: the limits step reads them itself) adds no step; a
    module that fails to build logs and adds none, so one bad policy cannot take the route table down.
    """
    by_type: dict[str, list[PolicySpec]] = {}
    for policy in route.policies:
        by_type.setdefault(policy.policy_type, []).append(policy)
    table = builders()
    plans = (plans_by_type or {}).get(route.tenant_id, {})
    steps: list[Step] = []
    for policy_type, build in table.items():
        own = by_type.get(policy_type, [])
        try:
            steps.extend(build(route, own, plans.get(policy_type, {})))
        except Exception:
            logger.exception("policy steps of type %s could not be built for API %s", policy_type, route.api_id)
    return Chain(steps) if steps else EMPTY
