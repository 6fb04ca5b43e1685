"""JWT / OIDC authentication: a signed token from one of the API's issuers, mapped to a consumer.

The pipeline calls this module for APIs whose ``auth_method`` is ``jwt``, or ``key_or_jwt`` when the request
carries a JWT-shaped token (``presents_jwt``); otherwise key authentication runs.

One request, in order:

1. The token: ``Authorization: Bearer <token>``, or the query parameter an issuer names in ``token_in_query``
   (a token in the query that no issuer of the API allows there: 401). Exactly one; at most ``MAX_TOKEN_BYTES``.
2. A token verified lately (same bytes, by SHA-256) is taken from the worker's token cache until its ``exp``: a
   repeat token costs a hash and a dictionary lookup. Otherwise it is verified with PyJWT: the header's ``alg``
   must be a public-key algorithm the issuer allows (never ``none``, never HS*: a token signed with HMAC over the
   RSA public key is refused before any key is used), ``iss`` must equal an issuer of the API exactly, the key
   comes from the issuer's keys by ``kid`` (gateway.jwks), ``aud`` must name one of the issuer's audiences,
   ``exp`` is required, ``exp``/``nbf``/``iat`` are checked with the issuer's leeway.
3. The issuer's ``consumer_claim`` (``sub``, or ``azp``/``client_id``) is looked up as a ``ConsumerIdentity`` of
   that issuer, through the same cache levels and evictions as API keys (worker, Redis, database; see
   ``IdentityResolver``). No identity: 403, or for an ``auto_provision`` issuer a new consumer (subscribed to
   the API, see apimgmt.services.jwt_consumer_provision).
4. The consumer's record goes through the same access checks as a key's (blocked: 403; no active subscription to
   this API: 403), and then plans, limits, quotas, usage and IP rules treat it like a key's caller. Its
   ``key_id`` is the identity's id (``cid_…``): limits scoped per key count each identity on its own.

Refusals are 401 with ``WWW-Authenticate: Bearer realm=…, error="invalid_token"`` and a detail naming the problem
(never the token), or 403. Failures that cost a verification, a key fetch or a lookup count toward the address's
authentication-failure throttle (gateway.auth_throttle), as unknown keys do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import threading
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import jwt
import redis
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import DatabaseError
from jwt import exceptions as jwt_errors

from apimgmt import invalidation, selectors, services
from apimgmt.redis_client import get_redis
from apimgmt.selectors import IssuerSpec, KeyRecord
from apimgmt.validation import JWT_ALGORITHMS
from gateway import auth, auth_throttle, jwks, metrics
from gateway.chain import Exchange, Result
from gateway.config import db_call
from gateway.problems import GatewayResponse, problem
from gateway.routing import Route

if TYPE_CHECKING:
    from gateway.pipeline import Gateway

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
# Verified tokens kept per worker (cleared whole when full: they refill at one verification each).
TOKEN_CACHE_SIZE = 10_000
# The query parameter RFC 6750 §2.3 names: a token there is refused with a clear answer unless an issuer allows it.
STANDARD_QUERY_PARAM = "access_token"
_ACCEPTED_ALGORITHMS = frozenset(JWT_ALGORITHMS)
_ALGORITHM_NAME = re.compile(r"^[A-Za-z0-9]{1,16}\Z")
# Claim values no ConsumerIdentity can have: control characters (refused by the services), lone surrogates.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# Failures that cost a signature check, a key fetch or an identity lookup: counted per address like unknown keys.
COUNTED_REASONS = frozenset(
    {"bad_signature", "expired", "not_yet_valid", "wrong_audience", "unknown_kid", "bad_claims", "unmapped"}
)
_REQUIRED_CLAIMS = ("exp", "iss")
_TIME_CLAIMS = ("exp", "nbf", "iat")
_LAST_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z: later "dates" are junk, and past what a float holds
# Auto-provisioning caps (ProvisionBudget): new consumers per issuer, and per issuer and client address, a window.
PROVISION_WINDOW_SECONDS = 60
PROVISIONS_PER_ISSUER = 60
PROVISIONS_PER_ADDRESS = 10
MISSING = (
    "This API needs a token from one of its issuers: send it as 'Authorization: Bearer <token>'."  # no error= code
)


@dataclass(frozen=True)
class TokenFailure:
    status: int  # 401, 403, 429 or 503
    reason: str  # metric label
    detail: str
    retry_after: int = 0


# ex.state entry of a request authenticated with a token: (issuer id, external id, exp plus leeway as time.time()).
IDENTITY_STATE = "jwt_identity"


@dataclass
class _Verified:
    """A token that passed verification: whose it is, until when, and against which key set."""

    issuer: IssuerSpec
    keys: jwks.IssuerKeys
    generation: int
    until: float  # time.time(): exp plus the issuer's leeway
    claims: dict[str, Any]
    external_id: str


# The identity being resolved in this thread (greenlet): the resolver's cache levels speak in hashes only.
_resolving: ContextVar[tuple[str, str]] = ContextVar("jwt_identity_resolving")


class IdentityResolver(auth.KeyResolver):
    """Identity hash -> the consumer's KeyRecord through the worker's cache, then Redis, then the database.

    The hash is ``apimgmt.invalidation.identity_cache_hash(issuer id, external id)``, in the same space as key
    hashes: the control plane's evictions (an identity made or deleted, its consumer blocked, unblocked or
    deleted, a subscription changed, IP lists edited) reach this cache on the same stream as key evictions, and
    its Redis entries are the key cache's (``cache:api:key:<hash>``, tombstoned the same way).
    """

    kind = "identity"

    def resolve_identity(self, issuer_id: str, external_id: str) -> KeyRecord | None:
        identity_hash = invalidation.identity_cache_hash(issuer_id, external_id)
        token = _resolving.set((issuer_id, external_id))  # what _from_redis_or_db reads when the caches miss
        try:
            return self.resolve(identity_hash)
        finally:
            _resolving.reset(token)

    def forget(self, issuer_id: str, external_id: str) -> None:
        """Drop the identity from this worker's cache and from Redis (where "no such identity" may be cached): the
        next lookup reads the database."""
        identity_hash = invalidation.identity_cache_hash(issuer_id, external_id)
        self.evict([identity_hash])
        client = get_redis()
        if client is not None:
            with contextlib.suppress(redis.RedisError):
                client.delete(invalidation.key_cache_name(identity_hash))

    def _load(self, key_hash: str) -> KeyRecord | None:
        issuer_id, external_id = _resolving.get()
        return db_call(selectors.identity_record, issuer_id, external_id)


class ProvisionBudget:
    """How many consumers auto-provisioning may still make now: per issuer, and per issuer and client address, in a
    fixed window shared by every worker through Redis (each worker counts alone while Redis is down).

    Each new subject of an ``auto_provision`` issuer becomes a consumer. Where anyone can get tokens from the
    provider (open sign-up), a script could mint subjects by the thousand and fill the tenant with consumers; the
    caps bound that to ``PROVISIONS_PER_ISSUER`` a window, of which one address gets ``PROVISIONS_PER_ADDRESS``.
    Tokens of subjects that already have their consumer are never limited by it."""

    def __init__(self) -> None:
        self.local: dict[str, int] = {}
        self.lock = threading.Lock()

    def spend(self, issuer_id: str, address: str) -> int | None:
        """Take one provisioning from the budget: None when allowed, else the seconds until the window ends. The
        address's count goes first: an address past its own cap does not use up the issuer's."""
        now = time.time()
        start = int(now // PROVISION_WINDOW_SECONDS) * PROVISION_WINDOW_SECONDS
        issuer_key = f"jwt_provisions:{{{issuer_id}}}:{start}"
        address_key = f"{issuer_key}:{auth_throttle.throttle_scope(address)}"
        for key, limit in ((address_key, PROVISIONS_PER_ADDRESS), (issuer_key, PROVISIONS_PER_ISSUER)):
            count = self._count(key)
            if count > limit:
                if count == limit + 1:  # once per window and counter
                    logger.warning(
                        "auto-provisioning paused for a JWT issuer: too many new consumers this window",
                        extra={
                            "issuer_id": issuer_id,
                            "limit": limit,
                            "per": "address" if key == address_key else "issuer",
                        },
                    )
                return max(1, math.ceil(start + PROVISION_WINDOW_SECONDS - now))
        return None

    def _count(self, key: str) -> int:
        client = get_redis()
        if client is not None:
            try:
                pipe = client.pipeline(transaction=False)
                pipe.incr(key)
                pipe.expire(key, 2 * PROVISION_WINDOW_SECONDS)
                count, _ = pipe.execute()
                return int(count)
            except redis.RedisError:
                pass  # counted in this worker meanwhile
        with self.lock:
            if len(self.local) >= 10_000:  # keys name their window: old ones are dropped with the rest
                self.local.clear()
            count = self.local[key] = self.local.get(key, 0) + 1
        return count


class JwtState:
    """A worker's JWT caches: issuers' keys, verified tokens, identities. Evictions come with the key evictions."""

    def __init__(self, gateway: Gateway) -> None:
        self.keys = jwks.KeyCache()
        self.identities = IdentityResolver()
        self.tokens: dict[bytes, _Verified] = {}
        self.provision_lock = threading.Lock()
        self.provisions = ProvisionBudget()
        gateway.routes.on_evict.append(self.identities.evict)
        gateway.routes.on_keys_lost.append(self.identities.clear)


_STATES: weakref.WeakKeyDictionary[Any, JwtState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_of(gateway: Gateway) -> JwtState:
    """The worker's JWT state (made on the first JWT request)."""
    state = _STATES.get(gateway)
    if state is None:
        with _STATES_LOCK:
            state = _STATES.get(gateway)
            if state is None:
                state = _STATES[gateway] = JwtState(gateway)
    return state


# -- finding the token -------------------------------------------------------------------------------------------


def _query_params(route: Route) -> set[str]:
    """The query parameters a token may come in for this API (and the standard one, refused unless allowed)."""
    names = {issuer.token_in_query for issuer in route.spec.jwt_issuers if issuer.token_in_query}
    names.add(STANDARD_QUERY_PARAM)
    return names


def find_tokens(ex: Exchange) -> list[auth.Credential]:
    """Every token the request carries: Bearer values of Authorization, and values of the token query parameters."""
    found: list[auth.Credential] = []
    authorization = ex.environ.get("HTTP_AUTHORIZATION")
    if isinstance(authorization, str) and authorization[:7].lower() == "bearer ":
        found.extend(auth.Credential(part.strip(), "bearer") for part in authorization[7:].split(","))
    query = ex.query
    if query:
        params = _query_params(ex.route)
        if "%" in query or any(param in query for param in params):  # a name may come percent-encoded
            for pair in auth.query_pairs(query):
                name, _sep, value = pair.partition("=")
                name = unquote_plus(name)
                if name in params:
                    found.append(auth.Credential(unquote_plus(value), "query", param=name))
    return found


def _carries_query_key(ex: Exchange) -> bool:
    """Does the query hold the API's key parameter? Next to a token it is refused like a key in the header: the
    upstream would otherwise get the key (only the token's own parameter is stripped)."""
    param = ex.route.spec.key_query_param
    if not param or not ex.query:
        return False
    return any(unquote_plus(pair.partition("=")[0]) == param for pair in auth.query_pairs(ex.query))


def _jwt_shaped(token: str) -> bool:
    return token.count(".") == 2


def presents_jwt(ex: Exchange) -> bool:
    """For key_or_jwt: does the request carry a JWT-shaped token (then JWT auth runs, else key auth)?"""
    authorization = ex.environ.get("HTTP_AUTHORIZATION")
    if isinstance(authorization, str) and authorization[:7].lower() == "bearer " and _jwt_shaped(authorization):
        return True
    if ex.query:
        return any(_jwt_shaped(c.key) for c in find_tokens(ex) if c.source == "query")
    return False


# -- the step ----------------------------------------------------------------------------------------------------


def authenticate(ex: Exchange) -> Result | None:
    """The authenticate phase for a token: None when the caller is known (ex.record, ex.claims set), or the refusal."""
    gateway = ex.gateway
    state = state_of(gateway)
    route = ex.route
    throttled = gateway.auth_throttle.retry_after(ex.client_ip) if gateway.auth_throttle.blocked else None
    failure, record = _authenticate(ex, state, throttled)
    if failure is None:
        assert record is not None
        ex.done.record, ex.done.key = record, record.key_id
        ex.record = record
        return None
    retry = throttled if failure.reason == "throttled" else None
    if failure.reason in COUNTED_REASONS:
        retry = gateway.auth_throttle.failed(ex.client_ip)
    if retry is not None:
        metrics.auth_throttled_total.labels(route.api_id).inc()
        return ex.fail(
            problem(
                429,
                "auth-throttled",
                "Too many requests",
                f"Too many requests with tokens that are not valid came from your address. Retry in {retry} s.",
                ex.request_id,
                headers=[("Retry-After", str(retry))],
            )
        )
    metrics.count_auth_failure(route.api_id, "token_" + failure.reason)  # token_expired, token_unknown_kid, ...
    if record is not None and failure.status == 403 and failure.reason != "wrong_tenant":
        ex.done.record, ex.done.key = record, record.key_id
    return ex.fail(token_problem(route, failure, ex.request_id))


def _authenticate(ex: Exchange, state: JwtState, throttled: int | None) -> tuple[TokenFailure | None, KeyRecord | None]:
    route = ex.route
    tokens = find_tokens(ex)
    if not tokens:
        return TokenFailure(401, "missing", MISSING), None
    if len(tokens) > 1:
        return TokenFailure(401, "duplicate", "Send exactly one token (found more than one)."), None
    credential = tokens[0]
    if route.auth_method == "key_or_jwt" and (route.key_header_environ in ex.environ or _carries_query_key(ex)):
        return TokenFailure(401, "duplicate", "Send an API key or a token, not both."), None
    if credential.source == "query" and not any(
        issuer.token_in_query == credential.param for issuer in route.spec.jwt_issuers
    ):
        return TokenFailure(
            401,
            "token_in_query",
            "This API does not accept tokens in the query string; send 'Authorization: Bearer <token>'.",
        ), None
    token = credential.key
    if len(token) > MAX_TOKEN_BYTES:
        return TokenFailure(401, "too_large", f"The token is too large (more than {MAX_TOKEN_BYTES} bytes)."), None
    ex.credential = credential  # from here on the pipeline strips it before the upstream
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    verified = _cached(state, digest, route)
    if verified is None:
        if throttled is not None:
            return TokenFailure(429, "throttled", ""), None
        outcome = _verify(state, token, route)
        if isinstance(outcome, TokenFailure):
            return outcome, None
        verified = outcome
        if len(state.tokens) >= TOKEN_CACHE_SIZE:
            state.tokens.clear()
        state.tokens[digest] = verified
    issuer = verified.issuer
    if credential.source == "query" and issuer.token_in_query != credential.param:
        return TokenFailure(
            401,
            "token_in_query",
            f"Issuer {issuer.name!r} does not accept tokens in the query string; send 'Authorization: Bearer <token>'.",
        ), None
    ex.claims = verified.claims
    try:
        # A value no identity can hold (control characters are refused when identities are made; NUL cannot reach
        # PostgreSQL, a lone surrogate cannot be hashed) is nobody's: no lookup, no provisioning attempt.
        storable = not _UNSTORABLE.search(verified.external_id)
        record = state.identities.resolve_identity(issuer.id, verified.external_id) if storable else None
        if record is None and storable and issuer.auto_provision:
            provisioned = _provision(state, issuer, verified.external_id, route, ex.client_ip)
            if isinstance(provisioned, TokenFailure):
                return provisioned, None
            record = provisioned
    except (DatabaseError, redis.RedisError):
        logger.exception("identity lookup failed")
        return TokenFailure(503, "store_unavailable", "Tokens cannot be checked right now; retry shortly.", 1), None
    if record is not None:
        # Whose token it is and until when: a WebSocket connection opened with it is re-checked by its identity
        # (evictions name identities as they name keys) and closed when the token expires.
        if ex.state is None:
            ex.state = {}
        ex.state[IDENTITY_STATE] = (issuer.id, verified.external_id, verified.until)
    if record is None:
        return TokenFailure(
            403,
            "unmapped",
            f"No application is registered for this token's {issuer.consumer_claim} at issuer {issuer.name!r}.",
        ), None
    failure = auth.check_access(record, route, time.time())
    if failure is not None:
        if failure.reason == "blocked":
            detail = "The application this token belongs to is blocked."
        else:
            detail = "The application this token belongs to has no active subscription to this API."
        return TokenFailure(failure.status, failure.reason, detail), record
    return None, record


def _cached(state: JwtState, digest: bytes, route: Route) -> _Verified | None:
    """The verification of this very token, still good for this API (None: verify it)."""
    verified = state.tokens.get(digest)
    if verified is None:
        return None
    if verified.until <= time.time() or verified.generation != verified.keys.generation:
        state.tokens.pop(digest, None)
        return None
    for issuer in route.spec.jwt_issuers:
        if issuer is verified.issuer:
            return verified
    for issuer in route.spec.jwt_issuers:
        # The route table was reloaded (new objects): the same settings still hold the same verification.
        if issuer.id == verified.issuer.id and issuer == verified.issuer:
            verified.issuer = issuer
            return verified
    return None  # a token of an issuer this API does not accept: verified (and refused) as such


def _verify(state: JwtState, token: str, route: Route) -> _Verified | TokenFailure:
    """Verify the token against the API's issuers: the first failure names the problem."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt_errors.PyJWTError:
        return TokenFailure(
            401, "malformed", "The token is not a well-formed JWT (header.claims.signature, base64url, JSON)."
        )
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        return TokenFailure(401, "bad_algorithm", "Unsigned tokens (alg none) are not accepted.")
    if alg not in _ACCEPTED_ALGORITHMS:
        named = alg if _ALGORITHM_NAME.match(alg) else "of this kind"
        return TokenFailure(
            401,
            "bad_algorithm",
            f"Tokens signed with algorithm {named} are not accepted: only public-key signatures "
            f"({', '.join(JWT_ALGORITHMS)}).",
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return TokenFailure(401, "malformed", "The token's key id (kid) is not a string.")
    times = _numeric_date_problem(unverified)
    if times is not None:
        return TokenFailure(401, "bad_claims", times)
    iss = unverified.get("iss")
    candidates = [issuer for issuer in route.spec.jwt_issuers if issuer.issuer == iss]
    if not candidates:
        if iss is None:
            return TokenFailure(401, "bad_claims", "The token has no issuer (iss) claim.")
        return TokenFailure(401, "wrong_issuer", "The token's issuer (iss) is not one this API accepts.")
    first: TokenFailure | None = None
    for issuer in candidates:  # usually one; several issuers may share an iss with different settings
        outcome = _verify_with(state, token, alg, kid, issuer)
        if isinstance(outcome, _Verified):
            return outcome
        first = first or outcome
    assert first is not None
    return first


def _numeric_date_problem(claims: dict[str, Any]) -> str | None:
    """Why the token's exp, nbf or iat is not a NumericDate (RFC 7519 §2: a JSON number), or None.

    PyJWT takes anything int() takes: "exp": "9999999999" would pass as a date, "exp": true as 1, and an integer
    too large for a float would pass its checks and fail later. Refused here, before any key is used."""
    for name in _TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if type(value) not in (int, float) or not (0 <= value <= _LAST_NUMERIC_DATE):  # NaN fails the comparison
            return f"The token's {name} claim is not a date (seconds since 1970 as a JSON number)."
    return None


def _verify_with(
    state: JwtState, token: str, alg: str, kid: str | None, issuer: IssuerSpec
) -> _Verified | TokenFailure:
    if alg not in issuer.algorithms:
        return TokenFailure(
            401, "bad_algorithm", f"Issuer {issuer.name!r} does not sign with {alg} ({', '.join(issuer.algorithms)})."
        )
    keys = state.keys.for_issuer(issuer)
    generation = keys.generation
    try:
        key = keys.key(kid, alg)
    except jwks.KeyRefused as exc:
        return TokenFailure(401, exc.reason, exc.detail)
    except jwks.KeysUnavailable as exc:
        return TokenFailure(
            503,
            "keys_unavailable",
            f"The signing keys of issuer {issuer.name!r} cannot be fetched right now; retry shortly.",
            exc.retry_after,
        )
    if keys.generation != generation:
        generation = keys.generation  # fetched while this request waited: the key came from the new set
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=list(issuer.audiences),
            issuer=issuer.issuer,
            leeway=issuer.leeway_seconds,
            options={"require": list(_REQUIRED_CLAIMS)},
        )
    except jwt_errors.PyJWTError as exc:
        return _claims_failure(exc)
    value = claims.get(issuer.consumer_claim)
    if not isinstance(value, str) or not value or len(value) > 255:
        return TokenFailure(
            401,
            "bad_claims",
            f"The token has no usable {issuer.consumer_claim} claim (the issuer's claim naming the application).",
        )
    exp = claims["exp"]
    return _Verified(issuer, keys, generation, float(exp) + issuer.leeway_seconds, claims, value)


def _claims_failure(exc: jwt_errors.PyJWTError) -> TokenFailure:
    if isinstance(exc, jwt_errors.ExpiredSignatureError):
        return TokenFailure(401, "expired", "The token has expired (exp).")
    if isinstance(exc, jwt_errors.ImmatureSignatureError):
        which = "iat" if "iat" in str(exc) else "nbf"
        return TokenFailure(401, "not_yet_valid", f"The token is not valid yet ({which} is in the future).")
    if isinstance(exc, jwt_errors.InvalidAudienceError):
        return TokenFailure(401, "wrong_audience", "The token's audience (aud) is not one this API accepts.")
    if isinstance(exc, jwt_errors.InvalidIssuerError):
        return TokenFailure(401, "wrong_issuer", "The token's issuer (iss) is not one this API accepts.")
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return TokenFailure(401, "bad_claims", f"The token has no {exc.claim} claim.")
    if isinstance(exc, jwt_errors.InvalidSignatureError):
        return TokenFailure(401, "bad_signature", "The token's signature does not verify.")
    if isinstance(exc, jwt_errors.DecodeError):
        return TokenFailure(401, "malformed", "The token is not a well-formed JWT.")
    if isinstance(exc, (jwt_errors.InvalidKeyError, jwt_errors.InvalidAlgorithmError)):
        return TokenFailure(401, "wrong_algorithm", "The token's key (kid) cannot check its algorithm.")
    return TokenFailure(401, "bad_claims", "The token's claims are not valid (exp, nbf, iat, sub or jti).")


def _provision(
    state: JwtState, issuer: IssuerSpec, external_id: str, route: Route, address: str
) -> KeyRecord | TokenFailure | None:
    """A consumer (and its subscription to this API) for an identity the auto-provisioning issuer vouches for, within
    the issuer's provisioning budget (ProvisionBudget)."""
    with state.provision_lock:  # one provisioning at a time per worker; other workers race safely in the database
        # The caches may hold "no such identity" until the eviction arrives: read the database now (a request that
        # waited here for another one's provisioning of the same identity finds it made, and spends no budget).
        state.identities.forget(issuer.id, external_id)
        record = state.identities.resolve_identity(issuer.id, external_id)
        if record is not None:
            return record
        wait = state.provisions.spend(issuer.id, address)
        if wait is not None:
            return TokenFailure(
                429,
                "provision_limited",
                f"Issuer {issuer.name!r} has had too many new applications registered lately; retry in {wait} s.",
                wait,
            )
        try:
            db_call(
                lambda: services.jwt_consumer_provision(
                    issuer_id=issuer.id, external_id=external_id, api_id=route.api_id
                )
            )
        except (ValidationError, ObjectDoesNotExist) as exc:
            # A claim value no consumer may have (control characters ...), or the issuer changed meanwhile: 403.
            fields = ", ".join(getattr(exc, "message_dict", None) or [type(exc).__name__])  # not the messages: they
            logger.warning("JWT consumer not provisioned for issuer %s (%s)", issuer.name, fields)  # name the claim
            return None
        state.identities.forget(issuer.id, external_id)
    return state.identities.resolve_identity(issuer.id, external_id)


def token_problem(route: Route, failure: TokenFailure, request_id: str) -> GatewayResponse:
    """401 with a Bearer challenge (error="invalid_token" unless no token came at all), 403, or 503."""
    realm = auth.quotable(route.spec.api_name)
    if failure.status == 401:
        challenge = f'Bearer realm="{realm}"'
        if failure.reason != "missing":
            code = "invalid_request" if failure.reason in ("duplicate", "token_in_query") else "invalid_token"
            description = auth.quotable(failure.detail.replace('"', "'"))
            challenge += f', error="{code}", error_description="{description}"'
        return problem(
            401, "invalid-token", "Unauthorized", failure.detail, request_id, headers=[("WWW-Authenticate", challenge)]
        )
    if failure.status == 429:
        return problem(
            429,
            "provisioning-limited",
            "Too many requests",
            failure.detail,
            request_id,
            headers=[("Retry-After", str(max(1, failure.retry_after)))],
        )
    if failure.status == 503:
        return problem(
            503,
            "token-check-unavailable",
            "Service unavailable",
            failure.detail,
            request_id,
            headers=[("Retry-After", str(max(1, failure.retry_after)))],
        )
    return problem(403, "forbidden", "Forbidden", failure.detail, request_id)
