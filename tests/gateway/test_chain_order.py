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
from tests.gateway.upstreams import Recorder


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
