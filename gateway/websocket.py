"""WebSocket through the gateway: the handshake passes the whole pipeline, then frames are relayed both ways.

The handshake is an ordinary request until the upstream has accepted it: routing, key auth, limits (it counts as
one request), then this module's checks (a browser's origin against the API's cors policy, a valid handshake, the
key's connection cap) and the upstream's own handshake. Every refusal is an ordinary problem+json answer; only then
does the client get its 101.

After the 101 the connection belongs to this module: gunicorn's greenlet for the connection reads the client, a
second greenlet reads the upstream, and ``wsproto`` (sans-IO) parses every frame either side sends and writes
what the gateway frames itself, so messages can be counted and capped (see ``Session._pump`` for what is passed on
as it came). Fragmented messages are relayed piece by piece (never buffered whole), pings and pongs end to end, and
each side's close is forwarded to the other. One housekeeping greenlet per worker enforces the idle timeout (no
message either way for that long; pings and pongs do not count, see ``Session.last_activity``), renews the connection-cap leases, adds each connection's usage every second, closes the connections of keys the
control plane changed (revoked, consumer blocked, API retired or WebSocket turned off: 1008) and, when the worker
is told to stop, closes every connection with 1001.

The relay needs gunicorn's gevent worker (``gunicorn.socket`` in the environ, sockets patched by gevent);
elsewhere a handshake gets 501.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
import time
from typing import Any
from urllib.parse import unquote_plus

import gevent
import gevent.event
import gevent.lock
import redis
from gevent import monkey
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError, RemoteProtocolError

from apimgmt import invalidation, keys, redis_client
from apimgmt.redis_client import get_redis
from apimgmt.selectors import KeyRecord
from gateway import auth, http1, metrics
from gateway.pipeline import Finished, Gateway, Result
from gateway.policies import cors
from gateway.problems import problem
from gateway.proxy import UNREACHABLE
from gateway.routing import Route, Target
from gateway.wsgi import RELAY

logger = logging.getLogger(__name__)

# A Sec-WebSocket-Protocol entry "apikey.<key>" carries the key (browsers cannot set headers on a WebSocket).
PROTOCOL_KEY_PREFIX = "apikey."
# Offered beside it, the bare entry is what the gateway answers when the upstream chooses no subprotocol: browsers
# fail a handshake that offered protocols and got none back. It is the gateway's, never passed upstream.
PROTOCOL_MARKER = "apikey"
# The query parameter a handshake may carry the key in when the API names none of its own.
DEFAULT_KEY_PARAM = "apikey"
RECV_SIZE = 65536
# Handshake headers the gateway writes itself towards the upstream (wsproto makes its own key and version).
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "content-length",
        "content-type",
    }
)
# How long each side gets to answer a close before its socket is cut.
CLOSE_WAIT_SECONDS = 5.0
# The housekeeper's tick: idle timeouts fire at most this late.
TICK_SECONDS = 0.1
# Connection-cap leases: a worker that dies without releasing its leases frees them within LEASE_SECONDS.
LEASE_SECONDS = 30.0
RENEW_EVERY_SECONDS = 10.0
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

# Set by gateway.gunicorn_worker when the worker is told to stop (SIGTERM): every connection gets 1001.
_shutting_down = False


def _worker_alive() -> bool:
    """False once the gunicorn worker is on its way out (max_requests reached, or told to stop)."""
    worker = getattr(sys.modules.get("gateway.gunicorn_worker"), "running_worker", None)
    return worker is None or bool(worker.alive)


def begin_shutdown() -> None:
    """The worker is stopping: the housekeeper closes every connection with 1001 (safe in a signal handler)."""
    global _shutting_down
    _shutting_down = True


# -- the handshake, before any upgrade ---------------------------------------------------------------------------


def wants_upgrade(environ: dict[str, Any]) -> bool:
    """A GET asking to switch to WebSocket."""
    return environ.get("REQUEST_METHOD") == "GET" and environ.get("HTTP_UPGRADE", "").strip().lower() == "websocket"


def move_credentials(environ: dict[str, Any], route: Route, query: str) -> tuple[dict[str, Any], str]:
    """The environ and query with a key from a ``Sec-WebSocket-Protocol`` entry or the ``apikey`` query parameter
    moved into the API's key header, where auth reads it and from where it is never forwarded.

    A key already in the header stays: the moved one is joined to it, so two credentials are refused (401) as
    they are for any request. The query parameter is read here only when the API names no key parameter of its
    own (when it does, the pipeline reads and strips that one).
    """
    found: list[str] = []
    environ = dict(environ)
    offered = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")
    if offered:
        kept: list[str] = []
        for entry in offered.split(","):
            entry = entry.strip()
            if entry.startswith(PROTOCOL_KEY_PREFIX):
                found.append(entry[len(PROTOCOL_KEY_PREFIX) :])
            elif entry:
                kept.append(entry)
        if found:
            if kept:
                environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = ", ".join(kept)
            else:
                del environ["HTTP_SEC_WEBSOCKET_PROTOCOL"]
    if not route.spec.key_query_param and query and DEFAULT_KEY_PARAM in query:
        query, values = _take_query_param(query, DEFAULT_KEY_PARAM)
        found.extend(values)
    if found:
        existing = environ.get(route.key_header_environ)
        environ[route.key_header_environ] = ", ".join([existing, *found] if existing else found)
    return environ, query


def _take_query_param(query: str, name: str) -> tuple[str, list[str]]:
    """The query without ``name``'s pairs (split at "&" and ";", as auth reads keys) and their values."""
    kept: list[str] = []
    values: list[str] = []
    for pair in query.split("&"):
        parts = pair.split(";")
        left = []
        for part in parts:
            key, _sep, value = part.partition("=")
            if unquote_plus(key) == name:
                values.append(unquote_plus(value))
            else:
                left.append(part)
        if left:
            kept.append(";".join(left))
    return "&".join(kept), values


def relay_supported(environ: dict[str, Any]) -> bool:
    """Whether this server can hand the connection over: apimgmt.wsgi under gunicorn with gevent's sockets (not
    GatewayMiddleware, which could only answer a 101 with an empty body)."""
    return (
        bool(environ.get(RELAY)) and environ.get("gunicorn.socket") is not None and monkey.is_module_patched("socket")
    )


class Upgrade(Result):
    """An accepted handshake: GatewayApplication calls ``run`` instead of letting the server write a response."""

    def __init__(self, session: Session, response_bytes: bytes) -> None:
        super().__init__("101 Switching Protocols", [], [])
        self.session = session
        self.response_bytes = response_bytes

    def run(self, environ: dict[str, Any]) -> Any:
        """Send the 101 and relay frames until both sides are closed; then the server's "already handled" mark."""
        from gunicorn.workers.base_async import ALREADY_HANDLED

        self.session.run(environ["gunicorn.socket"], self.response_bytes)
        return ALREADY_HANDLED


def open_connection(
    gateway: Gateway,
    environ: dict[str, Any],
    route: Route,
    record: KeyRecord,
    credential: auth.Credential,
    done: Finished,
    headers: dict[str, str],
    path: str,
    query: str,
    limit_headers: list[tuple[str, str]],
    identity: tuple[str, str, float] | None = None,
) -> Result:
    """The handshake after auth and limits: the client's handshake checked, the cap, the upstream's handshake.

    ``identity`` is (issuer id, external id, token expiry) for a caller who presented a token (gateway.jwt_auth): the
    connection is then filed and re-checked under that identity, and closed when the token expires.
    """
    request_id = done.request_id
    if not relay_supported(environ):
        return gateway._error(
            done,
            problem(
                501,
                "websocket-unsupported",
                "Not implemented",
                "WebSocket needs the gateway's gunicorn worker (gateway.gunicorn_worker.GatewayWorker).",
                request_id,
            ),
            limit_headers,
        )
    refused = origin_refused(route, environ)
    if refused is not None:
        return gateway._error(done, problem(403, "origin-not-allowed", "Forbidden", refused, request_id), limit_headers)
    client = WSConnection(ConnectionType.SERVER)
    try:
        client.initiate_upgrade_connection(_handshake_headers(environ), environ.get("RAW_URI") or "/")
        offered = next((e for e in client.events() if isinstance(e, Request)), None)
        if offered is None:
            raise RemoteProtocolError("no upgrade request", event_hint=RejectConnection())
    except Exception as exc:  # wsproto's verdict, or h11's (inside it) on a header it will not write
        hint = getattr(exc, "event_hint", None)
        status = hint.status_code if isinstance(hint, RejectConnection) and hint.status_code == 426 else 400
        extra = [("Sec-WebSocket-Version", "13")] if status == 426 else []
        return gateway._error(
            done,
            problem(status, "bad-handshake", "Bad request", f"Not a valid WebSocket handshake: {exc}.", request_id),
            limit_headers + extra,
        )
    registry = registry_for(gateway)
    key_hash = invalidation.identity_cache_hash(identity[0], identity[1]) if identity else keys.hash_key(credential.key)
    cap = connection_cap(route, record)
    lease = registry.leases.acquire(route, record, cap)
    if lease is None:
        return gateway._error(
            done,
            problem(
                429,
                "websocket-connections",
                "Too many requests",
                f"This key already holds {cap} open WebSocket connection(s) to this API, the most it may; "
                "close one first.",
                request_id,
                extra={"max_connections": cap},
            ),
            limit_headers,
        )
    try:
        upstream_sock, upstream, accepted = _connect_upstream(gateway, route, headers, path, query, offered)
    except _HandshakeFailed as exc:
        registry.leases.release(lease)
        slug = "upstream-timeout" if exc.status == 504 else "upstream-unavailable"
        title = "Gateway timeout" if exc.status == 504 else "Bad gateway"
        return gateway._error(done, problem(exc.status, slug, title, exc.detail, request_id), limit_headers)
    extra = [*limit_headers, *route.extra_headers, ("X-Request-ID", request_id)]
    subprotocol = accepted.subprotocol
    if subprotocol is None and PROTOCOL_MARKER in offered.subprotocols:
        subprotocol = PROTOCOL_MARKER
    response = client.send(
        AcceptConnection(
            subprotocol=subprotocol,
            extra_headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in extra],
        )
    )
    done.status = 101
    gateway._finish(done)  # the handshake is the request: logged, counted and billed once, now
    session = Session(registry, route, record, key_hash, lease, client, upstream, upstream_sock, identity)
    return Upgrade(session, response)


def origin_refused(route: Route, environ: dict[str, Any]) -> str | None:
    """Why a browser's handshake is refused: its ``Origin`` is not one the API's cors policy allows (None: allowed,
    no cors policy, or no ``Origin``, which only browsers send).

    Browsers apply no CORS to WebSocket: a page of any site may open one and the browser sends the user's cookies
    with it. For ordinary requests a disallowed origin only gets no CORS headers (the browser then hides the answer);
    a handshake is refused outright, or any site's page could talk over the user's connection.
    """
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return None
    if not cors.origin_allowed(route, origin):
        return f"The origin {origin[:200]!r} may not open WebSocket connections to this API."
    return None


def connection_cap(route: Route, record: KeyRecord) -> int:
    """Open connections the key may hold to the API: its plan's own cap for the API when the plan sets one, else
    the API's."""
    spec = route.spec
    plan_id = record.subscriptions.get(route.api_id, "")
    if plan_id:
        return spec.websocket_plan_caps.get(plan_id, spec.websocket_max_connections)
    return spec.websocket_max_connections


def _handshake_headers(environ: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The client's handshake headers back from the environ gunicorn parsed (for wsproto to check)."""
    found: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            found.append((name[5:].replace("_", "-").lower().encode("latin-1"), str(value).encode("latin-1")))
    return found


class _HandshakeFailed(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _connect_upstream(
    gateway: Gateway, route: Route, headers: dict[str, str], path: str, query: str, offered: Request
) -> tuple[socket.socket, WSConnection, AcceptConnection]:
    """Connect to a vetted address of one of the API's targets and complete the upstream's handshake."""
    spec = route.spec
    breaker = gateway._breaker(route)
    allowed, _wait = breaker.allow()
    if not allowed:
        raise _HandshakeFailed(502, "The upstream is failing; connections are paused.")
    balancer = gateway._balancer(route)
    target = balancer.pick()
    deadline = time.monotonic() + spec.total_timeout
    try:
        sock = http1.connect_upstream(
            target.host, target.port, min(spec.connect_timeout, spec.total_timeout), socket_options=_NODELAY
        )
    except http1.ForbiddenPeer as exc:
        logger.warning("upstream %s resolves only to refused addresses (%s); not contacted", target.host, exc)
        balancer.failed(target)
        breaker.failure()
        raise _HandshakeFailed(502, UNREACHABLE) from exc
    except http1.ConnectFailed as exc:
        balancer.failed(target)
        breaker.failure()
        if exc.timed_out:
            raise _HandshakeFailed(504, "The upstream did not accept the connection in time.") from exc
        raise _HandshakeFailed(502, UNREACHABLE) from exc
    try:
        if target.scheme == "https":
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=target.host)
        upstream = WSConnection(ConnectionType.CLIENT)
        url = (target.prefix + path) or "/"
        if query:
            url += "?" + query
        forwarded = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in headers.items()
            if name.lower() not in _HANDSHAKE_HEADERS
        ]
        sock.sendall(
            upstream.send(
                Request(
                    host=_host_header(target),
                    target=url,
                    extra_headers=forwarded,
                    subprotocols=[p for p in offered.subprotocols if p != PROTOCOL_MARKER],
                )
            )
        )
        accepted = _read_handshake(sock, upstream, deadline, spec.read_timeout)
    except _HandshakeFailed:
        sock.close()
        breaker.failure()
        raise
    except (OSError, ProtocolError, ssl.SSLError) as exc:
        sock.close()
        breaker.failure()
        timed_out = isinstance(exc, TimeoutError) or time.monotonic() >= deadline
        if timed_out:
            raise _HandshakeFailed(504, "The upstream did not answer the WebSocket handshake in time.") from exc
        raise _HandshakeFailed(502, "The upstream closed the connection or sent an invalid handshake.") from exc
    breaker.success()
    sock.settimeout(None)
    return sock, upstream, accepted


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def _read_handshake(sock: socket.socket, upstream: WSConnection, deadline: float, read_timeout: float) -> Any:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(min(read_timeout, remaining))
        data = sock.recv(RECV_SIZE)
        upstream.receive_data(data or None)
        for event in upstream.events():
            if isinstance(event, AcceptConnection):
                return event
            if isinstance(event, RejectConnection):
                raise _HandshakeFailed(
                    502, f"The upstream refused the WebSocket upgrade (it answered {event.status_code})."
                )
            if isinstance(event, (RejectData, CloseConnection)):
                continue
        if not data:
            raise _HandshakeFailed(502, "The upstream closed the connection during the WebSocket handshake.")


# -- the connection cap -------------------------------------------------------------------------------------------

# One sorted set per (API, key) under the tenant's hash tag: members are leases, scores their expiry (Redis's clock).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


def lease_set_name(tenant_id: str, api_id: str, key_id: str) -> str:
    return f"{redis_client.tenant_tag('websocket', tenant_id)}:connections:{api_id}:{key_id}"


class Lease:
    __slots__ = ("id", "name")

    def __init__(self, name: str, lease_id: str) -> None:
        self.name = name
        self.id = lease_id


class Leases:
    """Open connections per (API, key) counted fleet-wide in Redis; expiring leases free a dead worker's share.

    When Redis cannot be reached the handshake is let through (the cap is a fairness control, not a security
    boundary) and nothing is counted for that connection.
    """

    def __init__(self) -> None:
        self.sequence = 0
        self.held: dict[str, set[str]] = {}  # set name -> lease ids of this worker
        self._scripts: tuple[Any, Any, Any] | None = None

    def _script(self, index: int) -> Any:
        client = get_redis()
        if client is None:
            return None
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, client.register_script(_ACQUIRE), client.register_script(_RENEW))
        return self._scripts[index]

    def acquire(self, route: Route, record: KeyRecord, cap: int) -> Lease | None:
        """A lease, or None when the key is at its cap (a lease that is not counted when Redis is away)."""
        self.sequence += 1
        lease = Lease(lease_set_name(route.tenant_id, route.api_id, record.key_id), f"{_worker_tag()}:{self.sequence}")
        try:
            script = self._script(1)
            if script is None:
                return lease
            if not script(keys=[lease.name], args=[lease.id, cap, int(LEASE_SECONDS * 1000)]):
                return None
        except redis.RedisError:
            logger.warning("WebSocket connection cap not checked: Redis unavailable")
            return lease
        self.held.setdefault(lease.name, set()).add(lease.id)
        return lease

    def release(self, lease: Lease) -> None:
        ids = self.held.get(lease.name)
        if ids is None or lease.id not in ids:
            return
        ids.discard(lease.id)
        if not ids:
            del self.held[lease.name]
        client = get_redis()
        if client is None:
            return
        try:
            client.zrem(lease.name, lease.id)
        except redis.RedisError:
            logger.warning("WebSocket lease not released (Redis unavailable); it expires in %d s", LEASE_SECONDS)

    def renew(self) -> None:
        try:
            script = self._script(2)
            if script is None:
                return
            for name, ids in list(self.held.items()):
                if ids:
                    script(keys=[name], args=[int(LEASE_SECONDS * 1000), *ids])
        except redis.RedisError:
            logger.warning("WebSocket leases not renewed (Redis unavailable)")


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- the worker's open connections -------------------------------------------------------------------------------


class Registry:
    """This worker's open connections and the greenlet that watches them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sessions: set[Session] = set()
        self.by_key: dict[str, set[Session]] = {}
        self.leases = Leases()
        self.recheck: set[str] = set()
        self.routes_changed = False
        self.wake = threading.Event()
        self.housekeeper: Any = None
        self.last_renewal = time.monotonic()
        self.last_counted = time.monotonic()
        gateway.routes.on_evict.append(self._keys_evicted)
        gateway.routes.on_keys_lost.append(self._all_keys_lost)
        gateway.routes.on_change.append(self._routes_changed)

    # Called by the config poller: note the work, let the housekeeper do it (the poller must not block).
    def _keys_evicted(self, key_hashes: list[str]) -> None:
        if self.by_key:
            self.recheck.update(h for h in key_hashes if h in self.by_key)
            self.wake.set()

    def _all_keys_lost(self) -> None:
        if self.by_key:
            self.recheck.update(self.by_key)
            self.wake.set()

    def _routes_changed(self) -> None:
        if self.sessions:
            self.routes_changed = True
            self.wake.set()

    def add(self, session: Session) -> None:
        self.sessions.add(session)
        self.by_key.setdefault(session.key_hash, set()).add(session)
        metrics.websocket_connections.labels(session.route.api_id).inc()
        if self.housekeeper is None or self.housekeeper.dead:
            self.housekeeper = gevent.spawn(self._keep)

    def remove(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        same_key = self.by_key.get(session.key_hash)
        if same_key is not None:
            same_key.discard(session)
            if not same_key:
                del self.by_key[session.key_hash]
        metrics.websocket_connections.labels(session.route.api_id).dec()
        self.leases.release(session.lease)

    def _keep(self) -> None:
        while self.sessions:
            self.wake.wait(TICK_SECONDS)
            self.wake.clear()
            try:
                self._tick()
            except Exception:
                logger.exception("WebSocket housekeeping failed")

    def _tick(self) -> None:
        now = time.monotonic()
        if _shutting_down or not _worker_alive():
            for session in list(self.sessions):
                if session.closing_since == 0.0:
                    session.close_soon(GOING_AWAY, "The gateway is restarting; reconnect.")
        routes = self.gateway.routes
        if routes.seen_version is not None and routes.seen_version != routes.version:
            routes.current()  # the poller saw a change; with no request arriving, nothing else would load it
        if self.routes_changed:
            self.routes_changed = False
            self._check_routes()
        if self.recheck:
            hashes, self.recheck = self.recheck, set()
            self._check_keys(hashes)
        wall = time.time()
        for session in list(self.sessions):
            expires_at = session.record.expires_at
            if session.closing_since:
                if now - session.closing_since > CLOSE_WAIT_SECONDS:
                    session.abort()
            elif expires_at is not None and expires_at <= wall:
                session.close_soon(POLICY_VIOLATION, "The key expired.")
            elif session.token_until is not None and session.token_until <= wall:
                session.close_soon(POLICY_VIOLATION, "The token expired.")
            elif now - session.last_activity > session.route.spec.websocket_idle_timeout:
                session.close_soon(
                    POLICY_VIOLATION,
                    f"Idle for more than {session.route.spec.websocket_idle_timeout:g} s.",
                )
        if now - self.last_counted >= 1.0:
            self.last_counted = now
            for session in self.sessions:
                session.count_messages()
                session.account()
        if now - self.last_renewal >= RENEW_EVERY_SECONDS:
            self.last_renewal = now
            self.leases.renew()

    def _current_routes(self) -> dict[str, Route]:
        table = self.gateway.routes.current()
        return {route.api_id: route for route in table.routes}

    def _check_routes(self) -> None:
        routes = self._current_routes()
        for session in list(self.sessions):
            route = routes.get(session.route.api_id)
            if route is None:
                session.close_soon(POLICY_VIOLATION, "The API was retired.")
            elif not route.spec.websocket:
                session.close_soon(POLICY_VIOLATION, "WebSocket was turned off for this API.")
            else:
                session.route = route
                self.recheck.add(session.key_hash)  # its subscription may have changed with the API

    def _check_keys(self, hashes: set[str]) -> None:
        routes = self._current_routes()
        for key_hash in hashes:
            sessions = self.by_key.get(key_hash)
            if not sessions:
                continue
            identity = next(iter(sessions)).identity  # one hash: one key, or one token identity
            try:
                if identity is not None:
                    from gateway import jwt_auth

                    record = jwt_auth.state_of(self.gateway).identities.resolve_identity(*identity)
                else:
                    record = self.gateway.keys.resolve(key_hash)
            except Exception:
                logger.warning("key re-check failed; trying again")
                self.recheck.add(key_hash)
                continue
            for session in list(sessions):
                route = routes.get(session.route.api_id)
                if route is None:
                    session.close_soon(POLICY_VIOLATION, "The API was retired.")
                    continue
                failure = auth.check_access(record, route, time.time())
                if failure is not None:
                    what = "token" if identity is not None else "key"
                    session.close_soon(POLICY_VIOLATION, f"The {what} no longer allows this API.")
                elif record is not None:
                    session.record = record  # e.g. a new expiry


_registries: dict[int, Registry] = {}


def registry_for(gateway: Gateway) -> Registry:
    registry = _registries.get(id(gateway))
    if registry is None or registry.gateway is not gateway:
        registry = _registries[id(gateway)] = Registry(gateway)
    return registry


# -- one connection ----------------------------------------------------------------------------------------------


class _Wire:
    """One side's socket as the relay reads and writes it.

    A plain TCP socket is read and written at its descriptor, and the greenlet waits on the hub only when nothing
    can be read (or written) yet: gevent's socket methods try first, fail with EAGAIN, then wait, through several
    Python layers, and that was a third of the relay's CPU per message. A TLS socket (``wss`` upstreams, gunicorn
    with a certificate) uses its own methods.
    """

    __slots__ = ("fd", "hub", "readable", "sock", "unread", "writable")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        # Bytes a wrapper read ahead of the 101 and has not given back (gateway.gunicorn_worker._Prebuffered).
        self.unread = bytes(getattr(sock, "_data", b"")[getattr(sock, "_offset", 0) :])
        self.fd: int | None = None
        self.readable: Any = None
        self.writable: Any = None
        if not hasattr(sock, "getpeercert"):  # not TLS
            self.hub = gevent.get_hub()
            self.fd = sock.fileno()
            self.readable = self.hub.loop.io(self.fd, 1)
            self.writable = self.hub.loop.io(self.fd, 2)

    def recv(self) -> bytes:
        """What has come (waiting until something has); b"" at the end of the stream."""
        if self.unread:
            data, self.unread = self.unread, b""
            return data
        fd = self.fd
        if fd is None:
            return bytes(self.sock.recv(RECV_SIZE))
        while True:
            try:
                return os.read(fd, RECV_SIZE)
            except BlockingIOError:
                self.hub.wait(self.readable)

    def sendall(self, data: bytes | bytearray) -> None:
        fd = self.fd
        if fd is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                self.hub.wait(self.writable)

    def close(self) -> None:
        """Stop watching the descriptor (before the socket is closed)."""
        for watcher in (self.readable, self.writable):
            if watcher is not None:
                watcher.close()


class Session:
    """One relayed connection: the client's and the upstream's wsproto state, sockets, and what it counted."""

    def __init__(
        self,
        registry: Registry,
        route: Route,
        record: KeyRecord,
        key_hash: str,
        lease: Lease,
        client: WSConnection,
        upstream: WSConnection,
        upstream_sock: socket.socket,
        identity: tuple[str, str, float] | None = None,
    ) -> None:
        self.registry = registry
        self.route = route
        self.record = record
        self.key_hash = key_hash  # the key's hash, or the token identity's (same eviction stream)
        self.identity = (identity[0], identity[1]) if identity else None
        self.token_until = identity[2] if identity else None
        self.lease = lease
        # Past the handshake each side is wsproto's frame-level Connection (one wrapper less per frame).
        assert client.connection is not None and upstream.connection is not None
        self.client: Connection = client.connection
        self.upstream: Connection = upstream.connection
        self.upstream_sock = upstream_sock
        self.client_sock: Any = None
        self.upstream_wire: _Wire | None = None
        self.client_wire: _Wire | None = None
        self.client_lock = gevent.lock.Semaphore()
        self.upstream_lock = gevent.lock.Semaphore()
        # When the last message (text or binary, either way) passed. Pings and pongs do not move it: client and
        # server libraries send them on their own every few seconds (websockets' default is every 20 s, and a
        # browser answers a server's pings by itself), so counting them would keep an abandoned connection, its
        # greenlet and its place under the key's cap, forever. They still pass end to end, so they keep proxies
        # in front (which count bytes) from cutting the connection.
        self.last_activity = time.monotonic()
        self.closing_since = 0.0
        self.message_size = 0  # bytes of the client's message in progress
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ended = False
        api = route.api_id
        self._counted_in = metrics.websocket_messages_total.labels(api, "in")
        self._counted_out = metrics.websocket_messages_total.labels(api, "out")
        self._reported = (0, 0)  # messages already added to the counters (count_messages)
        # What the usage buckets have of this connection (account): whether it was counted as opened, until when
        # its time, and its messages and bytes each way.
        self._opened_accounted = False
        self._accounted_at = 0.0
        self._accounted = (0, 0, 0, 0)

    def run(self, client_sock: Any, response: bytes) -> None:
        """Send the 101, relay until both sides are closed (or cut), then let go of everything."""
        self.client_sock = client_sock
        started = self._accounted_at = time.monotonic()
        self.registry.add(self)
        self.account()
        reader = None
        try:
            with contextlib.suppress(OSError, AttributeError):  # frames go out as they come, not after an ACK
                client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.client_wire = _Wire(client_sock)
            self.upstream_wire = _Wire(self.upstream_sock)
            self.client_wire.sendall(response)
            self.last_activity = time.monotonic()
            # Frames the upstream sent right behind its 101 (read with it) are already parsed: pass them on now,
            # not when the upstream next sends something.
            for event in self.upstream.events():
                self._from_upstream(event)
            reader = gevent.spawn(self._pump, False)
            self._pump(True)
            reader.join(timeout=CLOSE_WAIT_SECONDS)
        except OSError:
            pass
        finally:
            self.abort()
            if reader is not None:
                reader.kill(timeout=1.0)  # its sockets are shut: it ends at once
            if reader is None or reader.dead:
                for wire in (self.client_wire, self.upstream_wire):
                    if wire is not None:
                        wire.close()
            self.registry.remove(self)
            self.count_messages()
            with contextlib.suppress(OSError):
                self.upstream_sock.close()
            metrics.websocket_connection_seconds.labels(self.route.api_id).inc(time.monotonic() - started)
            self.account()  # the rest; the housekeeper no longer sees this session

    def count_messages(self) -> None:
        """Add the messages since the last call to the Prometheus counters (the housekeeper calls it every second
        and the session when it ends: an update costs about 1.6 us in multiprocess mode, too much per message)."""
        done_in, done_out = self._reported
        if self.messages_in != done_in:
            self._counted_in.inc(self.messages_in - done_in)
        if self.messages_out != done_out:
            self._counted_out.inc(self.messages_out - done_out)
        self._reported = (self.messages_in, self.messages_out)

    def account(self) -> None:
        """Add the connection's share since the last call to the usage buckets of the current minute, in its
        handshake's row (status 101; the handshake itself was counted as one request): opened once, the time since,
        messages and their bytes each way. Called when it opens, every second by the housekeeper and when it ends,
        so a long connection's time and messages fall in the minutes they happened in, each counted once."""
        at = time.monotonic()
        open_us = int((at - self._accounted_at) * 1_000_000)
        self._accounted_at = at
        done = self._accounted
        now = (self.messages_in, self.messages_out, self.bytes_in, self.bytes_out)
        self._accounted = now
        opened = 0 if self._opened_accounted else 1
        self._opened_accounted = True
        route, record = self.route, self.record
        self.registry.gateway.usage.add_connection(
            route.tenant_id,
            route.api_id,
            record.consumer_id,
            record.key_id,
            101,
            time.time(),
            opened=opened,
            open_us=open_us,
            messages_in=now[0] - done[0],
            messages_out=now[1] - done[1],
            bytes_in=now[2] - done[2],
            bytes_out=now[3] - done[3],
        )

    # -- reading ----------------------------------------------------------------------------------------------

    def _pump(self, from_client: bool) -> None:
        """Read one side until its connection is closed.

        wsproto parses every byte either side sends. A chunk that holds only whole messages, pings and pongs,
        starts and ends on a frame boundary and breaks no limit is then counted and passed on as the very bytes that
        came: a client's frames are masked, as the upstream expects, and an upstream's are not, as the client
        expects, so nothing is framed anew. Any other chunk (a fragment, a frame split across reads, a close, a
        message over the cap) goes event by event (``_from_client``, ``_from_upstream``) and wsproto frames it anew.
        wsproto checks text either way: a message that is not UTF-8 is not passed on, the other side gets 1007.
        """
        assert self.client_wire is not None and self.upstream_wire is not None
        if from_client:
            wire, conn, handle = self.client_wire, self.client, self._from_client
            out_wire, out_conn, out_lock = self.upstream_wire, self.upstream, self.upstream_lock
        else:
            wire, conn, handle = self.upstream_wire, self.upstream, self._from_upstream
            out_wire, out_conn, out_lock = self.client_wire, self.client, self.client_lock
        # wsproto keeps what it has not made a frame of yet in its frame decoder and the kind of the message in
        # progress in its message decoder: both empty means the next byte starts a new frame of a new message.
        frames = conn._proto._frame_decoder
        messages = conn._proto._message_decoder
        cap = self.route.spec.websocket_max_message_bytes if from_client else 0
        recv = wire.recv
        monotonic = time.monotonic
        opened = ConnectionState.OPEN
        while conn.state is not ConnectionState.CLOSED:
            try:
                data = recv()
            except OSError:
                data = b""
            if not data and self.ended:
                return
            at_boundary = frames.header is None and not frames.buffer.buffer and messages.opcode is None
            try:
                conn.receive_data(data or None)
                events = list(conn.events())
                if data and at_boundary and frames.header is None and not frames.buffer.buffer:
                    relayed = _whole(events, cap)
                    if relayed is not None and conn.state is opened and not self.closing_since:
                        count, size = relayed
                        if count:  # pings and pongs alone leave the connection idle
                            self.last_activity = monotonic()
                        if from_client:
                            self.messages_in += count
                            self.bytes_in += size
                        else:
                            self.messages_out += count
                            self.bytes_out += size
                        with out_lock:
                            if out_conn.state is opened:
                                with contextlib.suppress(OSError):
                                    out_wire.sendall(data)
                        continue
                for event in events:
                    handle(event)
            except RemoteProtocolError as exc:  # the peer broke the protocol: close it with wsproto's code
                hint = exc.event_hint
                code = hint.code if isinstance(hint, CloseConnection) else 1002
                if from_client:
                    self.close(code, str(exc)[:100])
                else:
                    self._send_client(CloseConnection(INTERNAL_ERROR, "The upstream broke the WebSocket protocol."))
                    self._send_upstream(CloseConnection(code, str(exc)[:100]))
                    self._closing()
            self._end_when_closed()
            if not data:
                return

    def _from_client(self, event: Event) -> None:
        if isinstance(event, Message):
            self.last_activity = time.monotonic()
            if self.client.state is not ConnectionState.OPEN:
                return  # the gateway is closing this connection: the rest of the message is dropped
            size = len(event.data.encode()) if isinstance(event, TextMessage) else len(event.data)
            self.message_size += size
            cap = self.route.spec.websocket_max_message_bytes
            if self.message_size > cap:
                self.close(MESSAGE_TOO_BIG, f"Messages may be at most {cap} bytes.")
                return
            self.bytes_in += size
            if event.message_finished:
                self.message_size = 0
                self.messages_in += 1
            self._send_upstream(_same_kind(event))
        elif isinstance(event, (Ping, Pong)):
            self._send_upstream(event)
        elif isinstance(event, CloseConnection):
            if event.code == 1006:  # the client vanished without a close frame
                self._send_upstream(CloseConnection(GOING_AWAY, "The client went away."))
            else:
                self._send_upstream(CloseConnection(event.code, event.reason or None))
            self._closing()

    def _from_upstream(self, event: Event) -> None:
        if isinstance(event, Message):
            self.last_activity = time.monotonic()
            size = len(event.data.encode()) if isinstance(event, TextMessage) else len(event.data)
            self.bytes_out += size
            if event.message_finished:
                self.messages_out += 1
            self._send_client(_same_kind(event))
        elif isinstance(event, (Ping, Pong)):
            self._send_client(event)
        elif isinstance(event, CloseConnection):
            if event.code == 1006:  # the upstream vanished without a close frame
                self._send_client(CloseConnection(INTERNAL_ERROR, "The upstream connection was lost."))
            else:
                self._send_client(CloseConnection(event.code, event.reason or None))
            self._closing()

    # -- writing ----------------------------------------------------------------------------------------------

    def _send_client(self, event: Event) -> None:
        _send(self.client, self.client_wire, self.client_lock, event)

    def _send_upstream(self, event: Event) -> None:
        _send(self.upstream, self.upstream_wire, self.upstream_lock, event)

    def close_soon(self, code: int, reason: str) -> None:
        """close() in a greenlet of its own: the housekeeper never waits for a client that does not read."""
        if not self.closing_since:
            self._closing()
            gevent.spawn(self.close, code, reason)

    def close(self, code: int, reason: str) -> None:
        """The gateway ends the connection: ``code`` and ``reason`` to the client, 1001 to the upstream."""
        self._closing()  # first: a send that blocks on a client that does not read is cut after CLOSE_WAIT_SECONDS
        self._send_client(CloseConnection(code, reason))
        self._send_upstream(CloseConnection(GOING_AWAY, "The gateway closed the client's connection."))
        self._closing()
        self._end_when_closed()

    def _closing(self) -> None:
        if not self.closing_since:
            self.closing_since = time.monotonic()

    def _end_when_closed(self) -> None:
        if self.client.state is ConnectionState.CLOSED and self.upstream.state is ConnectionState.CLOSED:
            self.abort()

    def abort(self) -> None:
        """Cut both sockets (both readers then see the end of their stream)."""
        if self.ended:
            return
        self.ended = True
        for sock in (self.client_sock, self.upstream_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_WHOLE_MESSAGES = (TextMessage, BytesMessage)
_CONTROL = (Ping, Pong)


def _whole(events: list[Event], cap: int) -> tuple[int, int] | None:
    """The messages and their bytes when ``events`` are only whole messages (none over ``cap`` bytes, when not 0),
    pings and pongs; else None."""
    count = size = 0
    for event in events:
        kind = type(event)
        if kind in _WHOLE_MESSAGES:
            if not (event.message_finished and event.frame_finished):  # type: ignore[attr-defined]
                return None
            data = event.data  # type: ignore[attr-defined]
            # ASCII text (most of it) is as long in UTF-8 as in characters; str.isascii() is O(1) in CPython.
            length = len(data) if kind is not TextMessage or data.isascii() else len(data.encode())
            if cap and length > cap:
                return None
            count += 1
            size += length
        elif kind not in _CONTROL:
            return None
    return count, size


def _same_kind(event: Message[Any]) -> Message[Any]:
    """The piece of a message to pass on (wsproto frames it anew on the other side)."""
    if isinstance(event, TextMessage):
        return TextMessage(data=event.data, message_finished=event.message_finished)
    return BytesMessage(data=event.data, message_finished=event.message_finished)


_SENDABLE_WHEN_OPEN = (Message, Ping, Pong)


def _send(conn: Connection, wire: _Wire | None, lock: gevent.lock.Semaphore, event: Event) -> None:
    """Frame and write ``event`` when the connection's state allows it (a closing side gets no more data)."""
    if wire is None:
        return
    with lock:
        state = conn.state
        if isinstance(event, _SENDABLE_WHEN_OPEN):
            if state is not ConnectionState.OPEN:
                return
        elif state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        data = conn.send(event)
        with contextlib.suppress(OSError):
            wire.sendall(data)
