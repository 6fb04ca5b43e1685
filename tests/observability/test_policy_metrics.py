"""What operators see of the policy chain in Prometheus: cache lookups by result, policy refusals by policy type and
a fixed reason, JWKS fetches by result. Real requests through the in-process gateway (real Redis, a loopback
upstream and JWKS server); the values are read back from the process's registry, as the metrics port exports them.
"""

# ruff: noqa: F811  (the gateway tests' fixtures, imported here, are the tests' parameters)
from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apimgmt import services
from apimgmt.models import Api, Consumer, JwtIssuer, Policy, Tenant
from gateway import jwks
from gateway.policies import response_cache
from tests.gateway.conftest import (  # noqa: F401  (fixtures)
    InProcessGateway,
    _allow_private_upstreams,
    gateway,
    key,
    publish,
    subscribe,
    upstream,
)
from tests.gateway.jwt_support import (  # noqa: F401  (fixtures)
    AUD,
    ISS,
    JwksServer,
    SigningKey,
    bearer,
    issuer,
    jwks_server,
    jwt_api,
    k1,
    k2,
    publish_for_tokens,
)
from tests.gateway.upstreams import Answer, Recorder, Seen, recording_upstream
from tests.support.servers import free_port, gunicorn

PATH = "/api/users/v1/items"


@pytest.fixture(autouse=True)
def _fresh_cache_state() -> None:
    response_cache._health.down_until = 0.0
    response_cache._vary_memo.clear()
    response_cache._inflight.clear()


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _policy(tenant: Tenant, policy_type: str, name: str | None = None, **config: Any) -> Policy:
    mode = config.pop("mode", Policy.Mode.ENFORCE)
    return services.policy_create(
        tenant=tenant, name=name or policy_type, policy_type=policy_type, config=config, actor=None, mode=mode
    )


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy, base_path: str = "") -> Api:
    api = publish(tenant, upstream.url, base_path=base_path or "/api/users/v1", policies=list(policies))
    subscribe(consumer, api)
    return api


def _lookups(api: Api) -> dict[str, float]:
    return {
        result: _value("api_cache_lookups_total", tenant=str(api.tenant_id), api=str(api.pk), result=result)
        for result in ("hit", "miss", "bypass", "skip")
    }


def _refusals(api: Api, policy_type: str, mode: str = "enforce") -> dict[str, float]:
    """reason -> count of this API's refusals by ``policy_type`` (only reasons with a series)."""
    found: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name != "api_policy_refusals":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "api_policy_refusals_total"
                and labels["api"] == str(api.pk)
                and labels["policy_type"] == policy_type
                and labels["mode"] == mode
            ):
                assert labels["tenant"] == str(api.tenant_id)
                found[labels["reason"]] = sample.value
    return found


def _exposition() -> str:
    return generate_latest().decode()


# -- response cache --------------------------------------------------------------------------------------------------


def test_cache_lookups_count_a_miss_then_hits_a_bypass_and_a_skip_for_the_api(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    def respond(seen: Seen) -> Answer:
        return Answer(headers=[("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")], body=b"cached")

    upstream.respond = respond
    api = _api(acme, upstream, bob_app, _policy(acme, "response_cache"))
    headers = {"X-API-Key": key}
    assert gateway.get(PATH, headers=headers).header("X-Cache") == "MISS"
    assert [gateway.get(PATH, headers=headers).header("X-Cache") for _ in range(3)] == ["HIT"] * 3
    fresh = gateway.get(PATH, headers={**headers, "Cache-Control": "no-cache"})
    assert fresh.header("X-Cache") == "BYPASS"
    assert gateway.request("POST", PATH, headers=headers, body=b"{}").status == 200
    assert len(upstream.seen) == 3  # the miss, the bypass, the POST
    assert _lookups(api) == {"hit": 3, "miss": 1, "bypass": 1, "skip": 1}


def test_an_api_without_the_policies_has_no_policy_series(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    api = _api(acme, upstream, bob_app)
    for _ in range(3):
        assert gateway.get(PATH, headers={"X-API-Key": key}).status == 200
    assert gateway.request("OPTIONS", PATH, headers={"Origin": "https://x.example", "X-API-Key": key}).status == 200
    exposition = _exposition()
    assert f'api="{api.pk}"' in exposition  # api_requests_total knows it
    for name in ("api_cache_lookups_total", "api_policy_refusals_total"):
        assert not [line for line in exposition.splitlines() if line.startswith(name) and str(api.pk) in line]


# -- refusals --------------------------------------------------------------------------------------------------------


def test_cors_preflight_refusals_are_counted_by_what_was_refused_never_by_origin(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, upstream: Recorder
) -> None:
    cors = _policy(acme, "cors", allow_origins=["https://app.example.com"], allow_methods=["GET", "PUT"])
    api = _api(acme, upstream, bob_app, cors)

    def preflight(origin: str, method: str = "PUT", headers: str = "") -> int:
        sent = {"Origin": origin, "Access-Control-Request-Method": method}
        if headers:
            sent["Access-Control-Request-Headers"] = headers
        return gateway.request("OPTIONS", PATH, headers=sent).status

    assert preflight("https://app.example.com") == 204
    assert preflight("https://evil-origin.example.net") == 403
    assert preflight("https://evil-origin.example.net", "DELETE") == 403  # the origin is what it is refused for
    assert preflight("https://app.example.com", "DELETE") == 403
    assert preflight("https://app.example.com", "PUT", "X-Secret-Header-Name") == 403
    assert _refusals(api, "cors") == {"origin": 2, "method": 1, "headers": 1}
    exposition = _exposition()
    for sent in ("evil-origin", "app.example.com", "X-Secret-Header-Name", "x-secret-header-name"):
        assert sent not in exposition
    assert upstream.seen == []


def test_ip_rule_refusals_are_counted_by_reason_and_mode_never_by_address(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    rules = _policy(acme, "ip_rules", "office", allow=["192.0.2.0/24"], deny=["192.0.2.66/32"])
    watch = _policy(acme, "ip_rules", "watch", deny=["198.51.100.0/24"], mode=Policy.Mode.SHADOW)
    api = _api(acme, upstream, bob_app, rules, watch)
    shadow_only = _api(acme, upstream, bob_app, watch, base_path="/api/shadow/v1")

    def status(address: str) -> int:
        return gateway.get(PATH, headers={"X-API-Key": key}, remote_addr=address).status

    assert status("192.0.2.10") == 200
    response = gateway.get(PATH, headers={"X-API-Key": key}, remote_addr="192.0.2.66")
    assert response.status == 403 and response.json()["type"].endswith(":ip-refused")
    assert status("203.0.113.77") == 403
    assert status("203.0.113.78") == 403
    assert _refusals(api, "ip_rules") == {"deny": 1, "not_allowed": 2}
    # a shadow policy refuses nothing and is counted as what it would have done
    assert gateway.get("/api/shadow/v1/x", headers={"X-API-Key": key}, remote_addr="198.51.100.9").status == 200
    assert _refusals(shadow_only, "ip_rules", "shadow") == {"deny": 1}
    assert _refusals(shadow_only, "ip_rules") == {}
    exposition = _exposition()
    for address in ("192.0.2.66", "203.0.113.77", "203.0.113.78", "198.51.100.9"):
        assert address not in exposition


def test_request_limit_refusals_are_counted_as_method_body_and_headers(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    limits = _policy(acme, "request_limits", allowed_methods=["GET", "POST"], max_body_bytes=100, max_headers=12)
    api = _api(acme, upstream, bob_app, limits)
    headers = {"X-API-Key": key}
    assert gateway.request("DELETE", PATH, headers=headers).status == 405
    assert gateway.request("POST", PATH, headers={**headers, "X-HTTP-Method-Override": "DELETE"}).status == 405
    assert gateway.request("POST", PATH, headers=headers, body=b"x" * 101).status == 413
    many = {f"X-Extra-{i}": "1" for i in range(20)}
    response = gateway.get(PATH, headers={**headers, **many})
    assert response.status == 431 and response.json()["type"].endswith(":headers-too-large")
    assert gateway.request("POST", PATH, headers=headers, body=b"x" * 100).status == 200
    assert _refusals(api, "request_limits") == {"method": 2, "body": 1, "headers": 1}
    assert len(upstream.seen) == 1


# -- JWKS ------------------------------------------------------------------------------------------------------------


def test_jwks_fetches_are_counted_ok_unchanged_and_error_with_the_time_of_the_last_good_one(
    gateway: InProcessGateway,
    acme: Tenant,
    issuer: JwtIssuer,
    jwt_api: Api,
    jwks_server: JwksServer,
    k1: SigningKey,
    k2: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jwks, "REFETCH_INTERVAL_SECONDS", 0.0)  # every unknown kid refetches
    labels = {"tenant": str(acme.pk), "issuer_id": str(issuer.pk)}

    def fetches() -> dict[str, float]:
        return {r: _value("api_jwks_fetches_total", **labels, result=r) for r in ("ok", "unchanged", "error")}

    before = time.time()
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token())).status == 200
    assert fetches() == {"ok": 1, "unchanged": 0, "error": 0}
    last_good = _value("api_jwks_last_success_timestamp_seconds", **labels)
    assert before <= last_good <= time.time()
    # an unknown kid refetches the same set: unchanged (and still a good fetch)
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token(jti=uuid.uuid4().hex))).status == 401
    assert fetches() == {"ok": 1, "unchanged": 1, "error": 0}
    assert jwks_server.fetches == 2
    # the issuer's server goes away: the next refetch fails, the last good time stays
    refetched_at = _value("api_jwks_last_success_timestamp_seconds", **labels)
    jwks_server.stop()
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token(jti=uuid.uuid4().hex))).status == 401
    assert fetches() == {"ok": 1, "unchanged": 1, "error": 1}
    assert _value("api_jwks_last_success_timestamp_seconds", **labels) == refetched_at
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="still-good"))).status == 200
    exposition = _exposition()
    assert jwks_server.url not in exposition and ISS not in exposition


# -- gunicorn: several workers, one exposition -----------------------------------------------------------------------


def _scraped(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_under_two_gunicorn_workers_the_metrics_port_sums_them(
    live_env: dict[str, str], tmp_path: Any, acme: Tenant, bob_app: Consumer, key: str, k1: SigningKey
) -> None:
    port = free_port()
    env = {
        **live_env,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "METRICS_PORT": str(port),
        "METRICS_ADDRESS": "127.0.0.1",
    }
    server = JwksServer()
    server.publish(k1)
    try:
        with recording_upstream() as upstream, gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:

            def respond(seen: Seen) -> Answer:
                return Answer(headers=[("Cache-Control", "max-age=60")], body=b"cached")

            upstream.respond = respond
            cache = _policy(acme, "response_cache")
            cors = _policy(acme, "cors", allow_origins=["https://app.example.com"])
            api = _api(acme, upstream, bob_app, cache, cors)
            issuer = services.jwt_issuer_create(
                tenant=acme, name="acme-id", issuer=ISS, audiences=[AUD], jwks_url=server.url, actor=None
            )
            publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/jwt")
            headers = {"X-API-Key": key}
            deadline = time.monotonic() + 30  # each worker loads its route table
            while requests.get(url + "/api/jwt/a", headers=bearer(k1.token()), timeout=30).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            # A new connection per request: both workers answer some.
            answers = [requests.get(url + PATH, headers=headers, timeout=30) for _ in range(20)]
            assert [a.status_code for a in answers] == [200] * 20
            preflight = {"Origin": "https://evil.example.net", "Access-Control-Request-Method": "GET"}
            refused = [requests.options(url + PATH, headers=preflight, timeout=30) for _ in range(6)]
            assert [r.status_code for r in refused] == [403] * 6
            for _ in range(6):
                assert requests.get(url + "/api/jwt/a", headers=bearer(k1.token()), timeout=30).status_code == 200
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.stop()
    lookup = {"tenant": str(acme.pk), "api": str(api.pk)}
    hits = _scraped(text, "api_cache_lookups_total", **lookup, result="hit")
    misses = _scraped(text, "api_cache_lookups_total", **lookup, result="miss")
    assert hits + misses == 20 and 1 <= misses <= 2  # one miss per worker at most
    reasons = {"policy_type": "cors", "reason": "origin", "mode": "enforce"}
    assert _scraped(text, "api_policy_refusals_total", **lookup, **reasons) == 6
    fetched = {"tenant": str(acme.pk), "issuer_id": str(issuer.pk)}
    assert 1 <= _scraped(text, "api_jwks_fetches_total", **fetched, result="ok") <= 2  # a fetch per worker that asked
    assert _scraped(text, "api_jwks_fetches_total", **fetched, result="error") == 0
    # the gauge is the newest over the workers (multiprocess mode "max"), not their sum
    assert time.time() - 120 < _scraped(text, "api_jwks_last_success_timestamp_seconds", **fetched) <= time.time()
    assert "evil.example.net" not in text and "app.example.com" not in text
