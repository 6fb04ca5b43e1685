"""Forwarding to the upstream: pooled connections, streamed bodies, timeouts, deadline, retries."""

from __future__ import annotations

import contextvars
import logging
import math
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


class ClientBodyError(Exception):
    """The client's request body did not arrive whole: too slow (408), or cut short or malformed (400).

    Never the upstream's fault: the pipeline does not count it against the API's circuit breaker.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestBody:
    """Reads wsgi.input in pieces for the upstream, counting bytes, enforcing the cap and the client's pace.

    With a Content-Length over the cap the pipeline answers 413 before contacting the upstream. A chunked body
    (no length) cannot be judged up front: it is streamed, and BodyTooLarge is raised as soon as the cap is
    crossed, which aborts the upstream request mid-body (the connection is closed, so the upstream never sees
    a complete request) and gives the client 413.

    A slow client must not hold an upstream connection (or a worker) for long: each piece of up to CHUNK_SIZE
    bytes (or the rest of the body, when less) must arrive within ``read_timeout`` seconds, or ClientBodyError
    (408). The deadline reaper enforces it by shutting the client socket down for reading, which wakes a blocked
    read whatever the server (gunicorn's readers loop until a piece is whole, so a socket timeout per recv() could
    be kept alive by a byte now and then); the answer can still be written. Small bodies are read whole with
    ``buffer()`` before the upstream is contacted at all. Time spent waiting for the client does not count against
    the upstream exchange's total deadline (``upstream_watch``).
    """

    def __init__(
        self,
        stream: Any,
        length: int | None,
        cap: int,
        *,
        client_socket: Any = None,
        reaper: DeadlineReaper | None = None,
        read_timeout: float = 0.0,
    ) -> None:
        self.stream = stream
        self.length = length
        self.cap = cap
        self.sent = 0
        self.started = False
        self.complete = False
        self.buffered: bytes | None = None
        self.upstream_watch: DeadlineWatch | None = None
        self.read_timeout = read_timeout
        self._reaper = reaper if client_socket is not None and read_timeout > 0 else None
        self._client_socket = client_socket
        self._client_watch: DeadlineWatch | None = None

    def buffer(self) -> None:
        """Read the whole body now (before the upstream is contacted); raises ClientBodyError or BodyTooLarge."""
        self.buffered = b"".join(self._pieces())

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        if self.buffered is not None:
            if self.buffered:
                yield self.buffered
            return
        yield from self._pieces()

    def close(self) -> None:
        """Stop watching the client's pace (the exchange is over, whichever way)."""
        if self._client_watch is not None and self._reaper is not None:
            self._reaper.done(self._client_watch)
            self._client_watch = None

    def _pieces(self) -> Iterator[bytes]:
        remaining = self.length
        while remaining is None or remaining > 0:
            chunk = self._read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
            if not chunk:
                if remaining is not None:
                    raise self._failed(f"The request body ended after {self.sent} of its {self.length} bytes.")
                break
            self.sent += len(chunk)
            if self.sent > self.cap:
                raise BodyTooLarge
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
        self.complete = True
        self.close()

    def _read(self, size: int) -> bytes:
        watch = self._client_watch
        if watch is None and self._reaper is not None:
            watch = self._client_watch = self._reaper.watch(math.inf, how=socket.SHUT_RD)
            watch.sockets.append(self._client_socket)
        upstream = self.upstream_watch
        paused = upstream.deadline if upstream is not None else 0.0
        if upstream is not None:
            upstream.deadline = math.inf  # waiting for the client is not the upstream's time
        started = time.monotonic()
        if watch is not None:
            watch.deadline = started + self.read_timeout
        try:
            chunk = self.stream.read(size)
        except Exception as exc:  # gunicorn's NoMoreData or InvalidChunkSize, a reset connection ...
            raise self._failed(f"The request body could not be read ({type(exc).__name__}).") from exc
        finally:
            if watch is not None:
                watch.deadline = math.inf
            if upstream is not None:
                upstream.deadline = paused + (time.monotonic() - started)
        if watch is not None and watch.expired:
            raise self._failed("The request body arrived too slowly.")
        return chunk

    def _failed(self, detail: str) -> ClientBodyError:
        """408 when the reaper cut the read short (the client was too slow), else 400 with ``detail``."""
        watch = self._client_watch
        self.close()
        if watch is not None and watch.expired:
            return ClientBodyError(
                408,
                f"The request body arrived too slowly: each {CHUNK_SIZE // 1024} KiB of it (or the rest of it, when "
                f"less) must arrive within {self.read_timeout:g} s.",
            )
        return ClientBodyError(400, detail)


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
    if body is not None:
        body.upstream_watch = watch
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
