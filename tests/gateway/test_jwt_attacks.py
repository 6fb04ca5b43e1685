"""Attacks on the gateway's JWT authentication, each with what the attacker sees and what the upstream does not.

Algorithm confusion, key-source injection in the header, hostile kids and claims, tokens carried between APIs and
tenants, the verified-token cache, auto-provisioning floods and the JWKS fetch (redirects, huge and slow answers).
The keys are real (cryptography), the JWKS servers and upstreams are real servers on loopback.
"""
# ruff: noqa: F811  (the fixtures of tests/gateway/jwt_support.py are imported by name)

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.exceptions import ValidationError
from jwt.algorithms import ECAlgorithm
from jwt.utils import der_to_raw_signature

from apimgmt import services
from apimgmt.models import Api, Consumer, ConsumerIdentity, Subscription
from gateway import jwks, jwt_auth
from gateway.wsgi import get_gateway
from tests.gateway.conftest import publish, reload_routes, subscribe
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
    rsa_key,
)
from tests.gateway.upstreams import recording_upstream
from tests.support.secrets_scan import find_secrets
from tests.support.servers import gunicorn


@pytest.fixture(autouse=True)
def _no_failure_throttle(settings_gateway: Any) -> None:
    settings_gateway(AUTH_FAILURE_LIMIT=0)  # these tests send many bad tokens from one address on purpose


@pytest.fixture(scope="module")
def e1() -> SigningKey:
    return ec_key("e1")


@pytest.fixture(scope="module")
def attacker() -> SigningKey:
    return rsa_key("k1")


def raw_token(header: dict[str, Any] | str, payload: dict[str, Any] | str, signature: bytes = b"sig") -> str:
    """A token with exactly these header and payload bytes (strings are taken as the JSON text)."""
    head = header if isinstance(header, str) else json.dumps(header)
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{b64url(head.encode())}.{b64url(body.encode())}.{b64url(signature)}"


def signed_raw(key: SigningKey, header: str, payload: str) -> str:
    """RS256 over exactly these header and payload JSON texts (for claims json.dumps would not write)."""
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    algorithm = jwt.get_algorithm_by_name("RS256")
    signature = algorithm.sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64url(signature)}"


def es256_on_p384(private: ec.EllipticCurvePrivateKey) -> str:
    """An "ES256" token signed with a P-384 key (PyJWT will not make one: the curve is ES384's)."""
    signing_input = f"{b64url(json.dumps({'alg': 'ES256', 'kid': 'p384'}).encode())}.{b64url(json.dumps(default_claims()).encode())}"
    der = private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64url(der_to_raw_signature(der, private.curve))}"


def refused(response: Any, status: int = 401) -> str:
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/problem+json"
    return str(response.json()["detail"])


# -- algorithm confusion -----------------------------------------------------------------------------------------


def test_every_spelling_of_none_and_every_hmac_keyed_with_the_public_key_is_refused_before_a_key_is_fetched(
    gateway, jwt_api, jwks_server, upstream, k1
):
    spellings = ["none", "None", "nOnE", "NONE", "none ", " none", "", "<img src=x onerror=alert(1)>"]
    for alg in spellings:
        detail = refused(
            gateway.get("/api/jwt/a", headers=bearer(raw_token({"alg": alg, "kid": "k1"}, default_claims())))
        )
        assert "not accepted" in detail, alg
        assert "<img" not in detail  # an algorithm name is repeated only when it is letters and digits
    pem = k1.public_pem()
    secrets = {"PEM": pem, "JWK": json.dumps(k1.jwk).encode(), "JWK n": k1.jwk["n"].encode()}
    for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
        for name, secret in secrets.items():
            header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": "k1"}).encode())
            payload = b64url(json.dumps(default_claims()).encode())
            mac = hmac.new(secret, f"{header}.{payload}".encode(), digest).digest()
            detail = refused(gateway.get("/api/jwt/a", headers=bearer(f"{header}.{payload}.{b64url(mac)}")))
            assert f"algorithm {alg} are not accepted" in detail, (alg, name)
    # A header with "alg" twice: the last one counts, for the check and for the verification alike.
    twice = '{"alg": "RS256", "kid": "k1", "alg": "none"}'
    assert "alg none" in refused(gateway.get("/api/jwt/a", headers=bearer(raw_token(twice, default_claims()) + "")))
    assert jwks_server.fetches == 0  # none of these cost a key fetch
    assert upstream.seen == []


def test_an_algorithm_the_issuer_does_not_list_is_refused_even_with_a_key_that_verifies_it(
    gateway, acme, upstream, bob_app, k1, e1
):
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="rsa-only",
        issuer=ISS,
        audiences=[AUD],
        public_keys={"keys": [k1.jwk, e1.jwk]},
        algorithms=["RS256"],
        actor=None,
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/rsa")
    assert "does not sign with ES256" in refused(gateway.get("/api/rsa/a", headers=bearer(e1.token())))
    for alg in ("RS384", "PS256"):
        token = jwt.encode(default_claims(), k1.private, algorithm=alg, headers={"kid": "k1"})
        assert f"does not sign with {alg}" in refused(gateway.get("/api/rsa/a", headers=bearer(token)))
    assert gateway.get("/api/rsa/a", headers=bearer(k1.token())).status == 200


def test_a_kid_naming_a_key_of_another_family_or_curve_is_refused(gateway, acme, upstream, bob_app, k1, e1):
    p384 = ec.generate_private_key(ec.SECP384R1())
    p384_jwk = {**json.loads(ECAlgorithm.to_jwk(p384.public_key())), "kid": "p384"}
    pinned = {**k1.jwk, "kid": "pinned", "alg": "PS256"}
    exchange = x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x25519_jwk = {"kty": "OKP", "crv": "X25519", "x": b64url(exchange), "kid": "x25519"}  # a key-agreement curve
    signer = ed25519.Ed25519PrivateKey.generate()
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="mixed",
        issuer=ISS,
        audiences=[AUD],
        public_keys={"keys": [k1.jwk, e1.jwk, p384_jwk, pinned]},
        algorithms=["RS256", "PS256", "ES256", "EdDSA"],
        actor=None,
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/mix")
    cases = {
        "ES256 token naming the RSA key": jwt.encode(
            default_claims(), e1.private, algorithm="ES256", headers={"kid": "k1"}
        ),
        "RS256 token naming the EC key": jwt.encode(
            default_claims(), k1.private, algorithm="RS256", headers={"kid": "e1"}
        ),
        "ES256 signed on P-384": es256_on_p384(p384),
        "EdDSA naming the EC key": jwt.encode(default_claims(), signer, algorithm="EdDSA", headers={"kid": "e1"}),
        "RS256 with a key pinned to PS256": jwt.encode(
            default_claims(), k1.private, algorithm="RS256", headers={"kid": "pinned"}
        ),
    }
    for name, token in cases.items():
        detail = refused(gateway.get("/api/mix/a", headers=bearer(token)))
        assert "key (kid)" in detail, (name, detail)
    with pytest.raises(ValidationError) as refusal:  # a key-agreement curve is no signing key
        services.jwt_issuer_update(jwt_issuer=issuer, actor=None, public_keys={"keys": [k1.jwk, x25519_jwk]})
    assert "public_keys" in refusal.value.message_dict
    assert upstream.seen == []
    assert gateway.get("/api/mix/a", headers=bearer(e1.token())).status == 200


# -- where keys come from ----------------------------------------------------------------------------------------


def test_keys_offered_in_the_token_header_jku_x5u_jwk_x5c_are_never_used_or_fetched(
    gateway, jwt_api, jwks_server, upstream, attacker, k1
):
    trap = JwksServer()  # the attacker's JWKS: the gateway must never ask it
    trap.publish(attacker)
    try:
        offers = {
            "jwk": {"jwk": attacker.jwk},
            "jku": {"jku": trap.url},
            "x5u": {"x5u": trap.url},
            "x5c": {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
            "all, no kid": {"kid": None, "jwk": attacker.jwk, "jku": trap.url},
        }
        for name, extra in offers.items():
            headers = {key: value for key, value in extra.items() if value is not None}
            token = jwt.encode(default_claims(), attacker.private, algorithm="RS256", headers=headers)
            if "kid" in extra:  # PyJWT writes no kid unless asked: this one has none
                assert "kid" not in jwt.get_unverified_header(token)
            detail = refused(gateway.get("/api/jwt/a", headers=bearer(token)))
            assert "signature does not verify" in detail, (name, detail)
        # A critical header extension the gateway does not implement is refused even when properly signed.
        critical = jwt.encode(
            default_claims(), k1.private, algorithm="RS256", headers={"kid": "k1", "crit": ["x-bind"]}
        )
        refused(gateway.get("/api/jwt/a", headers=bearer(critical)))
        assert trap.fetches == 0
        assert upstream.seen == []
    finally:
        trap.stop()


def test_kids_shaped_like_paths_sql_or_junk_are_just_unknown_keys(gateway, jwt_api, jwks_server, upstream, k1):
    for kid in ("../../../../etc/passwd", "' OR '1'='1' --", "k1\u0000", "k1 ", "K1", "x" * 3000, "%6b1", "k1/../k1"):
        token = jwt.encode(default_claims(), k1.private, algorithm="RS256", headers={"kid": kid})
        detail = refused(gateway.get("/api/jwt/a", headers=bearer(token)))
        assert detail == "The token's key id (kid) is not one of its issuer's keys.", kid
    for kid in (7, ["k1"], {"k": "k1"}, True):
        detail = refused(
            gateway.get("/api/jwt/a", headers=bearer(raw_token({"alg": "RS256", "kid": kid}, default_claims())))
        )
        assert "kid" in detail or "well-formed" in detail, kid
    assert upstream.seen == []


# -- hostile claims ----------------------------------------------------------------------------------------------


def test_deeply_nested_or_oversized_json_is_a_clean_401(gateway, jwt_api, upstream, k1):
    for depth in (900, 2500):
        nested = "[" * depth + "]" * depth
        for token in (
            raw_token('{"alg": "RS256", "kid": "k1", "x": ' + nested + "}", default_claims()),
            raw_token({"alg": "RS256", "kid": "k1"}, '{"sub": "user-1", "x": ' + nested + "}"),
        ):
            if len(token) > jwt_auth.MAX_TOKEN_BYTES:
                assert "too large" in refused(gateway.get("/api/jwt/a", headers=bearer(token)))
            else:
                refused(gateway.get("/api/jwt/a", headers=bearer(token)))  # parsed or not: a 401, not an error
    many = k1.token(**{f"c{i}": i for i in range(600)})
    assert "too large" in refused(gateway.get("/api/jwt/a", headers=bearer(many)))
    assert upstream.seen == []


def test_the_audience_may_be_a_string_or_a_list_of_strings_and_nothing_else(gateway, jwt_api, upstream, k1):
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(aud=["someone-else", AUD]))).status == 200
    for aud in ([], ["someone-else"], [AUD, 5], {"aud": AUD}, 5, "", AUD.upper(), AUD + " "):
        detail = refused(gateway.get("/api/jwt/a", headers=bearer(k1.token(aud=aud, jti=repr(aud)))))
        assert "aud" in detail, (aud, detail)
    assert "aud" in refused(gateway.get("/api/jwt/a", headers=bearer(k1.token(aud=None))))
    assert len(upstream.seen) == 1


def test_the_issuer_must_match_exactly_trailing_slash_case_and_type_included(gateway, jwt_api, upstream, k1):
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"})
    for iss in (ISS.rstrip("/"), ISS + "/", ISS.upper(), ISS + " ", [ISS], {"iss": ISS}, 1):
        token = signed_raw(k1, header, json.dumps(default_claims(iss=iss)))
        detail = refused(gateway.get("/api/jwt/a", headers=bearer(token)))
        assert "issuer (iss)" in detail, (iss, detail)
    assert upstream.seen == []


def test_times_must_be_json_numbers(gateway, jwt_api, upstream, k1):
    now = int(time.time())
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"})
    base = {"iss": ISS, "aud": AUD, "sub": "user-1", "iat": now}
    cases = {
        "exp as a string": {"exp": str(now + 300)},
        "exp as true": {"exp": True},
        "exp as a list": {"exp": [now + 300]},
        "nbf as a string": {"exp": now + 300, "nbf": str(now - 10)},
        "nbf as false": {"exp": now + 300, "nbf": False},
        "iat as a string": {"exp": now + 300, "iat": str(now)},
    }
    for name, times in cases.items():
        token = signed_raw(k1, header, json.dumps({**base, **times}))
        response = gateway.get("/api/jwt/a", headers=bearer(token))
        assert response.status == 401, (name, response.body)
        detail = refused(response)
        assert "exp" in detail or "nbf" in detail or "iat" in detail, (name, detail)
    # Numbers past what a float holds, and JSON's non-finite extensions: 401, never an error.
    for exp in ("1" + "0" * 400, "1e400", "Infinity", "NaN"):
        token = signed_raw(k1, header, json.dumps(base)[:-1] + f', "exp": {exp}}}')
        assert refused(gateway.get("/api/jwt/a", headers=bearer(token))), exp
    assert upstream.seen == []
    # Fractions are NumericDates too.
    fraction = signed_raw(k1, header, json.dumps({**base, "exp": now + 300.5, "nbf": now - 0.5}))
    assert gateway.get("/api/jwt/a", headers=bearer(fraction)).status == 200


def test_iat_or_nbf_past_the_leeway_in_the_future_is_refused(gateway, jwt_api, upstream, k1):
    now = int(time.time())
    assert "iat" in refused(gateway.get("/api/jwt/a", headers=bearer(k1.token(iat=now + 3600))))
    assert "nbf" in refused(gateway.get("/api/jwt/a", headers=bearer(k1.token(nbf=now + 3600))))
    assert gateway.get("/api/jwt/a", headers=bearer(k1.token(nbf=now + 10, iat=now + 10))).status == 200  # leeway
    assert len(upstream.seen) == 1


def test_a_claim_value_that_cannot_be_stored_or_hashed_maps_to_nobody_without_an_error(
    gateway, jwt_api, upstream, k1, caplog
):
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"})
    for sub in ("user\\u0000-1", "\\ud800", "user-1\\udfff"):  # NUL, lone surrogates (JSON escapes)
        payload = json.dumps(default_claims(sub="PLACEHOLDER")).replace("PLACEHOLDER", sub)
        detail = refused(gateway.get("/api/jwt/a", headers=bearer(signed_raw(k1, header, payload))), 403)
        assert "No application is registered for this token's sub" in detail, sub
    assert "identity lookup failed" not in caplog.text
    assert upstream.seen == []


# -- tokens carried between APIs and tenants ---------------------------------------------------------------------


def test_a_token_verified_for_one_api_is_checked_again_at_an_api_with_other_issuer_settings(
    gateway, acme, globex, jwt_api, jwks_server, upstream, bob_app, k1, django_capture_on_commit_callbacks
):
    """globex trusts the same identity provider (same iss, same keys) for its own audience and its own consumers."""
    globex_issuer = services.jwt_issuer_create(
        tenant=globex, name="globex-id", issuer=ISS, audiences=["globex-api"], jwks_url=jwks_server.url, actor=None
    )
    globex_api = publish(globex, upstream.url, base_path="/api/globex", auth_method="jwt", jwt_issuers=[globex_issuer])
    globex_app = services.consumer_create(tenant=globex, name="globex-app", actor=None)
    subscribe(globex_app, globex_api)
    acme_token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(acme_token)).status == 200  # verified and cached for acme
    detail = refused(gateway.get("/api/globex/a", headers=bearer(acme_token)))
    assert "audience (aud)" in detail  # the cached verification is not globex's
    # A token for both audiences: at globex it is globex's identity of the subject, never acme's consumer.
    both = k1.token(aud=[AUD, "globex-api"])
    assert gateway.get("/api/jwt/a", headers=bearer(both)).status == 200
    assert "No application is registered" in refused(gateway.get("/api/globex/a", headers=bearer(both)), 403)
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_identity_create(consumer=globex_app, issuer=globex_issuer, external_id="user-1", actor=None)
    get_gateway().routes.apply_evictions()  # "no such identity" was cached a moment ago
    assert gateway.get("/api/globex/a", headers=bearer(k1.token(aud=[AUD, "globex-api"], jti="g"))).status == 200
    assert [seen.headers["x-consumer-id"] for seen in upstream.seen] == [bob_app.pk, bob_app.pk, globex_app.pk]
    assert [seen.headers["x-tenant-id"] for seen in upstream.seen] == [acme.pk, acme.pk, globex.pk]


def test_an_api_cannot_accept_another_tenants_issuer(acme, globex, upstream, issuer):
    with pytest.raises(ValidationError) as refusal:
        publish(globex, upstream.url, base_path="/api/steal", auth_method="jwt", jwt_issuers=[issuer])
    assert "jwt_issuers" in refusal.value.message_dict
    globex_app = services.consumer_create(tenant=globex, name="globex-app", actor=None)
    with pytest.raises(ValidationError) as refusal:
        services.consumer_identity_create(consumer=globex_app, issuer=issuer, external_id="user-9", actor=None)
    assert "issuer_id" in refusal.value.message_dict


def test_cached_tokens_stop_working_when_their_issuer_leaves_the_api_or_narrows_its_audiences(
    gateway, acme, jwt_api, issuer, upstream, k1, e1, django_capture_on_commit_callbacks
):
    token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    with django_capture_on_commit_callbacks(execute=True):
        services.jwt_issuer_update(jwt_issuer=issuer, actor=None, audiences=["another-api"])
    reload_routes()
    assert "audience (aud)" in refused(gateway.get("/api/jwt/a", headers=bearer(token)))
    with django_capture_on_commit_callbacks(execute=True):
        services.jwt_issuer_update(jwt_issuer=issuer, actor=None, audiences=[AUD])
    reload_routes()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    other = services.jwt_issuer_create(
        tenant=acme,
        name="other-id",
        issuer="https://other.example.com/",
        audiences=[AUD],
        public_keys={"keys": [e1.jwk]},
        algorithms=["ES256"],
        actor=None,
    )
    with django_capture_on_commit_callbacks(execute=True):
        services.api_update(api=jwt_api, actor=None, jwt_issuers=[other])
    reload_routes()
    assert "issuer (iss)" in refused(gateway.get("/api/jwt/a", headers=bearer(token)))
    assert len(upstream.seen) == 2


def test_a_consumer_deleted_or_unsubscribed_after_its_token_was_cached_is_refused_at_the_next_poll(
    gateway, acme, jwt_api, issuer, bob_app, k1, django_capture_on_commit_callbacks
):
    token = k1.token()
    assert gateway.get("/api/jwt/a", headers=bearer(token)).status == 200
    subscription = Subscription.objects.get(consumer=bob_app, api=jwt_api)
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_cancel(subscription=subscription, actor=None)
    get_gateway().routes.apply_evictions()
    assert "no active subscription" in refused(gateway.get("/api/jwt/a", headers=bearer(token)), 403)
    carol_app = services.consumer_create(tenant=acme, name="carol-app", actor=None)
    subscribe(carol_app, jwt_api)
    services.consumer_identity_create(consumer=carol_app, issuer=issuer, external_id="carol", actor=None)
    carol = k1.token(sub="carol")
    assert gateway.get("/api/jwt/a", headers=bearer(carol)).status == 200
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_delete(consumer=Consumer.objects.get(pk=carol_app.pk), actor=None)
    get_gateway().routes.apply_evictions()
    assert "No application is registered" in refused(gateway.get("/api/jwt/a", headers=bearer(carol)), 403)


# -- what leaves the gateway -------------------------------------------------------------------------------------

_QUOTED = r"[\x20\x21\x23-\x5b\x5d-\x7e]*"


def test_the_challenge_header_carries_only_printable_ascii_whatever_the_api_name(gateway, acme, upstream, issuer, k1):
    """gunicorn refuses a header value with control characters (the answer would be a 500) and a quote would end
    the realm early: an API's name may hold both (control characters are refused since, but older rows keep them)."""
    name = 'Ω "quoted" \\ api\x01\x7f\te'
    odd = publish(acme, upstream.url, base_path="/api/odd", api_name="odd", auth_method="jwt", jwt_issuers=[issuer])
    oddkey = publish(acme, upstream.url, base_path="/api/oddkey", api_name="oddkey")  # key authentication alike
    Api.objects.filter(pk__in=[odd.pk, oddkey.pk]).update(api_name=name)  # as a row written before the check
    pattern = f'Bearer realm="{_QUOTED}"(, error="\\w+", error_description="{_QUOTED}")?'
    for path, headers in (
        ("/api/odd/a", {}),
        ("/api/odd/a", bearer(k1.token(exp=int(time.time()) - 600))),
        ("/api/odd/a", bearer("a.b.c")),
        ("/api/oddkey/a", {}),
        ("/api/oddkey/a", {"X-API-Key": "ak_live_nope"}),
    ):
        response = gateway.get(path, headers=headers)
        assert response.status == 401
        challenge = response.header("WWW-Authenticate") or ""
        assert re.fullmatch(pattern, challenge), (challenge, path, headers)
        assert challenge.startswith('Bearer realm="? ?quoted? ? api?e"'), challenge


def test_no_token_or_claim_value_reaches_the_logs(gateway, jwt_api, upstream, k1, caplog):
    caplog.set_level("DEBUG")
    private_sub = "sub-that-must-stay-out-of-logs"
    tokens = [k1.token(), k1.token(sub=private_sub), k1.token(exp=int(time.time()) - 600), k1.token(sub="a\nb")]
    for token in tokens:
        gateway.get("/api/jwt/a", headers=bearer(token))
    assert not find_secrets(caplog.text)
    assert private_sub not in caplog.text
    assert find_secrets(f"token={tokens[0]}"), "the scan knows what a JWT looks like"


# -- the JWKS fetch ----------------------------------------------------------------------------------------------


class HostileJwksServer:
    """A JWKS "server" on loopback that answers each GET with ``answer(connection)`` (raw bytes, any pace)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests = 0
        self.request_lines: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/jwks.json"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            self.request_lines.append(connection.recv(65536).split(b"\r\n", 1)[0].decode())
            self.requests += 1
            with contextlib.suppress(OSError):
                self.answer(connection, self.stopped)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def hostile() -> Iterator[Any]:
    servers: list[HostileJwksServer] = []

    def make(answer: Any) -> HostileJwksServer:
        servers.append(HostileJwksServer(answer))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def _jwks_api(acme: Any, upstream: Any, bob_app: Any, url: str, path: str) -> None:
    issuer = services.jwt_issuer_create(
        tenant=acme, name=f"id-{path}", issuer=ISS, audiences=[AUD], jwks_url=url, actor=None
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path=f"/api/{path}")


def test_a_jwks_redirect_is_not_followed(gateway, acme, upstream, bob_app, jwks_server, hostile, k1):
    def redirect(connection: socket.socket, stopped: threading.Event) -> None:
        connection.sendall(f"HTTP/1.1 302 Found\r\nLocation: {jwks_server.url}\r\nContent-Length: 0\r\n\r\n".encode())

    server = hostile(redirect)
    _jwks_api(acme, upstream, bob_app, server.url, "redirect")
    detail = refused(gateway.get("/api/redirect/a", headers=bearer(k1.token())), 503)
    assert "cannot be fetched right now" in detail
    assert server.request_lines == ["GET /jwks.json HTTP/1.1"]
    assert jwks_server.fetches == 0  # the place it pointed to was never asked
    assert upstream.seen == []


def test_a_huge_or_gzip_bomb_jwks_answer_is_cut_off_at_the_size_cap(
    gateway, acme, upstream, bob_app, hostile, k1, caplog
):
    def endless(connection: socket.socket, stopped: threading.Event) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"keys": [' + b" " * 65536)
        sent = 0
        while not stopped.is_set() and sent < 64 * 1024 * 1024:
            connection.sendall(b" " * 65536)
            sent += 65536

    bomb = gzip.compress(b'{"keys": [' + b" " * (64 * 1024 * 1024))  # 64 MiB in about 64 KiB

    def compressed(connection: socket.socket, stopped: threading.Event) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
        connection.sendall(head.encode() + bomb)

    for name, answer in (("huge", endless), ("bomb", compressed)):
        _jwks_api(acme, upstream, bob_app, hostile(answer).url, name)
    for name in ("huge", "bomb"):
        started = time.monotonic()
        refused(gateway.get(f"/api/{name}/a", headers=bearer(k1.token())), 503)
        assert time.monotonic() - started < 3
        assert caplog.text.count(f"larger than {jwks.MAX_JWKS_BYTES} bytes") == (1 if name == "huge" else 2)


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_jwks_server_that_drips_is_given_up_on_at_the_total_timeout(
    gateway, acme, upstream, bob_app, hostile, k1, monkeypatch, stage
):
    """One byte every 0.2 s never trips the per-read timeout: only a deadline for the whole fetch ends it."""
    monkeypatch.setattr(jwks, "TOTAL_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(jwks, "READ_TIMEOUT_SECONDS", 0.5)

    def drip(connection: socket.socket, stopped: threading.Event) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
        if stage == "body":
            connection.sendall(head + b"\r\n")
        else:
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
        deadline = time.monotonic() + 20
        while not stopped.is_set() and time.monotonic() < deadline:
            connection.sendall(b" " if stage == "body" else b"X-Drip: 1\r\n"[:1])
            time.sleep(0.2)

    server = hostile(drip)
    _jwks_api(acme, upstream, bob_app, server.url, "drip")
    started = time.monotonic()
    refused(gateway.get("/api/drip/a", headers=bearer(k1.token())), 503)
    assert time.monotonic() - started < 2.5


def test_a_stalled_jwks_fetch_holds_up_only_the_requests_that_need_it(
    gateway, acme, upstream, bob_app, jwt_api, hostile, k1, k2, monkeypatch
):
    """While an issuer's JWKS fetch hangs (up to the total timeout), other issuers' tokens, and that issuer's
    tokens whose key is known, pass at once: only requests that need the fetched set wait for it."""
    release = threading.Event()
    document = json.dumps({"keys": [k1.jwk]}).encode()

    def first_then_stall(connection: socket.socket, stopped: threading.Event) -> None:
        if server.requests == 1:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(document)}\r\n\r\n"
            connection.sendall(head.encode() + document)
        else:
            release.wait(10)

    monkeypatch.setattr(jwks, "TOTAL_TIMEOUT_SECONDS", 10.0)
    monkeypatch.setattr(jwks, "READ_TIMEOUT_SECONDS", 10.0)
    server = hostile(first_then_stall)
    _jwks_api(acme, upstream, bob_app, server.url, "stall")
    assert gateway.get("/api/stall/a", headers=bearer(k1.token())).status == 200  # the set is known now
    # An unknown kid: the refetch hangs, in another thread.
    refetch = threading.Thread(target=lambda: gateway.get("/api/stall/a", headers=bearer(k2.token())))
    refetch.start()
    try:
        deadline = time.monotonic() + 5
        while server.requests < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.requests == 2
        started = time.monotonic()
        assert gateway.get("/api/stall/a", headers=bearer(k1.token(jti="during"))).status == 200
        assert gateway.get("/api/jwt/a", headers=bearer(k1.token(jti="other"))).status == 200
        assert time.monotonic() - started < 1
    finally:
        release.set()
        refetch.join(15)


# -- auto-provisioning -------------------------------------------------------------------------------------------


def test_auto_provisioning_makes_a_bounded_number_of_consumers_per_issuer_and_address(
    gateway, acme, upstream, jwks_server, k1, monkeypatch
):
    monkeypatch.setattr(jwt_auth, "PROVISIONS_PER_ISSUER", 3)
    monkeypatch.setattr(jwt_auth, "PROVISIONS_PER_ADDRESS", 2)
    issuer = services.jwt_issuer_create(
        tenant=acme,
        name="open-signup",
        issuer=ISS,
        audiences=[AUD],
        jwks_url=jwks_server.url,
        auto_provision=True,
        actor=None,
    )
    publish(acme, upstream.url, base_path="/api/open", auth_method="jwt", jwt_issuers=[issuer])
    before = Consumer.objects.filter(tenant=acme).count()

    def call(sub: str, address: str) -> Any:
        return gateway.get("/api/open/a", headers=bearer(k1.token(sub=sub)), remote_addr=address)

    assert [call(f"flood-{i}", "198.51.100.7").status for i in range(2)] == [200, 200]
    limited = call("flood-2", "198.51.100.7")
    assert limited.status == 429
    assert "too many new applications" in limited.json()["detail"]
    assert 1 <= int(limited.header("Retry-After")) <= 60
    assert call("flood-0", "198.51.100.7").status == 200  # a subject that has its consumer is never limited
    assert call("other-1", "203.0.113.5").status == 200  # another address: the issuer's third
    assert call("other-2", "203.0.113.6").status == 429  # the issuer's budget is spent
    assert Consumer.objects.filter(tenant=acme).count() == before + 3
    assert ConsumerIdentity.objects.filter(issuer=issuer).count() == 3


# -- credentials on their way upstream ---------------------------------------------------------------------------


def test_an_api_key_in_the_query_next_to_a_token_is_refused_and_never_forwarded(
    gateway, acme, upstream, bob_app, key, jwks_server, k1
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
    publish_for_tokens(
        acme, upstream.url, bob_app, issuer, base_path="/api/both", auth_method="key_or_jwt", key_query_param="apikey"
    )
    token = k1.token()
    for target, headers in (
        (f"/api/both/a?apikey={key}&jwt={token}", {}),
        (f"/api/both/a?x=1;apikey={key}", bearer(token)),
        (f"/api/both/a?%61pikey={key}", bearer(token)),
    ):
        assert "not both" in refused(gateway.get(target, headers=headers)), target
    assert upstream.seen == []
    # A token parameter spelt with percent-escapes is still a token: one too many here, refused where not allowed.
    assert "exactly one" in refused(gateway.get(f"/api/both/a?j%77t={token}", headers=bearer(token)))
    assert "not accept tokens in the query" in refused(gateway.get(f"/api/both/a?%61ccess_token={token}"))
    assert upstream.seen == []
    # Each alone passes, and the upstream sees neither.
    assert gateway.get(f"/api/both/a?x=1&jwt={token}").status == 200
    assert gateway.get(f"/api/both/a?x=2&apikey={key}").status == 200
    assert [seen.path for seen in upstream.seen] == ["/a?x=1", "/a?x=2"]


@pytest.mark.slow
def test_under_gunicorn_a_blocked_consumer_or_deleted_identity_is_refused_within_about_a_second(
    live_env, tmp_path, acme, bob_app, k1
):
    """Two workers that verified and cached the token; the control plane blocks the consumer, then (unblocked)
    deletes its identity: every worker refuses within about a second, from its cache's eviction, not a TTL."""
    env = {**live_env, "GATEWAY_CONFIG_POLL_SECONDS": "0.2", "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    env["GATEWAY_AUTH_CACHE_SECONDS"] = "300"
    env["GATEWAY_AUTH_FAILURE_LIMIT"] = "0"  # the refusals counted here are the point, not the address's throttle
    with recording_upstream() as upstream, gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
        issuer = services.jwt_issuer_create(
            tenant=acme, name="live-id", issuer=ISS, audiences=[AUD], public_keys={"keys": [k1.jwk]}, actor=None
        )
        api = publish(acme, upstream.url, base_path="/api/live", auth_method="jwt", jwt_issuers=[issuer])
        subscribe(bob_app, api)
        identity = services.consumer_identity_create(consumer=bob_app, issuer=issuer, external_id="user-1", actor=None)
        token = k1.token(exp=int(time.time()) + 600)

        def statuses(count: int = 8) -> set[int]:
            # New connections: gunicorn spreads them over both workers.
            return {
                requests.get(url + "/api/live/a", headers=bearer(token), timeout=30).status_code for _ in range(count)
            }

        deadline = time.monotonic() + 30
        while statuses() != {200}:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        def refused_after(change: Any, status: int) -> float:
            """Seconds until two batches of new connections in a row all get ``status`` (a batch may land on one
            worker only, so one batch proves nothing about the other)."""
            change()
            started = time.monotonic()
            in_a_row = 0
            while in_a_row < 2:
                assert time.monotonic() - started < 5
                in_a_row = in_a_row + 1 if statuses(8) == {status} else 0
                time.sleep(0.05)
            return time.monotonic() - started

        blocked = refused_after(lambda: services.consumer_block(consumer=bob_app, actor=None), 403)
        assert blocked < 1.5
        services.consumer_unblock(consumer=Consumer.objects.get(pk=bob_app.pk), actor=None)
        while statuses() != {200}:
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        deleted = refused_after(lambda: services.consumer_identity_delete(identity=identity, actor=None), 403)
        assert deleted < 1.5
    print(f"refused {blocked:.2f} s after the block, {deleted:.2f} s after the identity's deletion")
