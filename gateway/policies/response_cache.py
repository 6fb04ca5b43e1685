"""response_cache: GET and HEAD answers kept in Redis, within the upstream's own Cache-Control, up to a TTL cap.

One step per API with a response_cache policy. Its ``request`` looks the answer up; its ``response`` stores a
cacheable answer from the upstream (so the same object is both the lookup and the store).

Where it runs
    ``cache_lookup`` (after limits: a hit counts toward rate limits and quotas), or ``access`` when the policy says
    ``count_hits_toward_quota: false``: then a hit is answered before the limits step and costs no quota; a miss
    goes on through limits as usual. Either way the caller is authenticated first.

What is stored
    Answers of the upstream to GET with status 200, 203, 204, 300, 301, 308, 404 or 410 (a HEAD is answered from
    a GET's entry; a HEAD that misses goes upstream as a HEAD and is not stored), unless: ``Cache-Control`` says
    no-store, private or no-cache; ``Set-Cookie`` (or ``Set-Cookie2``) is present; ``Vary: *``; ``Vary`` names a header the gateway
    sets per request (Host, X-Forwarded-*, Forwarded, X-Request-ID) or one whose value the upstream saw differs
    from the client's (a header transform changed it); the upstream request carried ``Authorization`` or
    ``Cookie`` (the caller's own credentials for the upstream) and the answer is not marked public, s-maxage or
    must-revalidate; it is an event stream; the body is larger than
    ``max_entry_bytes``. A body streamed to the client (over 64 KiB) is kept as it passes and stored once
    complete, within a per-worker budget (BUFFER_BYTES). Lifetime: s-maxage, else max-age, else Expires (less
    the upstream's Age), else the policy's ``ttl_seconds``; never longer than ``ttl_seconds``. Hop-by-hop
    headers, the gateway's own (X-Request-ID, rate-limit headers, the API's extra headers) and CORS headers are
    not stored: they are added again for each request, so a hit carries this request's values. Response header
    transforms run after the store, on a hit as on a miss.

A client's ``Cache-Control: no-cache`` (or ``max-age=0``, or ``Pragma: no-cache``) skips the lookup and refreshes
the entry; ``no-store`` skips the lookup and the store. Answers carry ``X-Cache: HIT``, ``MISS`` or ``BYPASS``;
a hit also ``Age``.

Conditional requests (RFC 9111 §4.3.2, RFC 9110 §13.2)
    A hit whose stored status is 2xx answers ``304 Not Modified`` when the client already holds it:
    ``If-None-Match`` names the stored ETag (weak comparison) or is ``*``; else, without ``If-None-Match``,
    ``If-Modified-Since`` is a valid date, not in the future, and not earlier than the stored Last-Modified (or
    Date, or the time it was stored). The 304 has no body and only the stored headers RFC 9110 §15.4.5 names
    (plus Last-Modified when there is no ETag), then the same per-request headers as any hit. Another stored
    status (a 404, a redirect) is answered in full: preconditions apply to 2xx answers only (RFC 9110 §13.2.1).
    A miss goes upstream with the conditions as the client sent them; the upstream's own 304 is never stored.

Keys
    ``rc:{<tenant>}:<api>:<generation>:<digest>``: the tenant's hash tag (one Redis Cluster slot per tenant), the
    API, a generation (a digest of the API's whole configuration as the route table holds it: any change to the API
    or one of its policies makes new keys, so older entries are never read again and expire), and a digest of
    method (HEAD shares GET's entry), path, raw query (without the credential's parameter), the client's Host and
    X-Forwarded-Host/-Proto and the scheme (upstreams build links and redirects from what they hear of them), the
    caller's plan when plans' request header transforms apply to the route, the values those transforms make from
    the token's claims (``{jwt.role}``), the policy's ``vary_headers``, and the
    consumer when ``per_consumer``. An answer with ``Vary`` is stored under a variant key
    that also covers those request headers; the plain key then holds a small marker naming them. Workers remember
    the names, so a hit is one Redis GET; in cache_lookup on an API with limits, that GET is sent in the limiter's
    write (``limits_read``) and a hit is answered from the limits step (``limits_reply``): one round trip in all.

No stampede: per worker, one request per key goes to the upstream; the others wait for it (at most the API's
total timeout, 30 s at most) and read the cache; an answer streamed to its client lets them go at once (a client
reading slowly must not hold them). Redis unavailable: the cache is skipped for a moment and every request goes to
the upstream; the cache never causes an error answer.
"""

from __future__ import annotations

import calendar
import dataclasses
import email.utils
import hashlib
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import redis
from django.core.exceptions import ValidationError
from redis.exceptions import RedisClusterException

from apimgmt import client_address, redis_client
from apimgmt.policy_types import response_cache as cache_config
from apimgmt.redis_client import get_redis
from apimgmt.selectors import PolicySpec
from gateway import auth, metrics, ratelimit
from gateway.chain import ACCESS, CACHE_LOOKUP, REQUEST_TRANSFORMS, Exchange, Result, Step
from gateway.policies import headers as header_transforms
from gateway.proxy import HOP_BY_HOP

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

POLICY_TYPE = "response_cache"

# Statuses an answer may be stored with (RFC 9110 §15.1's heuristically cacheable ones, without 206 ranges and
# without 405/414/501, which the gateway itself mostly answers).
CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
# Request headers whose value is the gateway's, per request: an answer varying on them is never stored.
_PER_REQUEST = frozenset(
    {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "forwarded"}
)
# Request headers (as sent upstream) that carry the caller's own credentials for the upstream: an answer to such a
# request is stored only when the upstream marks it shareable (public, s-maxage, must-revalidate: RFC 9111 §3.5).
_CREDENTIALS = frozenset({"authorization", "cookie"})
# Response headers never stored: hop-by-hop ones, the gateway's own per-request ones, and the age (computed per hit).
_NOT_STORED = HOP_BY_HOP | {"x-request-id", "age", "x-cache", "content-length"}
# How long Redis is left alone after it failed (requests go to the upstream meanwhile).
BACKOFF_SECONDS = 1.0
# What a Redis call may raise when Redis (or a cluster's slot map) is out of reach: never a reason to fail a request.
_REDIS_FAILURES = (redis.RedisError, RedisClusterException)
# The longest a request waits for another one's upstream fetch of the same key.
MAX_WAIT_SECONDS = 30.0
# Streamed answers held per worker while they pass to their clients, to be stored once complete: past this, a
# streamed answer is passed on without being kept (many large misses at once must not exhaust a worker's memory).
BUFFER_BYTES = 64 * 1024 * 1024
# Vary names remembered per worker (by plain key); cleared whole when full.
MEMO_SIZE = 10_000
# Stored headers a 304 from the cache carries: those RFC 9110 §15.4.5 requires of a 304 when a 200 would have them
# (the others describe the body the client already holds). Last-Modified too when there is no ETag, so a client that
# validates by date keeps its validator.
_NOT_MODIFIED_KEEPS = frozenset({"cache-control", "content-location", "date", "etag", "expires", "vary"})
NOT_MODIFIED = "304 Not Modified"
# One entity-tag of an If-None-Match list (RFC 9110 §8.8.3), its opaque tag captured: a weak comparison ignores W/.
_ENTITY_TAG = re.compile(r'[ \t,]*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')
# Entry layout: 1 byte kind, 4 bytes length of the JSON head, the head, then the body.
_RESPONSE, _MARKER = b"R", b"V"
_HEAD_LENGTH = struct.Struct(">I")


class _Health:
    down_until = 0.0


class _Budget:
    """Bytes of streamed answers held in this worker until they are complete and stored (at most BUFFER_BYTES)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self.lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self.lock:
            self.used -= size


_health = _Health()
_buffered = _Budget(BUFFER_BYTES)
# Plain key -> the Vary names its answers were stored with (so a hit needs one GET).
_vary_memo: dict[str, tuple[str, ...]] = {}
# Key -> (event set when the fetch is over, monotonic start): one upstream fetch per key and worker at a time.
_inflight: dict[str, tuple[threading.Event, float]] = {}
_inflight_lock = threading.Lock()


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    """One step from the API's response_cache policy, its config checked again (an old or hand-edited row that the
    validator refuses leaves the API uncached, with an error in the log)."""
    if not policies:
        return []
    policy = policies[0]
    try:
        config = cache_config.validate(dict(policy.config))
    except (ValidationError, TypeError, ValueError) as exc:
        logger.error("response_cache policy %s (%s) is invalid and does not apply: %s", policy.name, policy.id, exc)
        return []
    return [ResponseCache(route, dataclasses.replace(policy, config=config))]


class _Entry:
    """A stored answer as read back from Redis."""

    __slots__ = ("age", "body", "headers", "status", "stored_at")

    def __init__(self, status: str, headers: list[tuple[str, str]], stored_at: float, age: int, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.stored_at = stored_at
        self.age = age
        self.body = body


def encode_entry(status: str, headers: list[tuple[str, str]], stored_at: float, age: int, body: bytes) -> bytes:
    head = json.dumps({"s": status, "h": headers, "t": stored_at, "a": age}, separators=(",", ":")).encode()
    return _RESPONSE + _HEAD_LENGTH.pack(len(head)) + head + body


def _encode_marker(names: tuple[str, ...]) -> bytes:
    return _MARKER + ",".join(names).encode("latin-1")


def _decode(raw: bytes) -> _Entry | tuple[str, ...] | None:
    """An entry, the Vary names of a marker, or None for anything unreadable (treated as a miss)."""
    try:
        kind = raw[:1]
        if kind == _MARKER:
            text = raw[1:].decode("latin-1")
            return tuple(text.split(",")) if text else ()
        if kind != _RESPONSE:
            return None
        (length,) = _HEAD_LENGTH.unpack_from(raw, 1)
        start = 1 + _HEAD_LENGTH.size
        head = json.loads(raw[start : start + length])
        headers = [(str(n), str(v)) for n, v in head["h"]]
        return _Entry(str(head["s"]), headers, float(head["t"]), int(head["a"]), raw[start + length :])
    except (ValueError, KeyError, TypeError, struct.error):
        return None


# -- HTTP caching rules --------------------------------------------------------------------------------------------


def _directives(values: list[str]) -> dict[str, str]:
    """Cache-Control directives (lower-case names; value "" when none; quotes removed)."""
    found: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, _eq, arg = part.strip().partition("=")
            name = name.strip().lower()
            if name:
                found.setdefault(name, arg.strip().strip('"'))
    return found


def _seconds(value: str) -> int | None:
    return int(value) if value.isdigit() else None


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_tz(value)
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    return float(calendar.timegm(parsed[:9]) - (parsed[9] or 0))


def freshness(headers: list[tuple[str, str]], cap: int, now: float) -> tuple[int, int] | None:
    """(seconds to keep the answer, its age when received) within ``cap``; None when it must not be stored.

    s-maxage (this is a shared cache) wins over max-age, which wins over Expires; an answer that says nothing
    is kept for ``cap`` (the policy's TTL is the operator's heuristic). An unreadable Expires means expired.
    """
    cache_control: list[str] = []
    expires: str | None = None
    date: str | None = None
    age_text: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == "cache-control":
            cache_control.append(value)
        elif lower == "expires":
            expires = value
        elif lower == "date":
            date = value
        elif lower == "age":
            age_text = value.strip()
    cc = _directives(cache_control)
    if "no-store" in cc or "private" in cc or "no-cache" in cc:
        return None
    age = _seconds(age_text) if age_text else 0
    age = age or 0
    lifetime: int | None = None
    if "s-maxage" in cc:
        lifetime = _seconds(cc["s-maxage"])
        if lifetime is None:
            return None
    elif "max-age" in cc:
        lifetime = _seconds(cc["max-age"])
        if lifetime is None:
            return None
    elif expires is not None:
        expires_at = _http_date(expires)
        if expires_at is None:
            return None
        base = _http_date(date) if date else None
        lifetime = int(expires_at - (base if base is not None else now))
    if lifetime is None:
        return cap, age
    remaining = min(lifetime - age, cap)
    if remaining <= 0:
        return None
    return remaining, age


def _client_directives(environ: dict[str, Any]) -> tuple[bool, bool]:
    """(skip the lookup, skip the store) from the client's Cache-Control and Pragma."""
    value = environ.get("HTTP_CACHE_CONTROL")
    pragma = environ.get("HTTP_PRAGMA")
    if not value and not pragma:
        return False, False
    cc = _directives([value]) if value else {}
    if "no-store" in cc:
        return True, True
    if "no-cache" in cc or cc.get("max-age") == "0" or (pragma and "no-cache" in pragma.lower()):
        return True, False
    return False, False


def not_modified(environ: dict[str, Any], status: str, headers: list[tuple[str, str]], stored_at: float) -> bool:
    """Whether the client's conditions say it holds this stored answer already (RFC 9110 §13.2.2, steps 3 and 4).

    Only a 2xx answer is validated (§13.2.1: a 404 or a redirect is sent in full whatever the conditions).
    If-None-Match decides alone when present (a list the gateway cannot read matches nothing); If-Modified-Since
    counts only as one valid date that is not in the future (RFC 9110 §13.1.3), compared with the stored
    Last-Modified, else its Date, else the time it was stored (RFC 9111 §4.3.2).
    """
    if status[:1] != "2":
        return False
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        wanted = if_none_match.strip()
        if wanted == "*":
            return True  # any current answer: this one
        stored = next((v for n, v in headers if n.lower() == "etag"), None)
        if stored is None:
            return False
        match = _ENTITY_TAG.fullmatch(stored.strip())
        if match is None:
            return False
        tags = _entity_tags(wanted)
        return tags is not None and match.group(1) in tags
    if_modified_since = environ.get("HTTP_IF_MODIFIED_SINCE")
    if if_modified_since is None or if_modified_since.count(",") > 1:  # more than one date
        return False
    since = _http_date(if_modified_since)
    if since is None or since > time.time():
        return False
    found = {n.lower(): v for n, v in headers if n.lower() in ("last-modified", "date")}
    modified = found.get("last-modified") or found.get("date")
    changed_at = _http_date(modified) if modified is not None else stored_at
    return changed_at is not None and changed_at <= since


def _entity_tags(value: str) -> set[str] | None:
    """The opaque tags (quotes included, W/ left out) of an If-None-Match list; None when it is not one."""
    tags: set[str] = set()
    position, end = 0, len(value)
    while position < end:
        match = _ENTITY_TAG.match(value, position)
        if match is None:
            if value[position:].strip(" \t,"):
                return None
            break  # empty list elements at the end
        tags.add(match.group(1))
        position = match.end()
    return tags


def _not_modified_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A stored answer's headers that its 304 carries (_NOT_MODIFIED_KEEPS; Last-Modified when there is no ETag)."""
    kept = [(n, v) for n, v in headers if n.lower() in _NOT_MODIFIED_KEEPS]
    if not any(n.lower() == "etag" for n, _v in kept):
        kept += [(n, v) for n, v in headers if n.lower() == "last-modified"]
    return kept


def _vary_names(headers: list[tuple[str, str]]) -> tuple[str, ...] | None:
    """The request headers an answer varies on (sorted, lower-case); None for ``Vary: *``."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "vary":
            for part in value.split(","):
                part = part.strip().lower()
                if part == "*":
                    return None
                if part:
                    names.add(part)
    return tuple(sorted(names))


def _environ_key(name: str) -> str:
    upper = name.upper().replace("-", "_")
    return upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper


# -- the step ------------------------------------------------------------------------------------------------------


class _Pending:
    """One cacheable request on its way: its keys, what to do with the answer, and whether it leads the fetch."""

    __slots__ = ("base", "head", "hit", "key", "leader", "lookup", "read", "store")

    def __init__(self, base: str, head: bool) -> None:
        self.base = base
        self.head = head
        self.hit = False
        self.key = base  # the key looked up (a variant key when the Vary names were known)
        self.leader = False  # this request fetches the key for the worker (and releases the others)
        self.lookup = True  # False: the client asked for a fresh answer, or Redis was unavailable
        self.store = True
        self.read: bytes | _Unread | None = _UNREAD  # the key's value, when the limits step read it


class _Unread:
    """No value read yet (a read value may be None: the key does not exist)."""


_UNREAD = _Unread()


class ResponseCache(Step):
    name = "response_cache"
    has_response = True
    reads_with_limits = True  # in cache_lookup, the lookup's GET rides on the limiter's write (chain.Step)

    def __init__(self, route: Route, policy: PolicySpec) -> None:
        config = policy.config
        self.ttl = int(config.get("ttl_seconds", 300))
        self.max_bytes = int(config.get("max_entry_bytes", 1_048_576))
        self.per_consumer = bool(config.get("per_consumer", False))
        self.phase = CACHE_LOOKUP if config.get("count_hits_toward_quota", True) else ACCESS
        self.order = 100  # last in its phase: in access, a hit ends the request, so every access check runs first
        self.vary = tuple(str(n).lower() for n in config.get("vary_headers", []))
        # How long a request waits for another's fetch of the same key before it asks the upstream itself.
        self.wait_seconds = min(max(1.0, float(route.spec.total_timeout)), MAX_WAIT_SECONDS)
        generation = hashlib.blake2b(repr(route.spec).encode(), digest_size=8).hexdigest()
        self.prefix = f"{redis_client.tenant_tag('rc', route.tenant_id)}:{route.api_id}:{generation}:"
        self.tenant_id = route.tenant_id
        # Response headers the gateway adds per request (again on each hit): never stored. Response header
        # transforms run after the store (phase response_transforms), on hits as on misses; CORS headers are added
        # before it (phase pre_auth) and replaced by the cors step on each hit, so they are not stored either.
        self.dropped = _NOT_STORED | {name.lower() for name, _ in route.extra_headers}
        self.drop_cors = any(spec.policy_type == "cors" for spec in route.spec.policies)
        # What the route's request header transforms tell the upstream per caller (found on first use).
        self._transforms: _Transforms | None = None
        self.counted = metrics.cache_lookup_children(route.tenant_id, route.api_id)  # api_cache_lookups_total

    # -- keys --

    def _base_key(self, ex: Exchange) -> str:
        query = auth.upstream_query(ex.query, ex.credential, ex.route)
        environ = ex.environ
        # The host and scheme the upstream hears (X-Forwarded-Host/-Proto: the client's Host, or a trusted proxy's
        # headers, as gateway.pipeline sends them): upstreams build links and redirects from them.
        trusted = ex.gateway.trusted
        if trusted and client_address.is_trusted(environ.get("REMOTE_ADDR", ""), trusted):
            forwarded = f"{environ.get('HTTP_X_FORWARDED_HOST', '')}\0{environ.get('HTTP_X_FORWARDED_PROTO', '')}"
        else:
            forwarded = "\0"
        parts = ["GET", ex.path, query, environ.get("HTTP_HOST", ""), forwarded, environ.get("wsgi.url_scheme", "")]
        if self._transforms is None or self._transforms[0] or self._transforms[1] or self._transforms[2]:
            parts += self._transform_parts(ex)
        for name in self.vary:
            parts.append(f"{name}={environ.get(_environ_key(name), '')}")
        if self.per_consumer:
            parts.append("consumer=" + (ex.record.consumer_id if ex.record else ""))
        digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        return self.prefix + digest

    def _transform_parts(self, ex: Exchange) -> list[str]:
        """What the route's request header transforms tell the upstream beyond the consumer (X-Consumer-ID, and
        per_consumer, cover that): the caller's plan when plans' transforms apply (a plan may decide the answer),
        and the values made from the token's claims (``{jwt.role}``, ``{jwt.scope}``: so may they)."""
        found = self._transforms
        if found is None:
            found = self._transforms = _claim_templates(ex.route.chain.by_phase.get(REQUEST_TRANSFORMS, ()))
        by_plan, own, plans = found
        parts = ["plan=" + ex.plan_id] if by_plan else []
        templates = own + plans.get(ex.plan_id, []) if plans else own
        for name, template in templates:
            parts.append(f"{name}={header_transforms.render(template, ex) or ''}")
        return parts

    def _request_value(self, ex: Exchange, name: str) -> str | None:
        """A request header's value as a variant key uses it (the gateway's own values for the headers it sets)."""
        if name == "x-consumer-id":
            return ex.record.consumer_id if ex.record else ""
        if name == "x-tenant-id":
            return self.tenant_id
        value = ex.environ.get(_environ_key(name))
        return None if value is None else str(value)

    def _variant_key(self, ex: Exchange, base: str, names: tuple[str, ...]) -> str:
        parts = [base]
        for name in names:
            value = self._request_value(ex, name)
            parts.append(f"{name}\0{'' if value is None else value}\0{int(value is None)}")
        return (
            base
            + ":"
            + hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        )

    # -- request: the lookup --

    def _begin(self, ex: Exchange) -> _Pending | None:
        """The request's lookup and store plan (kept in ``ex.state``), or None when it is not cacheable at all."""
        method = ex.method
        if (method != "GET" and method != "HEAD") or ex.upgrade:
            return None
        environ = ex.environ
        if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
            return None  # a GET with a body: the key could not tell two of them apart
        skip_lookup, skip_store = _client_directives(environ)
        head = method == "HEAD"
        pending = _Pending(self._base_key(ex), head)
        pending.store = not skip_store and not head  # a HEAD's answer has no body to keep
        if ex.state is None:
            ex.state = {}
        ex.state[self.name] = pending
        if get_redis() is None or time.monotonic() < _health.down_until:
            pending.lookup = pending.store = False
        elif skip_lookup:
            pending.lookup = False
        return pending

    def limits_read(self, ex: Exchange) -> str | None:
        """The key to read with the limiter's call: the variant key when this worker knows the answers' Vary names."""
        pending = self._begin(ex)
        if pending is None or not pending.lookup:
            return None
        names = _vary_memo.get(pending.base)
        if names:
            pending.key = self._variant_key(ex, pending.base, names)
        return pending.key

    def limits_reply(self, ex: Exchange, reply: bytes | None) -> Result | None:
        """A stored answer ends the request here (one round trip for the limits and the hit); a miss, or a marker
        naming the Vary headers, goes on to request() with the value already read."""
        pending: _Pending = ex.state[self.name]  # type: ignore[index]  # set by limits_read
        found = _decode(reply or b"")
        if isinstance(found, _Entry):
            pending.hit = True
            return self._hit(ex, found, head=pending.head)
        pending.read = reply
        return None

    def request(self, ex: Exchange) -> Result | None:
        pending: _Pending | None = ex.state.get(self.name) if ex.state else None
        if pending is None:  # not begun by limits_read (a step of access, or a route without limits)
            pending = self._begin(ex)
            if pending is None:
                return None
        if not pending.lookup:
            return None
        client = get_redis()
        if client is None:
            pending.lookup = pending.store = False
            return None
        try:
            entry = self._read(client, ex, pending)
            if entry is None and not pending.head:
                self._lead_or_wait(pending)
                if not pending.leader:
                    entry = self._read(client, ex, pending)  # the fetch this request waited for stored it
        except _REDIS_FAILURES as exc:
            self._redis_failed(exc)
            pending.lookup = pending.store = False
            return None
        if entry is None:
            return None
        pending.hit = True
        return self._hit(ex, entry, head=pending.head)

    def _read(self, client: Any, ex: Exchange, pending: _Pending) -> _Entry | None:
        base = pending.base
        read, pending.read = pending.read, _UNREAD  # the limits step's read counts once (a second _read asks again)
        if read is not _UNREAD:
            found = _decode(cast("bytes | None", read) or b"")  # pending.key's value
            if pending.key != base or not isinstance(found, tuple):
                return found if isinstance(found, _Entry) else None
        else:
            names = _vary_memo.get(base)
            if names:
                pending.key = self._variant_key(ex, base, names)
                found = _decode(_get(client, pending.key) or b"")
                return found if isinstance(found, _Entry) else None
            pending.key = base
            found = _decode(_get(client, base) or b"")
        if isinstance(found, tuple):  # a marker: the answers of this key vary on these request headers
            if not found:
                return None
            _remember(base, found)
            pending.key = self._variant_key(ex, base, found)
            found = _decode(_get(client, pending.key) or b"")
        return found if isinstance(found, _Entry) else None

    def _lead_or_wait(self, pending: _Pending) -> None:
        key = pending.key
        now = time.monotonic()
        with _inflight_lock:
            current = _inflight.get(key)
            if current is None or now - current[1] > self.wait_seconds + 5:  # none, or a leader that never finished
                _inflight[key] = (threading.Event(), now)
                pending.leader = True
                return
        current[0].wait(self.wait_seconds)

    def _hit(self, ex: Exchange, entry: _Entry, *, head: bool) -> Result:
        """The stored answer with this request's own headers, or its 304 when the client's conditions say it holds
        the answer already. Both ways here (request() and limits_reply()) end in this one method."""
        done = ex.done
        environ = ex.environ
        status, body = entry.status, entry.body
        if ("HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MODIFIED_SINCE" in environ) and not_modified(
            environ, status, entry.headers, entry.stored_at
        ):
            status, body = NOT_MODIFIED, b""
            headers = _not_modified_headers(entry.headers)
        else:
            headers = list(entry.headers)
        limit_headers = ex.state.get("limit_headers") if ex.state else None
        if limit_headers:
            headers += limit_headers
        headers += ex.route.extra_headers
        age = entry.age + max(0, int(time.time() - entry.stored_at))
        if status[:3] not in ("204", "304"):
            headers.append(("Content-Length", str(len(body))))
        headers += [("Age", str(age)), ("X-Cache", "HIT"), ("X-Request-ID", ex.request_id)]
        done.status = int(status[:3])
        done.bytes_out = 0 if head else len(body)
        done.upstream_s = None
        return Result(status, headers, [] if head or not body else [body])

    # -- response: the store --

    def response(self, ex: Exchange, result: Result) -> Result:
        pending: _Pending | None = ex.state.get(self.name) if ex.state else None
        if pending is None or pending.hit:
            self.counted["skip" if pending is None else "hit"].inc()
            return result
        from_upstream = ex.done.upstream_s is not None
        outcome = "MISS" if pending.lookup else "BYPASS"
        self.counted["miss" if pending.lookup else "bypass"].inc()
        ttl_age = None
        if pending.store and from_upstream:
            ttl_age = self._storable(ex, result)
        body = result.body
        if isinstance(body, list):
            if ttl_age is not None:
                data = b"".join(body)
                if len(data) <= self.max_bytes:
                    self._store(ex, pending, result.status, result.headers, data, *ttl_age)
            self._release(pending)
        elif ttl_age is not None:
            # Stored (and released) at close(), with the headers as they are now: the response transforms after this
            # step apply to each hit again.
            result.body = _TeeBody(body, self, ex, pending, result.status, list(result.headers), ttl_age)
            # The others waiting for this key go on now: this body passes at its client's pace, and a client that
            # reads slowly must not hold every other request for the URL (they fetch it themselves meanwhile).
            self._release(pending)
        else:
            self._release(pending)
        result.headers.append(("X-Cache", outcome))
        return result

    def _storable(self, ex: Exchange, result: Result) -> tuple[int, int] | None:
        if result.status_code not in CACHEABLE_STATUSES:
            return None
        headers = result.headers
        names = _vary_names(headers)
        if names is None:
            return None
        for name, value in headers:
            lower = name.lower()
            if lower == "set-cookie" or lower == "set-cookie2":
                return None
            if lower == "content-type" and value.lower().startswith("text/event-stream"):
                return None  # a stream of events has no end to store
        if names:
            seen = {name.lower(): value for name, value in ex.upstream_headers.items()}
            for name in names:
                if name in _PER_REQUEST:
                    return None
                # The variant key uses what the client sent (or the gateway's own value): it must be what the
                # upstream saw, else a header transform decided the answer and the key would not show it.
                if self._request_value(ex, name) != seen.get(name):
                    return None
        fresh = freshness(headers, self.ttl, time.time())
        if fresh is None:
            return None
        if any(name.lower() in _CREDENTIALS for name in ex.upstream_headers):
            cc = _directives([v for n, v in headers if n.lower() == "cache-control"])
            if not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
                return None
        return fresh

    def _store(
        self,
        ex: Exchange,
        pending: _Pending,
        status: str,
        result_headers: list[tuple[str, str]],
        data: bytes,
        ttl: int,
        age: int,
    ) -> None:
        limit_names = {n.lower() for n, _ in (ex.state.get("limit_headers") or [])} if ex.state else set()
        dropped = self.dropped
        headers = []
        for name, value in result_headers:
            lower = name.lower()
            if lower in dropped or lower in limit_names or (self.drop_cors and lower.startswith("access-control-")):
                continue
            headers.append((name, value))
        names = _vary_names(result_headers) or ()
        entry = encode_entry(status, headers, time.time(), age, data)
        client = get_redis()
        if client is None:
            return
        try:
            if names:
                key = self._variant_key(ex, pending.base, names)
                pipe = client.pipeline(transaction=False)
                pipe.set(pending.base, _encode_marker(names), ex=self.ttl)
                pipe.set(key, entry, ex=ttl)
                pipe.execute()
                _remember(pending.base, names)
            else:
                client.set(pending.base, entry, ex=ttl)
                _vary_memo.pop(pending.base, None)
        except _REDIS_FAILURES as exc:
            self._redis_failed(exc)

    def _release(self, pending: _Pending) -> None:
        if not pending.leader:
            return
        pending.leader = False
        with _inflight_lock:
            current = _inflight.pop(pending.key, None)
        if current is not None:
            current[0].set()

    @staticmethod
    def _redis_failed(exc: Exception) -> None:
        _health.down_until = time.monotonic() + BACKOFF_SECONDS
        logger.warning("response cache unavailable (%s); serving from the upstream", type(exc).__name__)


def _get(client: Any, key: str) -> bytes | None:
    """One GET on the limiter's own idle connections (gateway.ratelimit.call: no pool checkout poll)."""
    return cast("bytes | None", ratelimit.call(client, key, ("GET", key)))


# (plans' request transforms apply, the API's own {jwt.<claim>} values, each plan's {jwt.<claim>} values)
_Transforms = tuple[bool, list[tuple[str, Any]], dict[str, list[tuple[str, Any]]]]


def _claim_templates(steps: tuple[Step, ...]) -> _Transforms:
    """From a route's request transform steps: whether plans' transforms apply, and the values made from a token's
    claims (the API's own, and per plan)."""

    def of(ops_list: Any) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        for ops in ops_list:
            for name, value in ops.set:
                if isinstance(value, header_transforms.Template) and value.check:
                    found.append((name, value))
            for name, _lower, value in ops.add:
                if isinstance(value, header_transforms.Template) and value.check:
                    found.append((name, value))
        return found

    by_plan = False
    own: list[tuple[str, Any]] = []
    plans: dict[str, list[tuple[str, Any]]] = {}
    for step in steps:
        step_plans = getattr(step, "by_plan", None) or {}
        if step_plans:
            by_plan = True
        for plan_id, ops_list in step_plans.items():
            templates = of(ops_list)
            if templates:
                plans.setdefault(plan_id, []).extend(templates)
        own.extend(of(getattr(step, "own", ())))
    return by_plan, own, plans


def _remember(base: str, names: tuple[str, ...]) -> None:
    if len(_vary_memo) >= MEMO_SIZE:
        _vary_memo.clear()
    _vary_memo[base] = names


class _TeeBody:
    """A streamed upstream body passed to the client and kept (up to the size cap) to be stored when complete."""

    def __init__(
        self,
        inner: Any,
        step: ResponseCache,
        ex: Exchange,
        pending: _Pending,
        status: str,
        headers: list[tuple[str, str]],
        ttl_age: tuple[int, int],
    ) -> None:
        self.inner = inner
        self.step = step
        self.ex = ex
        self.pending = pending
        self.status = status
        self.headers = headers
        self.ttl_age = ttl_age
        self.kept: list[bytes] | None = []
        self.size = 0
        self.complete = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            if self.kept is not None:
                self.size += len(chunk)
                if self.size > self.step.max_bytes or not _buffered.take(len(chunk)):
                    self._give_up()
                else:
                    self.kept.append(chunk)
            yield chunk
        self.complete = True

    def _give_up(self) -> None:
        """Nothing will be stored: the memory goes back and the waiting requests may go on."""
        if self.kept is not None:
            _buffered.give(sum(len(c) for c in self.kept))
            self.kept = None
        self.step._release(self.pending)

    def close(self) -> None:
        try:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()
        finally:
            if self.complete and self.kept is not None:
                self.step._store(self.ex, self.pending, self.status, self.headers, b"".join(self.kept), *self.ttl_age)
            self._give_up()
