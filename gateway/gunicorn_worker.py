"""gunicorn's gevent worker with a lean request path for simple, body-less API calls.

Under wrk, gunicorn's per-request machinery (its request parser and header policy, the environ it builds, a
gevent Timeout per keep-alive read, config lookups, hooks and logging checks) was about a quarter of a gateway
worker's CPU: more than the gateway's own routing, key check and rate-limit call together. This worker keeps
everything of gunicorn's (arbiter, signals, graceful shutdown, max_requests, its Response writer) and replaces
only that per-request path, and only for the requests it can read without doubt:

* the request line is ``GET|HEAD|DELETE|OPTIONS <origin-form target> HTTP/1.1`` (or ``HTTP/1.0``), the target made
  only of RFC 3986 characters (no fragment);
* every header line is ``token ":" OWS value OWS`` with visible-ASCII values, each field at most once, no underscore
  in a name (gunicorn drops or refuses those), none of Content-Length, Transfer-Encoding, Expect, Upgrade, TE,
  Trailer, HTTP2-Settings, and within gunicorn's size limits; gunicorn's secure-scheme headers (X-Forwarded-Proto,
  ...) set wsgi.url_scheme exactly as gunicorn does: only from peers in forwarded_allow_ips, and headers that
  disagree go to gunicorn (400);
* the path belongs to an API (the gateway answers it).

The keep-alive timeout covers a whole request head, as gunicorn's does; a head that is already bad (a bare LF, a
request line that cannot match, too long) goes to gunicorn at once rather than after more bytes.

Anything else (a body, an unusual byte, a repeated field, a control-plane path, an oversized head) is handed, with
the bytes already read, to gunicorn's own loop for the rest of the connection: gunicorn alone decides about every
request that is not plainly well formed, and Django's requests never take the lean path. The lean path is off
when a setting it does not implement is on (TLS, PROXY protocol, h2c, the uwsgi protocol, gunicorn's access log or
statsd, request hooks, SCRIPT_NAME); ``GUNICORN_WORKER_CLASS=gevent`` selects stock gunicorn. Tests compare its
environ with gunicorn's for every request shape it accepts (tests/gateway/test_lean_worker.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
import time
from typing import Any

import gevent
from gunicorn import util
from gunicorn.http import message as gunicorn_message
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.workers.ggevent import GeventWorker

_REQUEST_LINE = re.compile(rb"(GET|HEAD|DELETE|OPTIONS) (/[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
# Fields that change framing or protocol, or that gunicorn itself interprets: such requests take gunicorn's path.
_NOT_SIMPLE = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "UPGRADE", "HTTP2-SETTINGS", "TE", "TRAILER"})
_UNLIMITED = 1 << 20
READ_SIZE = 65536
# This process's worker (set when it starts serving).
running_worker: GatewayWorker | None = None


class _EmptyInput:
    """wsgi.input of a request without a body."""

    def read(self, size: int | None = None) -> bytes:
        return b""

    def readline(self, size: int | None = None) -> bytes:
        return b""

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return []

    def __iter__(self) -> Any:
        return iter(())


EMPTY_INPUT = _EmptyInput()


class LeanRequest:
    """A request the lean path accepted: its environ, and what gunicorn's Response needs to know of it."""

    __slots__ = ("close", "environ", "method", "version")

    def __init__(self, environ: dict[str, Any], method: str, version: tuple[int, int], close: bool) -> None:
        self.environ = environ
        self.method = method
        self.version = version
        self.close = close

    def should_close(self) -> bool:
        return self.close


class LeanParser:
    """Reads a request head into the environ gunicorn would build, or refuses it (None) for gunicorn to read.

    Limits are gunicorn's, read the way gunicorn reads them (a field's size counts its CRLF; a request line limit
    of 0 is unlimited and anything above 8190 is 8190; no field limit or a negative one is 32768).
    """

    def __init__(self, cfg: Any) -> None:
        line = cfg.limit_request_line
        self.limit_line = MAX_REQUEST_LINE if line < 0 or line >= MAX_REQUEST_LINE else (line or _UNLIMITED)
        fields = cfg.limit_request_fields
        self.limit_fields = MAX_HEADERS if fields <= 0 or fields > MAX_HEADERS else fields
        size = cfg.limit_request_field_size
        self.limit_field_size = size if size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
        # The most bytes a head gunicorn would accept can have: past this, gunicorn answers it (431).
        self.limit_head = self.limit_line + 2 + self.limit_fields * (self.limit_field_size + 2) + 4
        # Honoured only from peers in forwarded_allow_ips, as gunicorn does.
        self.scheme_headers: dict[str, str] = {name.upper(): value for name, value in cfg.secure_scheme_headers.items()}

    def incomplete_is_bad(self, buffer: bytes | bytearray) -> bool:
        """For a head still without its blank line: True when gunicorn should answer it now, not after more bytes."""
        if buffer.count(b"\n") != buffer.count(b"\r\n"):
            return True  # a bare LF: gunicorn refuses it
        first = buffer.find(b"\r\n")
        if first < 0:
            return len(buffer) > self.limit_line + 2
        return _REQUEST_LINE.fullmatch(buffer, 0, first) is None

    def parse(self, head: bytes | bytearray, base: dict[str, Any], trusted: bool = False) -> LeanRequest | None:
        """``head``: the bytes before the blank line; ``base``: the connection's environ entries (copied);
        ``trusted``: the peer may set gunicorn's secure-scheme headers (forwarded_allow_ips)."""
        lines = bytes(head).split(b"\r\n")
        if len(lines[0]) > self.limit_line or len(lines) - 1 > self.limit_fields:
            return None
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            return None
        environ = base.copy()
        scheme_headers = self.scheme_headers if trusted else {}
        scheme = None
        limit = self.limit_field_size - 2
        connection = None
        for line in lines[1:]:
            header = _HEADER_LINE.fullmatch(line) if len(line) <= limit else None
            if header is None:
                return None
            name = header[1].decode("ascii").upper()
            if name in _NOT_SIMPLE:
                return None
            key = "CONTENT_TYPE" if name == "CONTENT-TYPE" else "HTTP_" + name.replace("-", "_")
            if key in environ:
                return None  # a repeated field: gunicorn's rules (joining, or refusing singletons) apply
            value = header[2].decode("ascii")
            environ[key] = value
            if name == "CONNECTION":
                connection = value.lower()
            elif name in scheme_headers:
                this = "https" if value == scheme_headers[name] else "http"
                if scheme is not None and this != scheme:
                    return None  # scheme headers that disagree: gunicorn answers 400
                scheme = environ["wsgi.url_scheme"] = this
        method = match[1].decode("ascii")
        target = match[2].decode("ascii")
        minor = int(match[3])
        path, _sep, query = target.partition("?")
        environ["REQUEST_METHOD"] = method
        environ["RAW_URI"] = target
        environ["QUERY_STRING"] = query
        environ["PATH_INFO"] = util.unquote_to_wsgi_str(path)
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if minor else "HTTP/1.0"
        if connection == "close":
            close = True
        elif connection == "keep-alive":
            close = False
        else:
            close = minor == 0
        return LeanRequest(environ, method, (1, minor), close)


def connection_environ(cfg: Any, client: Any, addr: tuple[Any, ...], server: Any) -> dict[str, Any]:
    """The environ entries every request of one connection shares."""
    environ = gunicorn_wsgi.base_environ(cfg)
    environ.update(
        {
            "wsgi.multithread": True,
            "wsgi.url_scheme": "http",
            "wsgi.input": EMPTY_INPUT,
            "gunicorn.socket": client,
            "REMOTE_ADDR": addr[0],
            "REMOTE_PORT": str(addr[1]),
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]),
            "SCRIPT_NAME": "",
        }
    )
    return environ


class _Prebuffered:
    """The client socket, giving back the bytes already read before reading more (for gunicorn's own loop)."""

    def __init__(self, sock: Any, data: bytes | bytearray) -> None:
        self._sock = sock
        self._data = bytes(data)
        self._offset = 0

    def recv(self, size: int, *args: Any) -> bytes:
        if self._offset < len(self._data):
            data = self._data[self._offset : self._offset + size]
            self._offset += len(data)
            return data
        return bytes(self._sock.recv(size, *args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class GatewayWorker(GeventWorker):
    """gevent worker: simple API requests take a lean path; everything else is gunicorn's, unchanged."""

    lean: bool | None = None
    alive: bool  # set by gunicorn's Worker
    parser: LeanParser

    def _lean_possible(self) -> bool:
        """Whether this worker may take the lean path at all (decided once, on the first connection).

        Only for apimgmt's WSGI application with the gateway mounted (gunicorn.conf.py also serves other apps,
        such as the demo's echo upstream, which then run on gunicorn's path alone).
        """
        mounted = sys.modules.get("gateway.wsgi")  # imported by apimgmt.wsgi when the role includes the gateway
        cfg = self.cfg
        hooks_default = all(
            getattr(cfg, hook).__module__ == "gunicorn.config" for hook in ("pre_request", "post_request")
        )
        self.parser = LeanParser(cfg)
        return (
            mounted is not None
            and isinstance(self.wsgi, mounted.GatewayApplication)
            and bool(cfg.keepalive)
            and not cfg.is_ssl
            and cfg.proxy_protocol == "off"
            and cfg.http2_cleartext == "off"
            and cfg.protocol == "http"
            and not cfg.statsd_host  # gunicorn's request metrics come from its access logging
            and not cfg.accesslog
            and hooks_default
            and not os.environ.get("SCRIPT_NAME")
        )

    def init_process(self) -> None:
        global running_worker
        running_worker = self  # gateway.websocket closes its connections (1001) once this worker stops being alive
        super().init_process()

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: stop as gunicorn does; open WebSocket connections are closed with 1001 (gateway.websocket)."""
        super().handle_exit(sig, frame)
        relay = sys.modules.get("gateway.websocket")
        if relay is not None:
            relay.begin_shutdown()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        if self.lean is None:
            self.lean = self._lean_possible()
        if not self.lean or not isinstance(addr, tuple):
            super(GeventWorker, self).handle(listener, client, addr)
            return
        from gateway.wsgi import get_gateway

        gateway = get_gateway()
        parser = self.parser
        base = connection_environ(self.cfg, client, addr, listener.getsockname())
        trusted = bool(
            gunicorn_message._ip_in_allow_list(
                addr[0], self.cfg.forwarded_allow_ips, self.cfg.forwarded_allow_networks()
            )
        )
        keepalive = float(self.cfg.keepalive)
        buffer = bytearray()
        handoff = False
        try:
            # Not `while self.alive`: a worker on its way out still answers the request in hand, with
            # "Connection: close" (as gunicorn does); _respond then ends the connection.
            while True:
                end = buffer.find(b"\r\n\r\n")
                deadline = 0.0
                while end < 0:
                    if len(buffer) > parser.limit_head or parser.incomplete_is_bad(buffer):
                        break  # gunicorn answers it now (400 or 431)
                    # gunicorn's keep-alive timeout: for the whole head, not for each read.
                    now = time.monotonic()
                    deadline = deadline or now + keepalive
                    if now >= deadline:
                        return
                    client.settimeout(deadline - now)
                    try:
                        data = client.recv(READ_SIZE)
                    except TimeoutError:
                        return
                    finally:
                        client.settimeout(None)
                    if not data:
                        return
                    scanned = max(0, len(buffer) - 3)
                    buffer += data
                    end = buffer.find(b"\r\n\r\n", scanned)
                request = parser.parse(buffer[:end], base, trusted) if end >= 0 else None
                if request is None:
                    handoff = True  # an oversized or unusual head: gunicorn reads (or refuses) it
                    return
                result = gateway.handle(request.environ)
                if result is None:
                    handoff = True  # a control-plane path: Django, through gunicorn
                    return
                del buffer[: end + 4]
                if not self._respond(client, request, result):
                    return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except (gevent.GreenletExit, SystemExit):
            pass  # the worker is stopping (as gunicorn's gevent worker treats them)
        except Exception as exc:
            self.handle_error(None, client, addr, exc)
        finally:
            if handoff:
                # gunicorn serves this request and the rest of the connection, from the bytes already read.
                super(GeventWorker, self).handle(listener, _Prebuffered(client, buffer), addr)
            else:
                util.close(client)

    def _respond(self, client: Any, request: LeanRequest, result: Any) -> bool:
        """Write the gateway's answer through gunicorn's Response; False when the connection must close."""
        resp = gunicorn_wsgi.Response(request, client, self.cfg)
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        if not self.alive:
            resp.force_close()
        body = result.body
        try:
            resp.start_response(result.status, result.headers)
            for item in body:
                resp.write(item)
            resp.close()
        except OSError:
            raise
        except Exception:
            if not resp.headers_sent:
                raise  # nothing sent yet: gunicorn's error answer (500) follows
            # Headers are out: the only honest signal left is to cut the connection.
            self.log.exception("Error handling request")
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            return False
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return not resp.should_close()
