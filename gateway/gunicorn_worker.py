"""gunicorn's gevent worker with a lean request path for simple, body-less API calls.

Under wrk, gunicorn's per-request machinery (its request parser and header policy, the environ it builds, a
gevent Timeout per keep-alive read, config lookups, hooks and logging checks) was about a quarter of a gateway
worker's CPU: more than the gateway's own routing, key check and rate-limit call together. This worker keeps
everything of gunicorn's (arbiter, signals, graceful shutdown, max_requests, its Response writer) and replaces
only that per-request path, and only for the requests it can read without doubt:

* the request line is ``GET|HEAD|DELETE|OPTIONS <origin-form target> HTTP/1.1`` (or ``HTTP/1.0``), the target made
  only of RFC 3986 characters (no fragment);
* every header line is ``token ":" OWS value OWS`` with visible-ASCII values, each field at most once, no underscore
  in a name, and none of Content-Length, Transfer-Encoding, Expect, Upgrade, TE, Trailer, HTTP2-Settings or a
  header gunicorn gives meaning to (its secure-scheme and forwarder headers);
* the path belongs to an API (the gateway answers it).

Anything else (a body, an unusual byte, a repeated field, a control-plane path, an oversized head) is handed, with
the bytes already read, to gunicorn's own loop for the rest of the connection: gunicorn alone decides about every
request that is not plainly well formed, and Django's requests never take the lean path. The lean path is off
when a setting it does not implement is on (TLS, PROXY protocol, h2c, gunicorn's access log, request hooks,
SCRIPT_NAME); ``GUNICORN_WORKER_CLASS=gevent`` selects stock gunicorn.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
from typing import Any

import gevent
from gunicorn import util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.ggevent import GeventWorker

_REQUEST_LINE = re.compile(rb"(GET|HEAD|DELETE|OPTIONS) (/[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
# Fields that change framing or protocol, or that gunicorn itself interprets: such requests take gunicorn's path.
_NOT_SIMPLE = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "UPGRADE", "HTTP2-SETTINGS", "TE", "TRAILER"})
_UNLIMITED = 1 << 20
READ_SIZE = 65536


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
    """Reads a request head into the environ gunicorn would build, or refuses it (None) for gunicorn to read."""

    def __init__(self, cfg: Any) -> None:
        self.special = _NOT_SIMPLE | {name.upper() for name in cfg.secure_scheme_headers}
        self.special |= {name.upper().replace("_", "-") for name in cfg.forwarder_headers}
        self.limit_line = cfg.limit_request_line or _UNLIMITED
        self.limit_fields = cfg.limit_request_fields
        self.limit_field_size = cfg.limit_request_field_size or _UNLIMITED

    def parse(self, head: bytes, base: dict[str, Any]) -> LeanRequest | None:
        """``head``: the bytes before the blank line; ``base``: the connection's environ entries (copied)."""
        lines = head.split(b"\r\n")
        if len(lines[0]) > self.limit_line or len(lines) - 1 > self.limit_fields:
            return None
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            return None
        environ = base.copy()
        special = self.special
        limit = self.limit_field_size
        connection = None
        for line in lines[1:]:
            header = _HEADER_LINE.fullmatch(line) if len(line) <= limit else None
            if header is None:
                return None
            name = header[1].decode("ascii").upper()
            if name in special:
                return None
            key = "CONTENT_TYPE" if name == "CONTENT-TYPE" else "HTTP_" + name.replace("-", "_")
            if key in environ:
                return None  # a repeated field: gunicorn's rules (joining, or refusing singletons) apply
            value = header[2].decode("ascii")
            environ[key] = value
            if name == "CONNECTION":
                connection = value.lower()
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

    def __init__(self, sock: Any, data: bytes) -> None:
        self._sock = sock
        self._data = data

    def recv(self, size: int, *args: Any) -> bytes:
        if self._data:
            data, self._data = self._data[:size], self._data[size:]
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
            and not cfg.accesslog
            and hooks_default
            and not os.environ.get("SCRIPT_NAME")
        )

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        if self.lean is None:
            self.lean = self._lean_possible()
        if not self.lean or not isinstance(addr, tuple):
            super(GeventWorker, self).handle(listener, client, addr)
            return
        from gateway.wsgi import get_gateway

        gateway = get_gateway()
        base = connection_environ(self.cfg, client, addr, listener.getsockname())
        keepalive = float(self.cfg.keepalive)
        limit = self.parser.limit_line + self.parser.limit_fields * (self.parser.limit_field_size + 2) + 4
        buffer = b""
        handoff = False
        try:
            while self.alive:
                end = buffer.find(b"\r\n\r\n")
                while end < 0 and len(buffer) <= limit:
                    client.settimeout(keepalive)  # gunicorn's keep-alive timeout, only while waiting for a request
                    try:
                        data = client.recv(READ_SIZE)
                    except TimeoutError:
                        return
                    finally:
                        client.settimeout(None)
                    if not data:
                        return
                    buffer += data
                    end = buffer.find(b"\r\n\r\n")
                request = self.parser.parse(buffer[:end], base) if end >= 0 else None
                if request is None:
                    handoff = True  # an oversized or unusual head: gunicorn reads (or refuses) it
                    return
                result = gateway.handle(request.environ)
                if result is None:
                    handoff = True  # a control-plane path: Django, through gunicorn
                    return
                buffer = buffer[end + 4 :]
                if not self._respond(client, request, result):
                    return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except gevent.GreenletExit:
            pass
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
