"""Rate limits and quotas: every window of every applicable policy checked and counted in one Lua call."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.conf import settings

from apimgmt import limits, redis_client
from apimgmt.selectors import KeyRecord, PolicySpec
from gateway import metrics
from gateway.routing import Route

logger = logging.getLogger(__name__)

_pack_command: Callable[..., bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is in requirements.txt; redis-py's packer still works
    _pack_command = None
_HIREDIS_PARSER: Any = None  # redis-py's hiredis parser class, when this redis-py has the layout _read_replies knows
NOT_ENOUGH_DATA: Any = object()
try:
    from redis._parsers import hiredis as _hiredis_parsers

    _HIREDIS_PARSER, NOT_ENOUGH_DATA = _hiredis_parsers._HiredisParser, _hiredis_parsers.NOT_ENOUGH_DATA
except (ImportError, AttributeError):  # pragma: no cover - another layout: replies go through read_response()
    pass
# Bytes asked of the socket per read while replies are incomplete (a reply is usually a few hundred bytes).
READ_SIZE = 65536
# Connections whose replies _read_replies may read itself (standalone servers and cluster nodes).
_PLAIN_CONNECTIONS = (
    redis.connection.Connection,
    redis.connection.SSLConnection,
    redis.connection.UnixDomainSocketConnection,
)

SCRIPT = (Path(__file__).with_name("ratelimit.lua")).read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

GCRA, CALENDAR = 1, 2
# After a Redis failure, skip Redis for this long: a stalled Redis must not cost every request a timeout.
STORE_BACKOFF_SECONDS = 0.5


@dataclass(frozen=True)
class Window:
    """One limit to check: a GCRA bucket (sliding) or a calendar-aligned counter (fixed, quota)."""

    policy: PolicySpec
    label: str  # second, minute, hour, day, month
    kind: int
    limit: int  # what RateLimit-Policy and X-RateLimit-Limit report (capacity for GCRA)
    period: float  # window length in seconds (RateLimit-Policy w=)
    interval_us: float  # GCRA emission interval
    end: float  # calendar window end (epoch seconds); 0 for GCRA
    key: str

    @property
    def shadow(self) -> bool:
        return self.policy.mode == "shadow"


@dataclass
class WindowResult:
    window: Window
    over: bool
    remaining: int
    reset: float  # seconds until the window resets (GCRA: until full), or until admission when over


@dataclass
class LimitDecision:
    """What the limiter decided: pass (with headers), 429 (naming the policy) or 503 (store down, closed)."""

    blocked: WindowResult | None = None
    unavailable: bool = False
    headers: list[tuple[str, str]] | None = None
    retry_after: int = 0


def windows_for(
    route: Route, record: KeyRecord, client_ip: str, plan_policies: list[PolicySpec], now: float
) -> list[Window]:
    """Every window of the API's policies and the subscription plan's, for this caller.

    The arithmetic, the scope and the keys come from apimgmt.limits (the portal reads the counters through the
    same functions); this only adds what the limiter needs to enforce them.
    """
    windows: list[Window] = []
    spec = route.spec
    for policy in (*route.policies, *plan_policies):
        scope = limits.counter_scope(
            policy.config,
            tenant_id=spec.tenant_id,
            api_id=spec.api_id,
            consumer_id=record.consumer_id,
            key_id=record.key_id,
            client_ip=client_ip,
        )
        for w in limits.counter_windows(
            tenant_id=spec.tenant_id,
            tz_name=spec.tenant_timezone,
            policy_id=policy.id,
            policy_name=policy.name,
            policy_type=policy.policy_type,
            config=policy.config,
            scope=scope,
            now=now,
        ):
            kind = GCRA if w.sliding else CALENDAR
            windows.append(Window(policy, w.label, kind, w.limit, w.period, w.interval_us, w.end, w.key))
    return windows


def script_args(windows: list[Window]) -> tuple[list[str], list[Any]]:
    keys = [w.key for w in windows]
    args: list[Any] = []
    for w in windows:
        if w.kind == GCRA:
            args += [GCRA, w.limit, repr(w.interval_us), repr(w.limit * w.interval_us), "1" if w.shadow else "0"]
        else:
            args += [CALENDAR, w.limit, int(w.end * 1000), 0, "1" if w.shadow else "0"]
    return keys, args


def parse_result(windows: list[Window], raw: list[int]) -> tuple[bool, list[WindowResult]]:
    results = [
        WindowResult(w, bool(raw[1 + 3 * i]), int(raw[2 + 3 * i]), int(raw[3 + 3 * i]) / 1000.0)
        for i, w in enumerate(windows)
    ]
    return bool(raw[0]), results


_SF_NAMES: dict[tuple[str, str], str] = {}


def _sf_name(policy: PolicySpec, label: str) -> str:
    """The policy's name as a structured-field string (quoted, only safe characters), cached."""
    cached = _SF_NAMES.get((policy.name, label))
    if cached is None:
        name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in policy.name)
        cached = f'"{name}.{label}"'
        if len(_SF_NAMES) < 10_000:
            _SF_NAMES[(policy.name, label)] = cached
    return cached


def rate_limit_headers(results: list[WindowResult]) -> list[tuple[str, str]]:
    """RateLimit-Policy / RateLimit (IETF httpapi draft) for every enforced window, X-RateLimit-* for the tightest."""
    enforced = [r for r in results if not r.window.shadow]
    if not enforced:
        return []
    tightest = min(enforced, key=lambda r: (r.remaining, -r.reset))
    policy = ", ".join(
        f"{_sf_name(r.window.policy, r.window.label)};q={r.window.limit};w={int(r.window.period)}" for r in enforced
    )
    current = ", ".join(
        f"{_sf_name(r.window.policy, r.window.label)};r={r.remaining};t={math.ceil(r.reset)}" for r in enforced
    )
    return [
        ("RateLimit-Policy", policy),
        ("RateLimit", current),
        ("X-RateLimit-Limit", str(tightest.window.limit)),
        ("X-RateLimit-Remaining", str(tightest.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(tightest.reset))),
    ]


def decide(route: Route, blocked: bool, results: list[WindowResult]) -> LimitDecision:
    """Turn the script's answer into a decision, reporting every over-limit window (shadow ones too)."""
    decision = LimitDecision(headers=rate_limit_headers(results))
    for r in results:
        if r.over:
            mode = "shadow" if r.window.shadow else "enforce"
            metrics.rate_limited_total.labels(route.api_id, r.window.policy.id, mode).inc()
            if r.window.shadow:
                logger.info(
                    "shadow policy would have blocked the request",
                    extra={"policy": r.window.policy.id, "window": r.window.label, "api": route.api_id},
                )
    if blocked:
        violated = [r for r in results if r.over and not r.window.shadow]
        decision.blocked = max(violated, key=lambda r: r.reset)
        decision.retry_after = max(1, math.ceil(decision.blocked.reset))
    return decision


class LocalLimiter:
    """Per-worker counters used when Redis is down and a policy says on_store_error=local.

    Local limits are per pod: each worker allows limit / GATEWAY["WORKERS"] (the number of worker processes
    gunicorn runs in this pod), so one pod admits at most the configured limit. Pods do not know of each other
    without Redis: N gateway replicas admit up to N times the limit until Redis is back (docs/operations.md).
    """

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, float] = {}

    def check(self, windows: list[Window], now: float) -> tuple[bool, list[WindowResult]]:
        workers = max(1, int(settings.GATEWAY["WORKERS"]))
        results: list[WindowResult] = []
        writes: list[tuple[str, float]] = []
        blocked = False
        with self.lock:
            if len(self.state) > self.MAX_KEYS:
                self.state.clear()
            for w in windows:
                limit = max(1, w.limit // workers)
                if w.kind == GCRA:
                    interval = w.interval_us / 1e6 * workers
                    tolerance = limit * interval
                    tat = max(self.state.get(w.key, 0.0), now)
                    new_tat = tat + interval
                    over = new_tat - now > tolerance
                    remaining = 0 if over else int((tolerance - (new_tat - now)) / interval)
                    reset = (new_tat - now - tolerance) if over else new_tat - now
                    if not over:
                        writes.append((w.key, new_tat))
                else:
                    count = self.state.get(w.key, 0.0)
                    over = count + 1 > limit
                    remaining = 0 if over else int(limit - count - 1)
                    reset = max(w.end - now, 0.001)
                    if not over or w.shadow:
                        writes.append((w.key, count + 1))
                blocked = blocked or (over and not w.shadow)
                results.append(WindowResult(w, over, remaining, reset))
            if not blocked:
                self.state.update(writes)
        return blocked, results


class StoreHealth:
    """Remembers a recent Redis failure so the next requests do not each wait for a timeout."""

    def __init__(self) -> None:
        self.down_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self) -> None:
        self.down_until = time.monotonic() + STORE_BACKOFF_SECONDS


def store_error_decision(route: Route, windows: list[Window], local: LocalLimiter, now: float) -> LimitDecision:
    """Redis is unavailable: each policy follows its on_store_error (open, closed, local); each decision is counted."""
    by_policy: dict[str, list[Window]] = {}
    for w in windows:
        by_policy.setdefault(w.policy.id, []).append(w)
    local_windows: list[Window] = []
    closed = False
    for policy_windows in by_policy.values():
        policy = policy_windows[0].policy
        action = policy.on_store_error
        metrics.ratelimit_store_errors_total.labels(action).inc()
        if action == "closed" and policy.mode != "shadow":
            closed = True
        elif action == "local":
            local_windows.extend(policy_windows)
    if closed:
        return LimitDecision(unavailable=True, retry_after=1)
    if not local_windows:
        return LimitDecision(headers=[])
    blocked, results = local.check(local_windows, now)
    return decide(route, blocked, results)


def send_check(client: redis.Redis, keys: list[str], args: list[Any], before: list[tuple[Any, ...]]) -> PendingCheck:
    """Write the limiter's EVALSHA, preceded by ``before`` (commands sharing the write: reads of keys in the same
    hash tag, such as a cached response's, so that they cost no round trip of their own), and return without
    waiting.

    The caller does work that does not depend on the answer, then calls result(): by then the reply has usually
    arrived (Redis answers in about 20 µs here), so the worker neither waits for it nor, under gevent, switches
    to the hub and back. Written on a pooled connection directly: a redis-py Pipeline object costs about 10 µs
    of CPU per request for the same bytes on the wire. Connection failures and timeouts raise redis.RedisError.
    """
    commands = [*before, ("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)]
    # On a cluster, straight to the master of the keys' slot (they share one hash tag: one slot).
    node = _node_for(client, keys[0]) if keys else client
    conn = _connections.get(client, node)
    try:
        conn.send_packed_command(_pack(conn, commands))
    except BaseException:
        conn.disconnect()
        _connections.put(conn, node)
        redis_client.topology_failed(client)
        raise
    return PendingCheck(client, conn, keys, args, len(commands), node)


class PendingCheck:
    """A limiter call whose replies are still to be read; exactly one of result() or abandon() must follow."""

    def __init__(
        self, client: redis.Redis, conn: Any, keys: list[str], args: list[Any], replies: int, node: Any = None
    ) -> None:
        self.client = client
        self.conn = conn
        self.keys = keys
        self.args = args
        self.replies = replies
        self.node = client if node is None else node

    def result(self) -> tuple[Any, list[Any]]:
        """The script's reply and the replies of the commands sent before it (a redis.ResponseError for an error
        reply: a command about a key in another slot answers MOVED, and its caller asks again on its own).

        A script missing from Redis (NOSCRIPT, e.g. after a restart) costs one more round trip, with EVAL. On a
        cluster, a slot that moved (MOVED/ASK: a reshard or a promoted replica) costs one call through the cluster
        client, which follows the redirection; the refused call did not run, so the count stays exact.
        """
        conn = self.conn
        try:
            replies = _read_replies(conn, self.replies)
        except BaseException:
            conn.disconnect()  # an unread reply would be taken as the answer to the next command
            redis_client.topology_failed(self.client)
            raise
        finally:
            _connections.put(conn, self.node)
        raw = replies[-1]
        if isinstance(raw, (redis.exceptions.AskError, redis.exceptions.TryAgainError)):  # MOVED is an AskError
            # The slot is moving (a reshard) or moved (a failover): the cluster client follows MOVED and ASK and
            # waits out TRYAGAIN (keys of one call caught half-migrated). Only a RedisCluster answers these.
            redis_client.topology_failed(self.client)
            try:
                raw = self.client.evalsha(SCRIPT_SHA, len(self.keys), *self.keys, *self.args)
            except redis.exceptions.NoScriptError:
                raw = self.client.eval(SCRIPT, len(self.keys), *self.keys, *self.args)
        elif isinstance(raw, redis.exceptions.NoScriptError):
            raw = self.client.eval(SCRIPT, len(self.keys), *self.keys, *self.args)
        elif isinstance(raw, redis.ResponseError):
            if isinstance(raw, redis.exceptions.ClusterDownError):
                redis_client.topology_failed(self.client)
            raise raw
        return raw, replies[:-1]

    def abandon(self) -> None:
        """Drop the call unread (the request failed in between): the connection cannot be reused."""
        self.conn.disconnect()
        _connections.put(self.conn, self.node)


class _Connections:
    """The limiter's own idle connections (made by the client's pool, with its timeouts).

    redis-py's pool checkout polls every connection for unexpected data before handing it out: under gevent that
    is a poll() plus a Timeout object per request (about 20 µs). The limiter never leaves a reply unread (any
    error disconnects), so its connections need no such check. Bounded per node (a cluster has one per master),
    fork-aware, and rebuilt when the process switches to another client (tests point REDIS_URL elsewhere).
    """

    MAX_IDLE = 64

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[int, list[Any]] = {}  # by id() of the node's client
        self.nodes: dict[int, Any] = {}  # keeps each node's client alive while its id() is a key
        self.client: redis.Redis | None = None
        self.pid = 0

    def get(self, client: redis.Redis, node: Any) -> Any:
        if client is not self.client or self.pid != os.getpid():
            with self.lock:
                stale, self.idle, self.nodes = self.idle, {}, {}
                self.client, self.pid = client, os.getpid()
            for conns in stale.values():
                for conn in conns:
                    conn.disconnect()
        with self.lock:
            idle = self.idle.get(id(node))
            conn = idle.pop() if idle else None
        if conn is None:
            conn = node.connection_pool.make_connection()
        if conn._sock is None:
            # Connect through the connection's own connect(): a Sentinel-managed connection asks the sentinels
            # for the master there (send_packed_command's implicit connect would use its default address).
            try:
                conn.connect()
            except BaseException:
                self.put(conn, node)
                raise
        return conn

    def put(self, conn: Any, node: Any) -> None:
        with self.lock:
            if conn.pid == os.getpid():
                idle = self.idle.setdefault(id(node), [])
                self.nodes[id(node)] = node
                if len(idle) < self.MAX_IDLE:
                    idle.append(conn)
                    return
        conn.disconnect()


_connections = _Connections()


def _node_for(client: redis.Redis, key: str) -> Any:
    """The client to send a call about ``key`` to (a cluster's master of its slot); redis.RedisError when none."""
    try:
        return redis_client.node_for_key(client, key)
    except redis.RedisError:
        redis_client.topology_failed(client)
        raise
    except Exception as exc:  # the slot map has no master for this slot (mid-failover)
        redis_client.topology_failed(client)
        raise redis.ConnectionError(f"no Redis node for the slot of {key!r}: {exc}") from exc


def call(client: redis.Redis, key: str, command: tuple[Any, ...]) -> Any:
    """One command about ``key`` on the limiter's idle connections (no pool checkout poll, no Command object), sent
    to the master of the key's slot; an error reply (a slot that moved) is asked again through the client itself,
    which follows the redirection. Connection failures and timeouts raise redis.RedisError.
    """
    node = _node_for(client, key)
    conn = _connections.get(client, node)
    try:
        conn.send_packed_command(_pack(conn, [command]))
        (reply,) = _read_replies(conn, 1)
    except BaseException:
        conn.disconnect()  # an unread reply would be taken as the answer to the next command
        _connections.put(conn, node)
        redis_client.topology_failed(client)
        raise
    _connections.put(conn, node)  # an error reply too: the connection is still in step
    if isinstance(reply, redis.ResponseError):
        redis_client.topology_failed(client)
        return client.execute_command(*command)
    return reply


def _pack(conn: Any, commands: list[tuple[Any, ...]]) -> Any:
    if _pack_command is None:
        return conn.pack_commands(commands)
    # hiredis packs str/bytes/int/float arguments itself; redis-py's packer re-checks every argument first.
    return [b"".join([_pack_command(command) for command in commands])]


def _read_replies(conn: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``, an error reply as its redis.ResponseError (returned, not raised).

    Straight from the connection's hiredis reader and socket: redis-py's read_response() costs about 9 µs more
    per call in its checks and bookkeeping (measured here: 20 µs against 11 µs of CPU for a write and two replies).
    The socket keeps the connection's timeout; a timeout or a lost connection raises as redis-py would.
    """
    parser = conn._parser
    sock = conn._sock
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)
    if (
        type(conn) not in _PLAIN_CONNECTIONS  # a Sentinel-managed one reacts to READONLY in read_response()
        or _HIREDIS_PARSER is None
        or type(parser) is not _HIREDIS_PARSER
        or sock is None
        or (push_type is None and str(conn.protocol) == "3")  # an older hiredis cannot tell a push from a reply
    ):
        return [_read_reply(conn) for _ in range(count)]
    reader = parser._reader
    replies: list[Any] = []
    while len(replies) < count:
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError as exc:
                raise redis.TimeoutError("Timeout reading from Redis") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
            if not data:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(data)
            reply = reader.gets()
        if isinstance(reply, redis.ConnectionError):
            raise reply
        if push_type is not None and isinstance(reply, push_type):
            # RESP3: the server may push a message between replies (a client-tracking invalidation, a
            # maintenance notice). It is not the reply asked for: redis-py's handler takes it, as read_response does.
            parser.handle_push_response(reply)
            continue
        replies.append(reply)
    return replies


def _read_reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except redis.ResponseError as exc:  # an error reply: the connection is still in step
        return exc
