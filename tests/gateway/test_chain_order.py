"""The gateway's order of work, pinned: read this file as the documentation of the order (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

import pytest

from apimgmt import services
from apimgmt.models import Api, Consumer, Tenant
from gateway import chain
from gateway.chain import PHASES, Chain, Exchange, Result, Step
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Answer, Recorder


def test_a_request_passes_these_phases_in_this_order() -> None:
    assert PHASES == (
        "route",  # which API (host, longest base path); restrict_to_spec's 404/405
        "pre_auth",  # no caller needed: CORS preflight, request limits, the API's IP rules
        "authenticate",  # the API key, or a JWT from one of the API's issuers
        "access",  # the caller's plan, consumer and key IP rules; request validation
        "limits",  # rate limits and quotas (so a refused request above is never counted)
        "request_transforms",  # header transforms towards the upstream
        "cache_lookup",  # a cached answer: the upstream is not called (a hit has been counted by limits)
        "proxy",  # the upstream call
        "cache_store",  # a cacheable answer is kept as the upstream gave it
        "response_transforms",  # header transforms towards the client, on every answer: a cache hit too
        "record",  # metrics, access log, usage: every answer, whoever gave it
    )


def test_only_policy_phases_take_policy_steps() -> None:
    assert {
        "pre_auth",
        "access",
        "request_transforms",
        "cache_lookup",
        "response_transforms",
        "cache_store",
    } == chain.POLICY_PHASES

    class Proxying(Step):
        name, phase = "bad", "proxy"

    with pytest.raises(ValueError, match="declares phase 'proxy'"):
        Chain([Proxying()])


class _Trace(Step):
    """A step that writes what it did into the exchange's state."""

    has_response = True

    def __init__(self, name: str, phase: str, *, answer: int | None = None) -> None:
        self.name, self.phase, self.answer = name, phase, answer

    def request(self, ex: Exchange) -> Result | None:
        _log(ex).append(f"request {self.name}")
        return Result(f"{self.answer} X", [], []) if self.answer else None

    def response(self, ex: Exchange, result: Result) -> Result:
        _log(ex).append(f"response {self.name}")
        return result


def _log(ex: Exchange) -> list[str]:
    if ex.state is None:
        ex.state = {}
    log: list[str] = ex.state.setdefault("log", [])
    return log


def _exchange() -> Any:
    return Exchange.__new__(Exchange)


def _run(steps: Chain, ex: Exchange) -> Result | None:
    ex.ran, ex.state = None, None
    result = None
    for phase in PHASES:
        if phase in chain.POLICY_PHASES and phase not in ("response_transforms", "cache_store"):
            result = steps.run(ex, phase)
            if result is not None:
                break
    final = result or Result("200 OK", [], [])
    steps.respond(ex, final)
    return result


def test_steps_run_by_phase_whatever_order_their_modules_came_in() -> None:
    steps = Chain(
        [
            _Trace("cache", "cache_lookup"),
            _Trace("headers-out", "response_transforms"),
            _Trace("headers-in", "request_transforms"),
            _Trace("ip", "access"),
            _Trace("cors", "pre_auth"),
        ]
    )
    assert steps.names() == [
        "pre_auth:cors",
        "access:ip",
        "request_transforms:headers-in",
        "cache_lookup:cache",
        "response_transforms:headers-out",
    ]
    ex = _exchange()
    _run(steps, ex)
    assert ex.state["log"] == [
        "request cors",
        "request ip",
        "request headers-in",
        "request cache",
        # the answer travels back through every step that ran, then the response phases' steps, in phase order
        "response cors",
        "response ip",
        "response headers-in",
        "response cache",
        "response headers-out",
    ]


def test_an_answer_ends_the_request_but_the_steps_before_it_still_see_it() -> None:
    steps = Chain(
        [
            _Trace("cors", "pre_auth"),
            _Trace("ip", "access", answer=403),
            _Trace("cache", "cache_lookup"),
            _Trace("headers-out", "response_transforms"),
        ]
    )
    ex = _exchange()
    result = _run(steps, ex)
    assert result is not None and result.status_code == 403
    assert ex.state["log"] == [
        "request cors",
        "request ip",
        "response cors",
        "response ip",
        "response headers-out",  # a response phase's step sees every answer (and decides what to leave alone)
    ]


@pytest.mark.django_db
def test_an_api_without_policy_steps_runs_the_fixed_steps_only(
    acme: Tenant, upstream: Recorder, bob_app: Consumer, key: str, gateway: InProcessGateway
) -> None:
    limit = services.policy_create(
        tenant=acme, name="limit", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=None
    )
    api: Api = publish(acme, upstream.url, policies=[limit])
    subscribe(bob_app, api)
    assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200
    route = get_gateway().routes.current().resolve("", "/api/users/v1/x")
    assert route is not None
    assert route.chain is chain.EMPTY  # rate limits and quotas are the limits step's own: no policy step


# -- the same order, seen from outside: one API with a policy of every type ----------------------------------------

ORIGIN = "https://app.example.com"
PATH = "/api/users/v1/items"


@pytest.fixture
def everything_api(acme: Tenant, upstream: Recorder, bob_app: Consumer) -> Api:
    def policy(name: str, policy_type: str, config: dict[str, Any]) -> Any:
        return services.policy_create(tenant=acme, name=name, policy_type=policy_type, config=config, actor=None)

    api = publish(
        acme,
        upstream.url,
        base_path="/api/users/v1",
        policies=[
            policy("browsers", "cors", {"allow_origins": [ORIGIN], "allow_methods": ["GET", "POST"]}),
            policy("no-deletes", "request_limits", {"allowed_methods": ["GET", "HEAD", "POST", "OPTIONS"]}),
            policy("not-the-lab", "ip_rules", {"deny": ["198.51.100.0/24"]}),
            policy("tenants-shown", "headers", {"request": {"set": {"X-Caller": "{consumer_id}"}}}),
            policy("per-minute", "rate_limiting", {"requests_per_minute": 100}),
            policy("cache", "response_cache", {"ttl_seconds": 60}),
        ],
    )
    subscribe(bob_app, api)

    def respond(seen: Any) -> Answer:
        return Answer(headers=[("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")], body=b"fresh")

    upstream.respond = respond
    return api


def _remaining(response: Any) -> int:
    return int(response.header("X-RateLimit-Remaining"))


def test_pre_auth_policies_answer_before_any_key_is_asked_for(
    gateway: InProcessGateway, everything_api: Api, upstream: Recorder
) -> None:
    # A browser's preflight needs no key: CORS answers it in pre_auth.
    preflight = gateway.request("OPTIONS", PATH, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204
    assert preflight.header("Access-Control-Allow-Origin") == ORIGIN
    # The API's request limits and IP rules refuse before authentication: a 405 and a 403, not a 401.
    assert gateway.request("DELETE", PATH).status == 405
    assert gateway.get(PATH, remote_addr="198.51.100.7").status == 403
    assert upstream.seen == []


def test_authenticate_comes_before_limits_and_every_answer_carries_the_pre_auth_steps_headers(
    gateway: InProcessGateway, everything_api: Api, key: str
) -> None:
    counted = _remaining(gateway.get(PATH, headers={"X-API-Key": key}))
    refused = gateway.get(PATH, headers={"Origin": ORIGIN})  # no key
    assert refused.status == 401
    assert refused.header("Access-Control-Allow-Origin") == ORIGIN  # the browser can read why
    # The refused request was never counted: limits run after authentication.
    assert _remaining(gateway.get(PATH, headers={"X-API-Key": key, "Cache-Control": "no-cache"})) == counted - 1


def test_limits_count_a_cache_hit_and_request_transforms_reach_the_upstream(
    gateway: InProcessGateway, everything_api: Api, upstream: Recorder, key: str, bob_app: Consumer
) -> None:
    miss = gateway.get(PATH, headers={"X-API-Key": key})
    hit = gateway.get(PATH, headers={"X-API-Key": key})
    assert (miss.header("X-Cache"), hit.header("X-Cache")) == ("MISS", "HIT")
    assert len(upstream.seen) == 1  # the hit never reached the upstream (cache_lookup before proxy)...
    assert _remaining(hit) == _remaining(miss) - 1  # ...but limits, before cache_lookup, counted it
    sent = {name.lower(): value for name, value in upstream.seen[0].header_list}
    assert sent.get("x-caller") == bob_app.pk  # request_transforms, before the proxy


@pytest.mark.django_db
def test_a_plans_policy_adds_steps_only_to_its_own_tenants_routes(
    acme: Tenant, globex: Tenant, upstream: Recorder, bob_app: Consumer, key: str, gateway: InProcessGateway
) -> None:
    office = services.policy_create(
        tenant=globex, name="office", policy_type="ip_rules", config={"allow": ["10.0.0.0/8"]}, actor=None
    )
    services.plan_create(tenant=globex, name="partners", policies=[office], actor=None)
    api: Api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200
    route = get_gateway().routes.current().resolve("", "/api/users/v1/x")
    assert route is not None and route.chain is chain.EMPTY  # globex's plan policies cost acme's APIs nothing


def test_a_step_may_ask_to_come_last_in_its_phase() -> None:
    last = _Trace("cache", "access")
    last.order = 100
    steps = Chain([last, _Trace("validation", "access"), _Trace("ip", "access")])
    assert steps.names() == ["access:validation", "access:ip", "access:cache"]
