"""Forwarding to the upstream: pooled connections, streamed bodies, timeouts, deadline, retries."""

from __future__ import annotations

import contextvars
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from django.conf import settings
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError

from gateway import http1
from gateway.resilience import Balancer, DeadlineReaper, DeadlineWatch
from gateway.routing import Target

logger = logging.getLogger(__name__)

# Body-less idempotent requests to plain-http targets (the bulk of API traffic) go through the lean client of
# gateway/http1.py; requests with a body, https targets and anything unusual go through urllib3.

# RFC 9110 §7.6.1 hop-by-hop fields (plus the obsolete proxy ones); also every field Connection names.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "proxy",
    }
)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CHUNK_SIZE = 64 * 1024
# Responses up to this size are read at once and the connection returned to the pool before the client is served.
SMALL_BODY = 64 * 1024
POOL_MAXSIZE = 64
# One answer for a refused connection and a refused address: two would tell an API's owner which internal ports
# are open (a port-scan oracle).
UNREACHABLE = "The upstream could not be reached (it refused the connection, or its address is not allowed)."

_current_watch: contextvars.ContextVar[DeadlineWatch | None] = contextvars.ContextVar("upstream_watch", default=None)


class _WatchedMixin(HTTPConnection):
    """Connects only to vetted addresses; hands the socket of each exchange to the deadline reaper before anything
    is sent. (Placed before HTTPSConnection in WatchedHTTPSConnection's bases, so it serves both.)"""

    def _new_conn(self) -> socket.socket:
        # urllib3's own connect, with the address vetted before it is contacted (http1.connect_upstream); over
        # https the TLS layer still sends SNI for, and verifies the certificate against, self.host.
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        try:
            return http1.connect_upstream(
                self._dns_host,
                self.port,
                timeout,
                socket_options=self.socket_options or (),
                source_address=self.source_address,
            )
        except http1.ConnectFailed as exc:
            if exc.timed_out:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out.") from exc
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is None:
            self.connect()
        watch = _current_watch.get()
        if watch is not None and self.sock is not None:
            watch.sockets.append(self.sock)
        super().request(*args, **kwargs)


class WatchedHTTPConnection(_WatchedMixin):
    pass


class WatchedHTTPSConnection(_WatchedMixin, HTTPSConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class BodyTooLarge(Exception):
    """The (chunked) request body grew past MAX_BODY_BYTES while being forwarded."""


class UpstreamError(Exception):
    """The upstream exchange failed; ``status`` is what the client gets (502 or 504)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestBody:
    """Streams wsgi.input to the upstream in chunks, counting bytes and enforcing the cap.

    With a Content-Length over the cap the pipeline answers 413 before contacting the upstream. A chunked body
    (no length) cannot be judged up front: it is streamed, and BodyTooLarge is raised as soon as the cap is
    crossed, which aborts the upstream request mid-body (the connection is closed, so the upstream never sees
    a complete request) and gives the client 413.
    """

    def __init__(self, stream: Any, length: int | None, cap: int) -> None:
        self.stream = stream
        self.length = length
        self.cap = cap
        self.sent = 0
        self.started = False

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        remaining = self.length
        while remaining is None or remaining > 0:
            chunk = self.stream.read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
            if not chunk:
                break
            self.sent += len(chunk)
            if self.sent > self.cap:
                raise BodyTooLarge
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


class Upstreams:
    """One connection pool per upstream target for this worker (thread- and greenlet-safe)."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str, int], HTTPConnectionPool] = {}
        self.lean: dict[tuple[str, int], http1.Http1Pool] = {}
        # The lean HTTP/1.1 client can be switched off (everything then goes through urllib3).
        self.lean_enabled = bool(settings.GATEWAY.get("LEAN_HTTP1", True))
        self.lock = threading.Lock()
        self.reaper = DeadlineReaper()

    def lean_pool(self, target: Target) -> http1.Http1Pool:
        key = (target.host, target.port)
        pool = self.lean.get(key)
        if pool is None:
            with self.lock:
                pool = self.lean.get(key)
                if pool is None:
                    pool = http1.Http1Pool(target.host, target.port, POOL_MAXSIZE)
                    self.lean[key] = pool
        return pool

    def pool(self, target: Target) -> HTTPConnectionPool:
        key = (target.scheme, target.host, target.port)
        pool = self.pools.get(key)
        if pool is None:
            with self.lock:
                pool = self.pools.get(key)
                if pool is None:
                    cls = WatchedHTTPSConnectionPool if target.scheme == "https" else WatchedHTTPConnectionPool
                    pool = cls(target.host, target.port, maxsize=POOL_MAXSIZE, block=False, retries=False)
                    self.pools[key] = pool
        return pool


@dataclass
class UpstreamResponse:
    response: Any  # urllib3's BaseHTTPResponse, or http1.Http1Response (same calls used)
    watch: DeadlineWatch
    target: Target
    started: float
    headers_at: float


def forward_request(
    upstreams: Upstreams,
    balancer: Balancer,
    *,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: RequestBody | None,
    chunked: bool,
    connect_timeout: float,
    read_timeout: float,
    total_timeout: float,
    retries: int,
) -> UpstreamResponse:
    """Send the request to one of the API's targets; retry a refused connect for idempotent methods."""
    started = time.monotonic()
    watch = upstreams.reaper.watch(started + total_timeout)
    token = _current_watch.set(watch)
    attempts = 1 + (retries if method in IDEMPOTENT_METHODS else 0)
    tried: set[str] = set()
    try:
        for attempt in range(attempts):
            target = balancer.pick(exclude=tried)
            remaining = watch.remaining()
            if remaining <= 0:
                raise UpstreamError(504, "The upstream did not answer within the API's total timeout.")
            url = (target.prefix + path) or "/"
            if query:
                url += "?" + query
            lean = (
                upstreams.lean_enabled
                and body is None
                and not chunked
                and http1.can_send(method in IDEMPOTENT_METHODS, target.scheme, url, headers)
            )
            try:
                if lean:
                    response: Any = upstreams.lean_pool(target).exchange(
                        method,
                        url,
                        headers,
                        connect_timeout=min(connect_timeout, remaining),
                        read_timeout=min(read_timeout, remaining),
                        watch=watch,
                    )
                else:
                    response = upstreams.pool(target).urlopen(
                        method,
                        url,
                        body=body,
                        headers=headers,
                        retries=False,
                        redirect=False,
                        assert_same_host=False,
                        timeout=urllib3.Timeout(
                            connect=min(connect_timeout, remaining), read=min(read_timeout, remaining)
                        ),
                        preload_content=False,
                        decode_content=False,
                        chunked=chunked,
                    )
                    if not _plain_framing(response):
                        response.close()
                        response.release_conn()
                        raise http1.ExchangeFailed("invalid Content-Length")
            except (NewConnectionError, ConnectTimeoutError, http1.ConnectFailed, http1.ForbiddenPeer) as exc:
                if isinstance(exc, http1.ForbiddenPeer):
                    logger.warning(
                        "upstream %s resolves only to refused addresses (%s); not contacted", target.host, exc
                    )
                balancer.failed(target)
                tried.add(target.url)
                if attempt + 1 < attempts and not (body is not None and body.started):
                    # Nothing reached the upstream: try again (another target when there is one) after a short,
                    # jittered pause so that a crowd of workers does not retry in lockstep.
                    time.sleep(random.uniform(0.005, 0.025) * (attempt + 1))  # noqa: S311
                    continue
                refused = isinstance(exc, (NewConnectionError, http1.ForbiddenPeer)) or (
                    isinstance(exc, http1.ConnectFailed) and not exc.timed_out
                )
                if refused and not watch.expired:
                    raise UpstreamError(502, UNREACHABLE) from exc
                raise UpstreamError(504, "The upstream did not accept the connection in time.") from exc
            except ReadTimeoutError as exc:
                raise UpstreamError(504, "The upstream did not answer in time.") from exc
            except http1.ExchangeFailed as exc:
                if exc.timed_out and not watch.expired:
                    raise UpstreamError(504, "The upstream did not answer in time.") from exc
                if watch.expired:
                    raise UpstreamError(504, "The upstream did not answer within the API's total timeout.") from exc
                raise UpstreamError(502, "The upstream closed the connection or sent an invalid response.") from exc
            except (ProtocolError, HTTPError, OSError) as exc:
                if watch.expired:
                    raise UpstreamError(504, "The upstream did not answer within the API's total timeout.") from exc
                raise UpstreamError(502, "The upstream closed the connection or sent an invalid response.") from exc
            return UpstreamResponse(response, watch, target, started, time.monotonic())
        raise UpstreamError(502, "No upstream target could be reached.")
    except BaseException:
        upstreams.reaper.done(watch)
        raise
    finally:
        _current_watch.reset(token)


def response_headers(response: Any) -> list[tuple[str, str]]:
    """The upstream's headers minus hop-by-hop ones (and those its Connection header names); repeats kept."""
    if isinstance(response, http1.Http1Response):
        raw = response.header_list
        connection = ", ".join(v for n, v in raw if n.lower() == "connection")
    else:
        raw = list(response.headers.iteritems())
        connection = response.headers.get("connection")
        if "transfer-encoding" in response.headers:
            # The body is de-chunked here (or runs to the end of the connection): its length is not what it says.
            raw = [(n, v) for n, v in raw if n.lower() != "content-length"]
        elif len(response.headers.getlist("content-length")) > 1:
            # Repeats of one length (_plain_framing has vetted them): passed on once.
            first = next(i for i, (n, _) in enumerate(raw) if n.lower() == "content-length")
            raw = [h for i, h in enumerate(raw) if i == first or h[0].lower() != "content-length"]
    drop = HOP_BY_HOP
    if connection:
        drop = drop | {name.strip().lower() for name in connection.split(",")}
    return [(name, value) for name, value in raw if name.lower() not in drop]


def _plain_framing(response: Any) -> bool:
    """Whether a urllib3 response's Content-Length is usable: plain ASCII digits, repeats equal (RFC 9112 §6.3).

    http.client and urllib3 are lenient ("+5" counts as 5, "²" or "5, 6" as no length at all); a proxy must not
    pass such a length on, and answers 502 instead, as the lean client does. With Transfer-Encoding the length is
    ignored (and dropped by response_headers).
    """
    headers = response.headers
    if "content-length" not in headers or "transfer-encoding" in headers:
        return True
    values = headers.getlist("content-length")
    return all(http1.is_content_length(v) for v in values) and len({int(v) for v in values}) == 1


def body_is_small(response: Any, method: str) -> bool:
    if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
        return True
    length = response.length_remaining
    return length is not None and length <= SMALL_BODY
