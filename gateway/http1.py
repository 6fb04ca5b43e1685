"""A lean HTTP/1.1 client for the common exchange: a body-less, idempotent request to a plain-http upstream."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterator, Sequence

from django.conf import settings

from apimgmt.validation import is_forbidden_address
from gateway import resolver
from gateway.resilience import DeadlineWatch

# Measured under wrk (issue 3 bench), urllib3 + http.client cost about a quarter of a gateway worker's CPU per
# request: a Timeout object, a pool checkout that polls the socket, header validation per putheader, the response
# headers parsed by the ``email`` package, then copied into an HTTPHeaderDict. This client writes the request in
# one send and parses the status line and headers with bytes operations; everything else (request bodies, https,
# upgrades) still goes through urllib3 in gateway/proxy.py.
#
# Semantics kept from the urllib3 path: connect and read timeouts per socket operation, the total deadline through
# DeadlineWatch (the reaper shuts the socket down), keep-alive reuse only after a complete body, hop-by-hop handling
# left to the caller. An idle connection is peeked at before reuse (closed or unasked bytes: dropped); one the
# upstream closes while our request is on its way (EOF or reset before any byte of the answer) is replaced by
# another connection: the request is idempotent and never reached the upstream.

MAX_HEAD_BYTES = 64 * 1024
RECV_SIZE = 64 * 1024
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
_NO_BODY_STATUS = frozenset({204, 304})
_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class ForbiddenPeer(Exception):
    """Every address the upstream's name resolves to is one apimgmt refuses (loopback, private, metadata …)."""


def connect_upstream(
    host: str,
    port: int,
    timeout: float | None,
    *,
    socket_options: Sequence[tuple[int, int, int | bytes]] = (),
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """Resolve ``host``, set aside the addresses apimgmt refuses, and connect to the first other one that answers.

    Upstream URLs are checked when an API is saved, but a name can be re-pointed later (DNS rebinding). So each
    connection resolves the name, vets the addresses (unless UPSTREAM_ALLOW_PRIVATE allows internal upstreams)
    and connects to exactly a vetted one: a refused address is never contacted, so neither a port's state nor a
    connect's timing there can be learnt through the gateway. Raises ForbiddenPeer when every address was
    refused, ConnectFailed when none answered. Used by both clients (gateway/proxy.py for urllib3, whose TLS then
    still sends SNI for, and verifies the certificate against, the host name).
    """
    try:
        infos = resolver.resolve(host, port, timeout)
    except TimeoutError as exc:
        raise ConnectFailed(timed_out=True) from exc
    except (OSError, UnicodeError) as exc:
        raise ConnectFailed(timed_out=False) from exc
    check = not settings.UPSTREAM_ALLOW_PRIVATE
    error: OSError | None = None
    tried = False
    for family, kind, proto, _, address in infos:
        if check and is_forbidden_address(ipaddress.ip_address(str(address[0]).split("%", 1)[0])):
            continue
        tried = True
        sock = socket.socket(family, kind, proto)
        try:
            for option in socket_options:
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if not tried:
        raise ForbiddenPeer(", ".join(sorted({str(info[4][0]) for info in infos})))
    raise ConnectFailed(timed_out=isinstance(error, TimeoutError)) from error


class ConnectFailed(Exception):
    """No connection could be made; ``timed_out`` tells a timeout from a refusal."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("connect timed out" if timed_out else "connection refused")
        self.timed_out = timed_out


class ExchangeFailed(Exception):
    """The upstream did not answer properly; ``timed_out`` when a read timed out."""

    def __init__(self, detail: str, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class _Stale(Exception):
    """A reused keep-alive connection was closed by the upstream before it answered."""


def is_content_length(value: str) -> bool:
    """A Content-Length value as RFC 9112 §6.3 has it: plain ASCII digits (not "+5", " 5", "5, 5" or "²").

    str.isdigit() alone takes "²" (which int() then refuses), and more than 18 digits is no real body length (and
    would reach int()'s digit limit).
    """
    return 0 < len(value) <= 18 and value.isascii() and value.isdigit()


def can_send(idempotent: bool, scheme: str, target: str, headers: dict[str, str]) -> bool:
    """Whether this exchange may take the lean path (anything unusual goes through urllib3, which validates)."""
    if not idempotent or scheme != "http" or _UNSAFE_TARGET.search(target):
        return False
    for name, value in headers.items():
        if "\r" in value or "\n" in value or ":" in name or "\r" in name or "\n" in name:
            return False
    return True


class Http1Pool:
    """Idle keep-alive connections to one host:port (LIFO, so the warmest socket is reused first)."""

    def __init__(self, host: str, port: int, maxsize: int) -> None:
        self.host = host
        self.port = port
        self.maxsize = maxsize
        self.idle: list[socket.socket] = []
        self.lock = threading.Lock()
        self.host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            self.host_header = f"[{host}]" if port == 80 else f"[{host}]:{port}"

    def _connect(self, timeout: float) -> socket.socket:
        return connect_upstream(self.host, self.port, timeout, socket_options=_NODELAY)

    def put(self, sock: socket.socket) -> None:
        with self.lock:
            if len(self.idle) < self.maxsize:
                self.idle.append(sock)
                return
        sock.close()

    def exchange(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        watch: DeadlineWatch,
    ) -> Http1Response:
        """Send the request and read the response head; the body is read through the returned response."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1")
        while True:
            with self.lock:
                sock = self.idle.pop() if self.idle else None
            reused = sock is not None
            if watch.expired:
                if sock is not None:
                    self.put(sock)
                raise ExchangeFailed("total deadline passed")
            if sock is not None and not _idle_and_open(sock):
                sock.close()
                continue
            if sock is None:
                sock = self._connect(min(connect_timeout, max(watch.remaining(), 0.001)))
            watch.sockets.append(sock)
            try:
                return self._exchange_on(sock, reused, method, request, read_timeout)
            except _Stale:
                sock.close()
                continue  # the next round takes another idle socket or connects afresh
            except BaseException:
                sock.close()
                raise

    def _exchange_on(
        self, sock: socket.socket, reused: bool, method: str, request: bytes, read_timeout: float
    ) -> Http1Response:
        sock.settimeout(read_timeout)
        try:
            sock.sendall(request)
        except OSError as exc:
            if reused:
                raise _Stale from exc
            raise ExchangeFailed("could not send the request") from exc
        buffer = b""
        while True:
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ExchangeFailed("response head too large")
                try:
                    data = sock.recv(RECV_SIZE)
                except TimeoutError as exc:
                    raise ExchangeFailed("read timed out", timed_out=True) from exc
                except OSError as exc:
                    if reused and not buffer:
                        raise _Stale from exc
                    raise ExchangeFailed("connection reset") from exc
                if not data:
                    if reused and not buffer:
                        raise _Stale
                    raise ExchangeFailed("connection closed before the response head")
                buffer += data
            response = _parse_head(buffer[:end], method)
            buffer = buffer[end + 4 :]
            if 100 <= response.status < 200:
                if response.status == 101:
                    raise ExchangeFailed("unexpected protocol switch")
                reused = False  # an interim answer (100, 103): the final one follows on this connection
                continue
            response.attach(self, sock, buffer)
            return response


def _idle_and_open(sock: socket.socket) -> bool:
    """An idle connection is fit for reuse only if the upstream neither closed it nor sent anything on it.

    A server may close an idle connection, or answer it unasked (a 408 before closing): such bytes must never be
    taken as the answer to the next request. One non-blocking peek; under gevent a zero timeout keeps it from
    waiting on the hub.
    """
    try:
        sock.settimeout(0.0)
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing to read: open and quiet
    except OSError:
        return False
    return False  # EOF or unsolicited bytes


def _parse_head(head: bytes, method: str) -> Http1Response:
    try:
        text = head.decode("latin-1")
        status_line, _, rest = text.partition("\r\n")
        version, _, status_reason = status_line.partition(" ")
        status_text, _, reason = status_reason.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(status_text) != 3:
            raise ValueError(status_line)
        status = int(status_text)
    except ValueError as exc:
        raise ExchangeFailed("invalid status line") from exc
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    close = version == "HTTP/1.0"
    if rest:
        for line in rest.split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or line[0] in " \t":
                raise ExchangeFailed("invalid header line")
            value = value.strip(" \t")
            headers.append((name, value))
            lower = name.lower()
            if lower == "content-length":
                if not is_content_length(value) or (length is not None and int(value) != length):
                    raise ExchangeFailed("invalid Content-Length")
                if length is not None:
                    headers.pop()  # the same length repeated: passed on once
                length = int(value)
            elif lower == "transfer-encoding":
                chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
                if not chunked:
                    close = True  # another coding: the body runs to the end of the connection
            elif lower == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    close = True
                elif "keep-alive" in tokens and version == "HTTP/1.0":
                    close = False
    if chunked:
        if length is not None:
            # Both framings at once (RFC 9112 §6.3: chunked wins): the length is wrong for what we pass on, and
            # the connection is not trusted for another exchange.
            headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
            close = True
        length = None
    if method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
        length, chunked = 0, False
    elif length is None and not chunked:
        close = True  # delimited by the end of the connection
    return Http1Response(status, reason, headers, length, chunked, close)


class Http1Response:
    """The response as gateway/pipeline.py reads it (a subset of urllib3's response interface)."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        length: int | None,
        chunked: bool,
        close: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.header_list = headers
        self.length_remaining = length  # None: chunked or delimited by connection close
        self.chunked = chunked
        self.will_close = close
        self.complete = length == 0
        self._pool: Http1Pool | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""

    def attach(self, pool: Http1Pool, sock: socket.socket, buffer: bytes) -> None:
        self._pool, self._sock, self._buffer = pool, sock, buffer

    # -- reading ------------------------------------------------------------------------------------------------

    def read(self, decode_content: bool = False) -> bytes:
        """The whole (remaining) body."""
        return b"".join(self.stream(RECV_SIZE))

    def stream(self, amt: int = RECV_SIZE, decode_content: bool = False) -> Iterator[bytes]:
        if self.complete:
            return
        if self.chunked:
            yield from self._chunks()
        elif self.length_remaining is not None:
            yield from self._counted(amt)
        else:
            yield from self._until_close()
        self.complete = True

    def _recv(self, size: int) -> bytes:
        assert self._sock is not None
        try:
            return self._sock.recv(size)
        except TimeoutError as exc:
            raise ExchangeFailed("read timed out", timed_out=True) from exc
        except OSError as exc:
            raise ExchangeFailed("connection reset") from exc

    def _counted(self, amt: int) -> Iterator[bytes]:
        remaining = self.length_remaining or 0
        if self._buffer:
            data, self._buffer = self._buffer[:remaining], self._buffer[remaining:]  # extra bytes: not reused
            remaining -= len(data)
            self.length_remaining = remaining
            yield data
        while remaining > 0:
            data = self._recv(min(amt, remaining))
            if not data:
                raise ExchangeFailed("connection closed before the end of the body")
            remaining -= len(data)
            self.length_remaining = remaining
            yield data

    def _until_close(self) -> Iterator[bytes]:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            yield data
        while True:
            data = self._recv(RECV_SIZE)
            if not data:
                return
            yield data

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            data = self._recv(RECV_SIZE)
            if not data:
                raise ExchangeFailed("connection closed inside a chunk")
            self._buffer += data

    def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                return line
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise ExchangeFailed("chunk header too long")
            self._fill(len(self._buffer) + 1)

    def _chunks(self) -> Iterator[bytes]:
        while True:
            try:
                size = int(self._line().split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise ExchangeFailed("invalid chunk size") from exc
            if size < 0:
                raise ExchangeFailed("invalid chunk size")
            if size == 0:
                while self._line():  # trailer fields are hop-by-hop for us: dropped
                    pass
                return
            while size > 0:
                if not self._buffer:
                    self._fill(1)
                data, self._buffer = self._buffer[:size], self._buffer[size:]
                size -= len(data)
                yield data
            self._fill(2)
            if self._buffer[:2] != b"\r\n":
                raise ExchangeFailed("chunk not terminated by CRLF")
            self._buffer = self._buffer[2:]

    # -- the connection -----------------------------------------------------------------------------------------

    def isclosed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Drop the connection (the body was not read to its end, or it broke)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def release_conn(self) -> None:
        """Give the connection back for reuse when the body was read to its end; close it otherwise."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.complete and not self.will_close and not self._buffer and self._pool is not None:
            self._pool.put(sock)
        else:
            sock.close()
