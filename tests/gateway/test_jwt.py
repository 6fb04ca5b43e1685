"""JWT / OIDC authentication through the gateway: a real JWKS server on loopback, a real upstream, real tokens.

Every refusal is checked by what a client sees (status, WWW-Authenticate, the detail naming the problem) and by the
upstream seeing nothing; the JWKS server counts its fetches.
"""

# ruff: noqa: F811  (the fixtures of tests/gateway/jwt_support.py are imported by name)

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import requests

from apimgmt import services, usage_buckets
from apimgmt.models import Consumer, ConsumerIdentity, Subscription
from gateway import jwks, jwt_auth
from gateway.wsgi import get_gateway
from tests.gateway.conftest import publish, subscribe
from tests.gateway.jwt_support import (  # noqa: F401 (fixtures)
    AUD,
    ISS,
    JwksServer,
    SigningKey,
    b64url,
    bearer,
    default_claims,
    ec_key,
    issuer,
    jwks_server,
    jwt_api,
    k1,
    k2,
    publish_for_tokens,
)
from tests.gateway.upstreams import recording_upstream
from tests.support.servers import gunicorn

# -- tokens only these tests forge -------------------------------------------------------------------------------


def unsigned_token() -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(default_claims()).encode())}."


def hs256_with_public_key(key: SigningKey) -> str:
    """Algorithm confusion: HMAC-SHA256 keyed with the issuer's public RSA key (which anyone can fetch)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64url(json.dumps(default_claims()).encode())
    signature = hmac.new(key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def _challenge(response) -> str:
    return response.header("WWW-Authenticate") or ""


# -- the happy path ----------------------------------------------------------------------------------------------


def test_a_valid_token_reaches_the_upstream_as_its_consumer_without_the_authorization_header(
    gateway, jwt_api, upstream, bob_app, k1
):
    response = gateway.get("/api/jwt/items?x=1", headers=bearer(k1.token()))
    assert response.status == 200, response.body
    (seen,) = upstream.seen
    assert seen.path == "/items?x=1"
    assert "authorization" not in seen.headers
    assert seen.headers["x-consumer-id"] == bob_app.pk


def test_a_repeat_token_is_verified_once_and_costs_no_query(
    gateway, jwt_api, k1, monkeypatch, django_assert_num_queries
):
    token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    verified: list[str] = []
    original = jwt_auth._verify

    def counting(state, token_, route):
        verified.append(token_)
        return original(state, token_, route)

    monkeypatch.setattr(jwt_auth, "_verify", counting)
    with django_assert_num_queries(0):
        for _ in range(5):
            assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    assert verified == []
    # Another token of the same caller is verified (once), and maps to the cached identity.
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="2"))).status == 200
    assert len(verified) == 1


# -- refusals ----------------------------------------------------------------------------------------------------


def test_every_bad_token_is_refused_with_its_own_reason(gateway, acme, jwt_api, upstream, issuer, k1, k2):
    lurker = services.consumer_create(tenant=acme, name="lurker", actor=None)
    services.consumer_identity_create(consumer=lurker, issuer=issuer, external_id="lurker-1", actor=None)
    blocked = services.consumer_create(tenant=acme, name="blocked", actor=None)
    subscribe(blocked, jwt_api)
    services.consumer_identity_create(consumer=blocked, issuer=issuer, external_id="blocked-1", actor=None)
    services.consumer_block(consumer=blocked, actor=None)
    now = int(time.time())
    valid = k1.token()
    cases: dict[str, tuple[dict[str, str], str, int, str]] = {
        "no token": ({}, "", 401, "needs a token"),
        "expired": (bearer(k1.token(exp=now - 120)), "", 401, "has expired"),
        "nbf in the future": (bearer(k1.token(nbf=now + 600)), "", 401, "not valid yet (nbf"),
        "wrong aud": (bearer(k1.token(aud="another-api")), "", 401, "audience (aud)"),
        "wrong iss": (bearer(k1.token(iss="https://evil.example.com/")), "", 401, "issuer (iss)"),
        "alg none": (bearer(unsigned_token()), "", 401, "alg none"),
        "HS256 keyed with the RSA public key": (bearer(hs256_with_public_key(k1)), "", 401, "algorithm HS256"),
        "malformed": (bearer("abc.def.ghi"), "", 401, "not a well-formed JWT"),
        "not a JWT at all": (bearer("not-a-token"), "", 401, "not a well-formed JWT"),
        "oversized": (bearer(k1.token(pad="x" * 9000)), "", 401, "too large"),
        "bad signature": (
            bearer(valid[:-6] + ("AAAAAA" if valid[-6:] != "AAAAAA" else "BBBBBB")),
            "",
            401,
            "signature",
        ),
        "signed by a key the issuer does not publish": (bearer(k2.token(headers={"kid": "k1"})), "", 401, "signature"),
        "no exp": (bearer(k1.token(exp=None)), "", 401, "no exp claim"),
        "no sub": (bearer(k1.token(sub=None)), "", 401, "no usable sub claim"),
        "token in the query, not allowed": ({}, f"?access_token={valid}", 401, "does not accept tokens in the query"),
        "two tokens": ({"Authorization": f"Bearer {valid}, {valid}"}, "", 401, "exactly one token"),
        "unknown subject": (bearer(k1.token(sub="stranger")), "", 403, "No application is registered"),
        "consumer blocked": (bearer(k1.token(sub="blocked-1")), "", 403, "is blocked"),
        "not subscribed": (bearer(k1.token(sub="lurker-1")), "", 403, "no active subscription"),
    }
    for name, (headers, query, status, detail) in cases.items():
        response = gateway.get("/api/jwt/x" + query, headers=headers)
        assert response.status == status, (name, response.body)
        assert response.header("Content-Type") == "application/problem+json", name
        assert detail in response.json()["detail"], (name, response.json()["detail"])
        token = headers.get("Authorization", "")[7:] or query.partition("=")[2]
        assert not token or token not in response.body.decode(), name
        if status == 401:
            challenge = _challenge(response)
            assert challenge.startswith('Bearer realm="'), name
            if name == "no token":
                assert "error=" not in challenge
            elif name in ("token in the query, not allowed", "two tokens"):
                assert 'error="invalid_request"' in challenge, name
            else:
                assert 'error="invalid_token"' in challenge, name
    assert upstream.seen == []
    from prometheus_client import REGISTRY

    for reason in ("token_expired", "token_wrong_audience", "token_bad_algorithm", "token_unmapped", "token_blocked"):
        assert REGISTRY.get_sample_value("api_auth_failures_total", {"api": jwt_api.pk, "reason": reason}), reason


def test_a_token_in_the_query_is_taken_from_the_issuers_parameter_and_never_forwarded(
    gateway, acme, upstream, bob_app, jwks_server, k1
):
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="query-id",
        issuer=ISS,
        audiences=[AUD],
        jwks_url=jwks_server.url,
        token_in_query="jwt",
        actor=None,
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/q")
    token = k1.token()
    assert gateway.get(f"/api/q/a?x=1&jwt={token}&y=2").status == 200
    assert upstream.paths == ["/a?x=1&y=2"]
    refused = gateway.get(f"/api/q/a?access_token={token}")
    assert refused.status == 401
    assert "does not accept tokens in the query" in refused.json()["detail"]


def test_a_consumer_blocked_after_its_token_was_cached_is_refused_at_the_next_poll(
    gateway, jwt_api, bob_app, k1, django_capture_on_commit_callbacks
):
    token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_block(consumer=Consumer.objects.get(pk=bob_app.pk), actor=None)
    get_gateway().routes.apply_evictions()  # what the config poller does every GATEWAY_CONFIG_POLL_SECONDS
    response = gateway.get("/api/jwt/a", headers=bearer(token))
    assert response.status == 403
    assert "blocked" in response.json()["detail"]
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_unblock(consumer=Consumer.objects.get(pk=bob_app.pk), actor=None)
    get_gateway().routes.apply_evictions()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200


def test_an_identity_deleted_or_created_takes_effect_at_the_next_poll(
    gateway, jwt_api, acme, issuer, k1, django_capture_on_commit_callbacks
):
    token = k1.token(sub="newcomer")
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 403  # "no such identity" is cached now
    newcomer = services.consumer_create(tenant=acme, name="newcomer", actor=None)
    subscribe(newcomer, jwt_api)
    with django_capture_on_commit_callbacks(execute=True):
        identity = services.consumer_identity_create(
            consumer=newcomer, issuer=issuer, external_id="newcomer", actor=None
        )
    get_gateway().routes.apply_evictions()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_identity_delete(identity=identity, actor=None)
    get_gateway().routes.apply_evictions()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 403


# -- the JWKS server ---------------------------------------------------------------------------------------------


def test_an_unknown_kid_refetches_the_jwks_once_per_interval_then_401(
    gateway, jwt_api, jwks_server, k1, k2, monkeypatch
):
    monkeypatch.setattr(jwks, "REFETCH_INTERVAL_SECONDS", 0.5)
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token())).status == 200
    assert jwks_server.fetches == 1
    for _ in range(3):
        response = gateway.get("/api/jwt/a", headers=bearer(k2.token(jti=uuid.uuid4().hex)))
        assert response.status == 401
        assert "key id (kid) is not one of its issuer's keys" in response.json()["detail"]
    assert jwks_server.fetches == 2  # one refetch for the unknown kid, then none within the interval
    # The issuer publishes k2 now: picked up at the first unknown kid after the interval.
    jwks_server.publish(k1, k2)
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token())).status == 401
    time.sleep(0.55)
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token())).status == 200
    assert jwks_server.fetches == 3


def test_a_rotated_key_is_picked_up_and_the_old_one_keeps_working_while_published(
    gateway, jwt_api, jwks_server, k1, k2
):
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token())).status == 200
    jwks_server.publish(k1, k2)  # rotation: the new key is published next to the old one
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token())).status == 200
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="again"))).status == 200
    assert jwks_server.fetches == 2


def test_a_withdrawn_key_stops_working_after_the_background_refresh(gateway, jwt_api, jwks_server, k1, k2, monkeypatch):
    token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    jwks_server.publish(k2)
    monkeypatch.setattr(jwks, "MAX_AGE_SECONDS", 0.0)
    # The request that finds the set old is served with it; a fetch starts in the background.
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="b"))).status == 200
    deadline = time.monotonic() + 5
    while jwks_server.fetches < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setattr(jwks, "MAX_AGE_SECONDS", 600.0)
    time.sleep(0.1)
    # The set changed: even the cached token is checked again, and its key is gone.
    response = gateway.get("/api/jwt/a", headers=bearer(token))
    assert response.status == 401
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token())).status == 200


def test_a_jwks_outage_keeps_the_last_good_keys(gateway, jwt_api, jwks_server, k1, k2, caplog, monkeypatch):
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token())).status == 200
    jwks_server.stop()
    # An unknown kid tries the (now unreachable) server once; the known key still works.
    assert gateway.get("/api/jwt/a", headers=bearer(k2.token())).status == 401
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="fresh"))).status == 200
    # So does the background refresh of an old set.
    monkeypatch.setattr(jwks, "MAX_AGE_SECONDS", 0.0)
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="fresher"))).status == 200
    time.sleep(0.3)
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="freshest"))).status == 200
    assert "keeping the last good keys" in caplog.text


def test_with_no_keys_yet_an_outage_is_503_and_the_server_is_not_asked_on_every_request(
    gateway, acme, upstream, bob_app, jwks_server, k1
):
    jwks_server.document = {"error": "maintenance"}  # answers, but with no keys
    issuer = services.jwt_issuer_create(
        tenant=acme, name="flaky-id", issuer=ISS, audiences=[AUD], jwks_url=jwks_server.url, actor=None
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/f")
    for _ in range(3):
        response = gateway.get("/api/f/a", headers=bearer(k1.token()))
        assert response.status == 503
        assert "cannot be fetched right now" in response.json()["detail"]
        assert int(response.header("Retry-After")) >= 1
    assert jwks_server.fetches == 1
    assert upstream.seen == []


def test_the_jwks_url_goes_through_the_upstream_address_checks(gateway, jwt_api, jwks_server, k1, settings):
    settings.UPSTREAM_ALLOW_PRIVATE = False  # the issuer was saved while loopback was allowed
    response = gateway.get("/api/jwt/a", headers=bearer(k1.token()))
    assert response.status == 503
    assert jwks_server.fetches == 0  # a refused address is never contacted


def test_inline_public_keys_need_no_fetch(gateway, acme, upstream, bob_app, k1):
    e1 = ec_key("e1")
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="inline-id",
        issuer=ISS,
        audiences=[AUD, "other"],
        public_keys={"keys": [k1.jwk, e1.jwk]},
        algorithms=["RS256", "ES256"],
        actor=None,
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/i")
    assert gateway.get("/api/i/a", headers=bearer(k1.token())).status == 200
    assert gateway.get("/api/i/a", headers=bearer(e1.token(aud=["x", "other"]))).status == 200
    # An algorithm the issuer does not allow is refused even with a key that would verify it.
    ps = jwt.encode(default_claims(), k1.private, algorithm="PS256", headers={"kid": "k1"})
    response = gateway.get("/api/i/a", headers=bearer(ps))
    assert response.status == 401
    assert "does not sign with PS256" in response.json()["detail"]


# -- key_or_jwt --------------------------------------------------------------------------------------------------


def test_key_or_jwt_takes_an_api_key_or_a_token(gateway, acme, upstream, bob_app, key, issuer, k1):
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/both", auth_method="key_or_jwt")
    assert gateway.get("/api/both/a", headers={"X-API-Key": key}).status == 200
    assert gateway.get("/api/both/a", headers=bearer(key)).status == 200  # a key as Bearer: key auth
    assert gateway.get("/api/both/a", headers=bearer(k1.token())).status == 200
    assert [seen.headers["x-consumer-id"] for seen in upstream.seen] == [bob_app.pk] * 3
    assert all("authorization" not in seen.headers and "x-api-key" not in seen.headers for seen in upstream.seen)
    expired = gateway.get("/api/both/a", headers=bearer(k1.token(exp=int(time.time()) - 600)))
    assert expired.status == 401
    assert "has expired" in expired.json()["detail"]
    both = gateway.get("/api/both/a", headers={"X-API-Key": key, **bearer(k1.token())})
    assert both.status == 401
    assert "not both" in both.json()["detail"]
    neither = gateway.get("/api/both/a")
    assert neither.status == 401
    assert "API key" in neither.json()["detail"]


def test_a_jwt_only_api_refuses_an_api_key(gateway, jwt_api, key, upstream):
    assert gateway.get("/api/jwt/a", headers={"X-API-Key": key}).status == 401
    assert gateway.get("/api/jwt/a", headers=bearer(key)).status == 401
    assert upstream.seen == []


# -- attribution ---------------------------------------------------------------------------------------------------


def test_limits_and_usage_count_the_request_as_the_mapped_consumers(
    gateway, acme, upstream, bob_app, key, issuer, k1, redis_client
):
    per_consumer = services.policy_create(
        tenant=acme, name="three-a-minute", policy_type="rate_limiting", config={"requests_per_minute": 3}, actor=None
    )
    per_identity = services.policy_create(
        tenant=acme,
        name="two-per-key",
        policy_type="rate_limiting",
        config={"requests_per_minute": 2, "key_extraction": "key_id"},
        actor=None,
    )
    api = publish(
        acme,
        upstream.url,
        base_path="/api/lim",
        auth_method="key_or_jwt",
        jwt_issuers=[issuer],
        policies=[per_consumer, per_identity],
    )
    subscribe(bob_app, api)
    first = services.consumer_identity_create(consumer=bob_app, issuer=issuer, external_id="user-1", actor=None)
    services.consumer_identity_create(consumer=bob_app, issuer=issuer, external_id="user-2", actor=None)
    carol_app = services.consumer_create(tenant=acme, name="carol-app", actor=None)
    subscribe(carol_app, api)
    services.consumer_identity_create(consumer=carol_app, issuer=issuer, external_id="carol", actor=None)

    user1, user2, carol = k1.token(), k1.token(sub="user-2"), k1.token(sub="carol")
    assert gateway.get("/api/lim/a", headers=bearer(user1)).status == 200
    assert gateway.get("/api/lim/a", headers=bearer(user1)).status == 200
    limited = gateway.get("/api/lim/a", headers=bearer(user1))
    assert limited.status == 429  # the per-key policy counts this identity on its own
    assert limited.json()["policy"] == "two-per-key"
    assert gateway.get("/api/lim/a", headers=bearer(user2)).status == 200  # bob's third: same consumer
    limited = gateway.get("/api/lim/a", headers={"X-API-Key": key})
    assert limited.status == 429  # bob's API key shares bob's consumer counter
    assert limited.json()["policy"] == "three-a-minute"
    assert gateway.get("/api/lim/a", headers=bearer(carol)).status == 200  # another consumer, other counters

    assert [s.headers["x-consumer-id"] for s in upstream.seen] == [bob_app.pk] * 3 + [carol_app.pk]
    recorder = get_gateway().usage
    recorder.flush(redis_client)
    minute = usage_buckets.minute_of(time.time())
    fields = set()
    for candidate in (minute - 60, minute):
        for field in redis_client.hkeys(usage_buckets.minute_key(acme.pk, candidate)):
            fields.add(usage_buckets.Dimension.parse(field.decode()))
    by_consumer_key = {(d.consumer, d.key, d.status) for d in fields if d.api == api.pk}
    assert (bob_app.pk, first.pk, 200) in by_consumer_key
    assert (bob_app.pk, first.pk, 429) in by_consumer_key
    assert any(consumer == carol_app.pk and status == 200 for consumer, _key, status in by_consumer_key)


# -- auto-provisioning ---------------------------------------------------------------------------------------------


def test_auto_provision_makes_a_subscribed_consumer_on_the_first_token(gateway, acme, upstream, jwks_server, k1):
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="open-id",
        issuer=ISS,
        audiences=[AUD],
        jwks_url=jwks_server.url,
        consumer_claim="client_id",
        auto_provision=True,
        actor=None,
    )
    plan = services.plan_create(tenant=acme, name="free", actor=None)
    api = publish(acme, upstream.url, base_path="/api/auto", auth_method="jwt", jwt_issuers=[issuer], plans=[plan])
    token = k1.token(sub=None, client_id="svc-42")
    response = gateway.get("/api/auto/a", headers=bearer(token))
    assert response.status == 200, response.body
    identity = ConsumerIdentity.objects.select_related("consumer").get(issuer=issuer, external_id="svc-42")
    assert identity.consumer.tenant_id == acme.pk
    subscription = Subscription.objects.get(consumer=identity.consumer, api=api)
    assert (subscription.status, subscription.plan_id) == (Subscription.Status.ACTIVE, plan.pk)
    assert upstream.seen[-1].headers["x-consumer-id"] == identity.consumer_id
    assert gateway.get("/api/auto/a", headers=bearer(k1.token(sub=None, client_id="svc-42"))).status == 200
    assert ConsumerIdentity.objects.filter(issuer=issuer).count() == 1
    # A claim value no consumer may carry (a control character) provisions nothing: 403, not an error.
    refused = gateway.get("/api/auto/a", headers=bearer(k1.token(sub=None, client_id="svc\n43")))
    assert refused.status == 403
    assert ConsumerIdentity.objects.filter(issuer=issuer).count() == 1


def test_without_auto_provision_an_unknown_subject_creates_nothing(gateway, jwt_api, k1):
    before = Consumer.objects.count()
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(sub="stranger"))).status == 403
    assert Consumer.objects.count() == before


@pytest.mark.slow
def test_auto_provision_under_two_gunicorn_workers_makes_one_consumer(live_env, tmp_path, acme, k1):
    server = JwksServer()
    server.publish(k1)
    env = {**live_env, "GATEWAY_CONFIG_POLL_SECONDS": "0.2", "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    try:
        with recording_upstream() as upstream, gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
            issuer = services.jwt_issuer_create(
                tenant=acme,
                name="open-id",
                issuer=ISS,
                audiences=[AUD],
                jwks_url=server.url,
                auto_provision=True,
                actor=None,
            )
            publish(acme, upstream.url, base_path="/api/auto", auth_method="jwt", jwt_issuers=[issuer])
            warm = k1.token(sub="warm-up")
            deadline = time.monotonic() + 30
            started = time.monotonic()
            while requests.get(url + "/api/auto/a", headers=bearer(warm), timeout=30).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            print("warm-up took", time.monotonic() - started)
            token = k1.token(sub="racer")
            with ThreadPoolExecutor(16) as pool:
                statuses = list(
                    pool.map(
                        lambda _: requests.get(url + "/api/auto/a", headers=bearer(token), timeout=10).status_code,
                        range(32),
                    )
                )
            assert statuses == [200] * 32
            identity = ConsumerIdentity.objects.get(issuer=issuer, external_id="racer")
            assert Consumer.objects.filter(name__startswith="racer").count() == 1
            assert {s.headers["x-consumer-id"] for s in upstream.seen if s.path == "/a"} >= {identity.consumer_id}
    finally:
        server.stop()


def test_an_address_that_keeps_sending_bad_tokens_is_throttled_but_cached_good_tokens_pass(
    gateway, jwt_api, k1, k2, settings_gateway
):
    settings_gateway(AUTH_FAILURE_LIMIT=3)  # read when the worker's gateway is made, at the first request
    good = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(good)).status == 200
    forged = k2.token(headers={"kid": "k1"})  # a signature that does not verify: costs a check each time
    statuses = [gateway.get("/api/jwt/a", headers=bearer(forged)).status for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    throttled = gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="new")))
    assert throttled.status == 429  # not verified while the address is refused
    assert int(throttled.header("Retry-After")) >= 1
    assert gateway.get("/api/jwt/a", headers=bearer(good)).status == 200  # verified before: a cache hit
    assert gateway.get("/api/jwt/a", headers=bearer(good), remote_addr="127.0.0.2").status == 200
