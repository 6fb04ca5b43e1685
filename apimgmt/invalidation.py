"""How a committed change reaches every gateway worker: the contract between control plane and gateways.

Two channels, both in Redis, both written only after the transaction commits:

- **Route-level changes** (an API, policy, plan or tenant) ``INCR route_cache:version``. Each worker polls the
  counter every ``GATEWAY_CONFIG_POLL_SECONDS`` and rebuilds its route table when it moves. Key caches stay warm.
- **Key-level changes** (a key revoked, rotated or edited; a consumer blocked, unblocked or deleted; a
  subscription granted, approved, rejected or cancelled) name the affected key hashes on the stream
  ``route_cache:evictions`` (field ``keys``: comma-separated SHA-256 hex hashes; an entry with a field ``all``
  drops every cached key, for operators after a change made by SQL). Each worker reads the stream
  from where it last stopped at the same poll and drops exactly those entries from its key cache; nothing else
  is reloaded or cooled. The Redis-level key cache ``cache:api:key:<hash>`` is overwritten with a short-lived
  tombstone at the same moment, so a lookup that read the database before the commit cannot put the old state
  back (the gateway writes that cache with SET NX).

Guarantee: a committed change is enforced by every worker within one poll interval plus one lookup (about
0.3 s) while Redis answers. A worker that could not read the stream catches up from its last position when
Redis answers again; if the entries it missed were trimmed (``EVICTIONS_MAXLEN``), or Redis lost its data
(the version counter went back or the stream vanished), it drops every cached key once. If the control plane
cannot reach Redis when it commits, the change is logged as not propagated and takes effect when the cached
entries expire (``GATEWAY_AUTH_CACHE_SECONDS``, 30 s by default). apimgmt never imports the gateway.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis
from django.db import transaction

from apimgmt.redis_client import get_redis

CONFIG_VERSION_KEY = "route_cache:version"
EVICTIONS_STREAM = "route_cache:evictions"
# About this many eviction messages are kept; a worker further behind than that drops all its cached keys.
EVICTIONS_MAXLEN = 10_000
# Key hashes per stream entry (64 hex characters each).
HASHES_PER_MESSAGE = 200
# How long the Redis-level key cache refuses to be refilled after an eviction (see the module docstring).
TOMBSTONE_SECONDS = 10
TOMBSTONE = "evicted"
# The cursor of a reader that has seen nothing yet.
START = "0-0"

logger = logging.getLogger(__name__)


def key_cache_name(key_hash: str) -> str:
    """The Redis-level cache entry of one key (no version in the name: keys are evicted one by one)."""
    return f"cache:api:key:{key_hash}"


# Without Redis (development on one process) the version and the evictions live here.
_local_version = 0
_local_evictions: deque[tuple[int, list[str]]] = deque(maxlen=EVICTIONS_MAXLEN)
_local_lock = threading.Lock()


# -- route-level changes ----------------------------------------------------------------------------------------


def bump_config_version() -> int:
    """Increment the configuration version now and return it (-1 if Redis could not be reached)."""
    global _local_version
    client = get_redis()
    if client is None:
        with _local_lock:
            _local_version += 1
            return _local_version
    try:
        return int(client.incr(CONFIG_VERSION_KEY))
    except redis.RedisError:
        # The change is committed; gateways pick it up at their periodic safety reload. Say so loudly.
        logger.error(
            "could not bump %s in Redis; gateways see the change at their next safety reload", CONFIG_VERSION_KEY
        )
        return -1


def read_config_version() -> int:
    client = get_redis()
    if client is None:
        return _local_version
    value = client.get(CONFIG_VERSION_KEY)
    return int(value) if value is not None else 0


@dataclass
class _Notifications:
    config: bool = False
    key_hashes: set[str] = field(default_factory=set)


# Set inside ``coalesced_notifications``: what its changes will tell the gateways at the end.
_pending: ContextVar[_Notifications | None] = ContextVar("pending_notifications", default=None)


@contextmanager
def coalesced_notifications() -> Iterator[None]:
    """Inside a transaction: the changes made in the block tell the gateways once, after the commit (one version
    bump, one set of evictions) rather than once per change. For bulk changes such as ``config apply``."""
    notifications = _Notifications()
    token = _pending.set(notifications)
    try:
        yield
    finally:
        _pending.reset(token)
    if notifications.config:
        transaction.on_commit(bump_config_version)
    if notifications.key_hashes:
        hashes = sorted(notifications.key_hashes)
        transaction.on_commit(lambda: publish_evictions(hashes))


def config_changed() -> None:
    """A route-level change: bump the version once the current transaction commits (immediately outside one)."""
    pending = _pending.get()
    if pending is not None:
        pending.config = True
        return
    transaction.on_commit(bump_config_version)


# -- key-level changes ------------------------------------------------------------------------------------------


def publish_evictions(key_hashes: Iterable[str]) -> bool:
    """Tell every worker to forget these keys now; False (and an error log) when Redis could not be told."""
    hashes = sorted(set(key_hashes))
    if not hashes:
        return True
    client = get_redis()
    if client is None:
        with _local_lock:
            start = _local_evictions[-1][0] + 1 if _local_evictions else 1
            for offset, i in enumerate(range(0, len(hashes), HASHES_PER_MESSAGE)):
                _local_evictions.append((start + offset, hashes[i : i + HASHES_PER_MESSAGE]))
        return True
    try:
        # One key per call: the tombstones lie in as many cluster slots as there are keys.
        for key_hash in hashes:
            client.set(key_cache_name(key_hash), TOMBSTONE, ex=TOMBSTONE_SECONDS)
        for i in range(0, len(hashes), HASHES_PER_MESSAGE):
            client.xadd(
                EVICTIONS_STREAM,
                {"keys": ",".join(hashes[i : i + HASHES_PER_MESSAGE])},
                maxlen=EVICTIONS_MAXLEN,
                approximate=True,
            )
    except redis.RedisError:
        logger.error(
            "could not publish %d key eviction(s) to Redis; gateways enforce the change when their cached "
            "entries expire (GATEWAY_AUTH_CACHE_SECONDS)",
            len(hashes),
        )
        return False
    return True


def keys_changed(key_hashes: Iterable[str]) -> None:
    """Keys whose state changed: evict them on every worker once the current transaction commits."""
    hashes = list(key_hashes)
    pending = _pending.get()
    if pending is not None:
        pending.key_hashes.update(hashes)
        return
    transaction.on_commit(lambda: publish_evictions(hashes))


def identity_cache_hash(issuer_id: str, external_id: str) -> str:
    """The name a JWT identity (issuer, consumer claim value) has in the gateways' caches, in the same space as key
    hashes: an identity is evicted on the same stream, the same way, as a key."""
    return hashlib.sha256(f"jwt-identity\x00{issuer_id}\x00{external_id}".encode()).hexdigest()


def identities_changed(identities: Iterable[tuple[str, str]]) -> None:
    """JWT identities (issuer id, external id) whose consumer or state changed: evict them after the commit."""
    keys_changed(identity_cache_hash(issuer_id, external_id) for issuer_id, external_id in identities)


def consumer_changed(consumer_id: str) -> None:
    """A consumer's status, IP lists or subscriptions changed: evict each of its keys and JWT identities (read now,
    inside the transaction, so a consumer deleted by it still has them named)."""
    from apimgmt.models import ApiKey, ConsumerIdentity

    keys_changed(ApiKey.objects.filter(consumer_id=consumer_id).values_list("key_hash", flat=True))
    identities = ConsumerIdentity.objects.filter(consumer_id=consumer_id).values_list("issuer_id", "external_id")
    if identities:
        identities_changed(identities)


# -- the gateway's side -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evictions:
    """What a worker read from the stream: where to read next, the hashes to drop, and whether it missed any."""

    cursor: str
    key_hashes: list[str]
    complete: bool  # False: messages were lost; drop every cached key
    more: bool = False  # the read stopped at ``count`` messages: read again


def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _sep, seq = text.partition("-")
    return int(ms), int(seq or 0)


def eviction_cursor() -> str:
    """Where a new reader starts: the stream's last entry (a new worker's caches are empty anyway)."""
    client = get_redis()
    if client is None:
        with _local_lock:
            return str(_local_evictions[-1][0]) if _local_evictions else START
    last = client.xrevrange(EVICTIONS_STREAM, count=1)
    if not last:
        return START
    entry_id = last[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def read_evictions(cursor: str, count: int = 1000) -> Evictions:
    """The evictions after ``cursor`` (up to ``count`` messages). Raises redis.RedisError when Redis is down."""
    client = get_redis()
    if client is None:
        with _local_lock:
            seen = int(cursor.partition("-")[0])
            fresh = [(n, hashes) for n, hashes in _local_evictions if n > seen][:count]
            oldest = _local_evictions[0][0] if _local_evictions else 0
        complete = not fresh or seen == 0 or oldest <= seen + 1
        return Evictions(
            cursor=str(fresh[-1][0]) if fresh else cursor,
            key_hashes=[h for _n, hashes in fresh for h in hashes],
            complete=complete,
            more=len(fresh) == count,
        )
    # One key, so one slot: the oldest entry tells whether anything after the cursor was trimmed away.
    pipe = client.pipeline(transaction=False)
    pipe.xrange(EVICTIONS_STREAM, count=1)
    pipe.xread({EVICTIONS_STREAM: cursor}, count=count)
    oldest, fresh = pipe.execute()
    complete = True
    if cursor != START:
        if not oldest:
            # The stream is gone (Redis lost its data, or a new server): whatever was on it is lost too.
            return Evictions(cursor=START, key_hashes=[], complete=False)
        # Redis trims whole blocks of old entries but never below EVICTIONS_MAXLEN: the cursor's own entry is
        # gone only when that many newer ones came after it.
        complete = _id(oldest[0][0]) <= _id(cursor)
    hashes: list[str] = []
    entries = fresh[0][1] if fresh else []
    for entry_id, fields in entries:
        if b"all" in fields or "all" in fields:  # an operator's "drop every cached key" (docs/operations.md)
            complete = False
        value = fields.get(b"keys") or fields.get("keys") or b""
        hashes.extend(h for h in (value.decode() if isinstance(value, bytes) else value).split(",") if h)
        cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Evictions(cursor=cursor, key_hashes=hashes, complete=complete, more=len(entries) == count)
