"""Key authentication: find exactly one credential, check it offline, then resolve it through three cache levels."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote_plus

import redis
from django.conf import settings

from apimgmt import invalidation, keys, selectors
from apimgmt.redis_client import get_redis
from apimgmt.selectors import KeyRecord
from gateway import metrics
from gateway.config import db_call
from gateway.problems import GatewayResponse, problem
from gateway.routing import Route

logger = logging.getLogger(__name__)

# Unknown hashes are remembered briefly so a flood of made-up (but well-formed) keys cannot reach the database
# once per request; short, so a key created a moment ago starts working quickly anyway.
NEGATIVE_TTL_SECONDS = 2.0
_NEGATIVE_MARK = "null"
_TOMBSTONE = invalidation.TOMBSTONE.encode()
# How long a request waits for another one's lookup of the same key before looking it up itself.
INFLIGHT_WAIT_SECONDS = 5.0
_PAIR_SEPARATORS = re.compile("[&;]")


@dataclass(frozen=True)
class Credential:
    """The key a request presented and where it was found (so the proxy can strip it)."""

    key: str
    source: str  # "header", "bearer" or "query"
    param: str = ""  # the query parameter it came in ("" = the API's key_query_param)


@dataclass(frozen=True)
class AuthFailure:
    status: int  # 401 or 403
    reason: str  # metric label: missing, malformed, duplicate, unknown, revoked, expired, inactive, blocked, ...
    detail: str


# One body for every "no valid key" case, so a caller cannot tell unknown from revoked or expired.
INVALID_KEY = "A valid API key is required. Send it in the API's key header or as 'Authorization: Bearer <key>'."


def find_credentials(environ: dict[str, object], route: Route, query: str) -> list[Credential]:
    """Every credential the request carries in the places this API accepts (more than one is an error)."""
    found: list[Credential] = []
    header_value = environ.get(route.key_header_environ)
    if isinstance(header_value, str) and header_value.strip():
        # Repeated headers arrive comma-joined; each part is a credential.
        found.extend(Credential(part.strip(), "header") for part in header_value.split(","))
    if route.spec.accept_bearer:
        authorization = environ.get("HTTP_AUTHORIZATION")
        if isinstance(authorization, str) and authorization[:7].lower() == "bearer ":
            found.extend(Credential(part.strip(), "bearer") for part in authorization[7:].split(","))
    param = route.spec.key_query_param
    if param and query and param in query:
        for pair in query_pairs(query):
            name, _sep, value = pair.partition("=")
            if unquote_plus(name) == param:
                found.append(Credential(unquote_plus(value), "query"))
    return found


def query_pairs(query: str) -> list[str]:
    """The query's name=value pairs split at "&" and at ";" alike.

    Some servers and frameworks still take ";" as a pair separator (HTML 4's recommendation), so ``x=1;apikey=K``
    carries a key to them: the gateway reads and strips the key parameter by the same rule.
    """
    return _PAIR_SEPARATORS.split(query)


def strip_query_param(query: str, param: str) -> str:
    """The raw query without the key parameter; every other pair is kept byte for byte.

    Pairs are split at "&" and at ";" (as query_pairs reads them), so ``x=1;apikey=K`` loses the key too.
    """
    kept: list[str] = []
    for pair in query.split("&"):
        parts = pair.split(";")
        left = [part for part in parts if unquote_plus(part.partition("=")[0]) != param]
        if len(left) == len(parts):
            kept.append(pair)
        elif left:
            kept.append(";".join(left))
    return "&".join(kept)


def upstream_query(query: str, credential: Credential | None, route: Route) -> str:
    """The raw query as the upstream hears it: without the key's parameter (the one the key came in, else the API's
    ``key_query_param``), so a key never reaches the upstream or its logs."""
    if not query:
        return query
    if credential is not None and credential.source == "query" and credential.param:
        param = credential.param
    else:
        param = route.spec.key_query_param
    return strip_query_param(query, param) if param else query


class _Cache:
    """A bounded per-worker map with expiry; cleared whole when full (cheap, and refills from Redis)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.items: dict[str, tuple[float, KeyRecord | None]] = {}

    def get(self, key: str, now: float) -> tuple[bool, KeyRecord | None]:
        entry = self.items.get(key)
        if entry is None or entry[0] < now:
            return False, None
        return True, entry[1]

    def put(self, key: str, value: KeyRecord | None, expires: float) -> None:
        if len(self.items) >= self.max_size:
            self.items.clear()
        self.items[key] = (expires, value)


class KeyResolver:
    """Hash → KeyRecord through the worker's cache, then Redis, then the database.

    Entries leave by expiry (``GATEWAY_AUTH_CACHE_SECONDS``) or by eviction: the config poller hands evict() the
    hashes the control plane named (apimgmt.invalidation). A lookup in flight when its key is evicted may have
    read the old state, so its result is used for that request but not cached.
    """

    kind = "key"  # what the records are looked up by, for log lines

    def __init__(self) -> None:
        self.ttl = float(settings.GATEWAY["AUTH_CACHE_SECONDS"])
        max_size = int(settings.GATEWAY["AUTH_CACHE_MAX_SIZE"])
        self.positive = _Cache(max_size)
        # Negative entries have their own, smaller budget so a flood cannot evict the real keys.
        self.negative = _Cache(max(100, max_size // 10))
        self.lock = threading.Lock()
        self.inflight: dict[str, threading.Event] = {}
        # Hashes evicted while their lookup was in flight (see evict()).
        self.raced: set[str] = set()
        # Lookups that went past the worker's cache (to Redis or the database), for operators and tests.
        self.misses = 0

    def clear(self) -> None:
        with self.lock:
            self.positive.items.clear()
            self.negative.items.clear()

    def cached(self, key_hash: str) -> KeyRecord | None:
        """The record when this worker's cache holds a live entry for the key (no Redis, no database)."""
        hit, record = self.positive.get(key_hash, time.monotonic())
        return record if hit else None

    def evict(self, key_hashes: list[str]) -> None:
        """Forget these keys now (the control plane changed them); every other entry stays."""
        with self.lock:
            for key_hash in key_hashes:
                self.positive.items.pop(key_hash, None)
                self.negative.items.pop(key_hash, None)
                if key_hash in self.inflight:
                    self.raced.add(key_hash)

    def resolve(self, key_hash: str) -> KeyRecord | None:
        now = time.monotonic()
        hit, record = self.positive.get(key_hash, now)
        if hit:
            return record
        hit, record = self.negative.get(key_hash, now)
        if hit:
            return None
        # One lookup per key at a time in this worker: when a popular key's entry expires under load, every
        # request in flight would otherwise query Redis and the database at once (and, under gevent, each
        # greenlet would hold its own pooled database connection while it waits).
        with self.lock:
            pending = self.inflight.get(key_hash)
            leader = pending is None
            if pending is None:
                pending = self.inflight[key_hash] = threading.Event()
        if not leader:
            pending.wait(INFLIGHT_WAIT_SECONDS)
            hit, record = self.positive.get(key_hash, time.monotonic())
            if hit:
                return record
            hit, record = self.negative.get(key_hash, time.monotonic())
            if hit:
                return None
        self.misses += 1
        metrics.key_cache_misses_total.inc()
        try:
            record, cacheable = self._from_redis_or_db(key_hash)
            with self.lock:
                if key_hash in self.raced:
                    cacheable = False
                    if leader:
                        self.raced.discard(key_hash)
                if cacheable:
                    if record is None:
                        self.negative.put(key_hash, None, now + NEGATIVE_TTL_SECONDS)
                    else:
                        self.positive.put(key_hash, record, now + self.ttl)
        finally:
            if leader:
                with self.lock:
                    self.inflight.pop(key_hash, None)
                    self.raced.discard(key_hash)
                pending.set()
        return record

    def _load(self, key_hash: str) -> KeyRecord | None:
        """The record from the database. Gateway requests never reach Django's request_finished signal: db_call
        gives the pooled connection back, or every thread (every greenlet under gevent) that ever missed the caches
        would keep one."""
        return db_call(selectors.key_record_by_hash, key_hash)

    def _from_redis_or_db(self, key_hash: str) -> tuple[KeyRecord | None, bool]:
        client = get_redis()
        cache_key = invalidation.key_cache_name(key_hash)
        if client is not None:
            try:
                cached = client.get(cache_key)
                if cached is not None:
                    if cached in (b"null", _NEGATIVE_MARK):
                        return None, True
                    if cached != _TOMBSTONE:  # evicted a moment ago: read the database, leave the tombstone
                        return KeyRecord.from_json(json.loads(cached)), True
            except redis.RedisError:
                logger.warning("%s cache in Redis unavailable; reading from the database", self.kind)
                client = None
        record = self._load(key_hash)
        if client is not None:
            # NX: never over an eviction's tombstone (this read may have started before the change committed).
            try:
                if record is None:
                    client.set(cache_key, _NEGATIVE_MARK, ex=max(1, int(NEGATIVE_TTL_SECONDS)), nx=True)
                else:
                    client.set(cache_key, json.dumps(record.to_json()), ex=max(1, int(self.ttl)), nx=True)
            except redis.RedisError:
                pass
        return record, True


def check_access(record: KeyRecord | None, route: Route, now: float) -> AuthFailure | None:
    """Why ``record`` may not call ``route`` (None when it may)."""
    if record is None:
        return AuthFailure(401, "unknown", INVALID_KEY)
    if record.revoked:
        return AuthFailure(401, "revoked", INVALID_KEY)
    if not record.active:
        return AuthFailure(401, "inactive", INVALID_KEY)
    if record.expires_at is not None and record.expires_at <= now:
        return AuthFailure(401, "expired", INVALID_KEY)
    if not record.consumer_active:
        return AuthFailure(403, "blocked", "The application this key belongs to is blocked.")
    if record.tenant_id != route.tenant_id or route.api_id not in record.subscriptions:
        reason = "wrong_tenant" if record.tenant_id != route.tenant_id else "not_subscribed"
        return AuthFailure(403, reason, "This key has no active subscription to this API.")
    return None


# What may stand inside a quoted-string of WWW-Authenticate: printable ASCII but the quote and the backslash.
_NOT_QUOTABLE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]+")


def quotable(text: str) -> str:
    """``text`` fit for a quoted header value: an API's name may hold control characters (gunicorn refuses such a
    header, so the answer would be a 500), quotes (which would end the realm early) or characters beyond Latin-1."""
    return _NOT_QUOTABLE.sub("?", text)


def auth_problem(route: Route, failure: AuthFailure, request_id: str) -> GatewayResponse:
    """The answer to a failed authentication: 401 with a Bearer challenge for the API's realm, or 403."""
    slug = "invalid-key" if failure.status == 401 else "forbidden"
    title = "Unauthorized" if failure.status == 401 else "Forbidden"
    headers = [("WWW-Authenticate", f'Bearer realm="{quotable(route.spec.api_name)}"')] if failure.status == 401 else []
    return problem(failure.status, slug, title, failure.detail, request_id, headers=headers)


# A client address over its authentication-failure allowance (gateway.auth_throttle) presenting an uncached key.
THROTTLED = AuthFailure(429, "throttled", "Too many requests with keys that are not valid came from your address.")


def authenticate(
    environ: dict[str, object], route: Route, query: str, resolver: KeyResolver, *, lookup: bool = True
) -> tuple[KeyRecord | None, Credential | None, AuthFailure | None]:
    """The request's key record and credential, or why it may not pass.

    ``lookup=False`` (the address is throttled): a well-formed key is accepted only from the worker's cache;
    any other is THROTTLED, with no look-up in Redis or the database.
    """
    credentials = find_credentials(environ, route, query)
    if not credentials:
        return None, None, AuthFailure(401, "missing", INVALID_KEY)
    if len(credentials) > 1:
        return None, None, AuthFailure(401, "duplicate", "Send exactly one API key (found more than one credential).")
    credential = credentials[0]
    if not keys.is_well_formed(credential.key):
        return None, credential, AuthFailure(401, "malformed", INVALID_KEY)
    key_hash = keys.hash_key(credential.key)
    if not lookup:
        record = resolver.cached(key_hash)
        if record is None:
            return None, credential, THROTTLED
    else:
        record = resolver.resolve(key_hash)
    failure = check_access(record, route, time.time())
    return record, credential, failure
