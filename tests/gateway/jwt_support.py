"""JWT test helpers shared by the gateway's token tests: real signing keys, a JWKS server on loopback, an issuer and
an API that accepts its tokens.

The fixtures are imported by name into the test modules that use them (as tests/gateway/conftest.py's are), so a
module that mints no token pays for no RSA key.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from apimgmt import services
from apimgmt.models import Api, Consumer, JwtIssuer, Tenant
from tests.gateway.conftest import publish, subscribe

ISS = "https://id.example.com/"
AUD = "users-api"
# The subject the fixtures' API maps to bob's app.
SUBJECT = "user-1"


# -- keys and tokens ---------------------------------------------------------------------------------------------


class SigningKey:
    """A private key the test signs with, and its public JWK (what the JWKS server publishes)."""

    def __init__(self, kid: str, private: Any, alg: str) -> None:
        self.kid = kid
        self.private = private
        self.alg = alg
        algorithm = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
        self.jwk = {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token valid for five minutes from now for ISS, AUD and SUBJECT; a claim given as None is left out."""
        body = {name: value for name, value in default_claims(**claims).items() if value is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def default_claims(**extra: Any) -> dict[str, Any]:
    """The claims of a token the fixtures' issuer accepts, with ``extra`` added or replacing them."""
    now = int(time.time())
    return {"iss": ISS, "aud": AUD, "sub": SUBJECT, "iat": now, "exp": now + 300, **extra}


def b64url(data: bytes) -> str:
    """base64url without padding, as JWTs write their three parts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def k1() -> SigningKey:
    return rsa_key("k1")


@pytest.fixture(scope="module")
def k2() -> SigningKey:
    return rsa_key("k2")


# -- a JWKS server on loopback -----------------------------------------------------------------------------------


class JwksServer:
    """Serves ``document`` as JSON at /jwks.json and counts the fetches; ``stop()`` takes it off the network."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def publish(self, *keys: SigningKey) -> None:
        self.document = {"keys": [key.jwk for key in keys]}

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def jwks_server(k1: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.publish(k1)
    yield server
    server.stop()


# -- an issuer and an API that accepts its tokens ----------------------------------------------------------------


def publish_for_tokens(
    tenant: Tenant,
    upstream_url: str,
    consumer: Consumer,
    issuer: JwtIssuer,
    *,
    auth_method: str = "jwt",
    subject: str = SUBJECT,
    **options: Any,
) -> Api:
    """An API accepting ``issuer``'s tokens (``options`` as tests.gateway.conftest.publish takes them), ``consumer``
    subscribed to it and known to the issuer as ``subject``."""
    api = publish(tenant, upstream_url, auth_method=auth_method, jwt_issuers=[issuer], **options)
    subscribe(consumer, api)
    services.consumer_identity_create(consumer=consumer, issuer=issuer, external_id=subject, actor=None)
    return api


@pytest.fixture
def issuer(acme: Tenant, jwks_server: JwksServer) -> JwtIssuer:
    return services.jwt_issuer_create(
        tenant=acme, name="acme-id", issuer=ISS, audiences=[AUD], jwks_url=jwks_server.url, actor=None
    )


@pytest.fixture
def jwt_api(acme: Tenant, upstream: Any, bob_app: Consumer, issuer: JwtIssuer) -> Api:
    """acme's /api/jwt (auth_method jwt, issuer acme-id) before the recording upstream; bob's app is user-1."""
    return publish_for_tokens(acme, upstream.url, bob_app, issuer, base_path="/api/jwt")
