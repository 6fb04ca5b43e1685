"""The gunicorn worker's lean path (gateway/gunicorn_worker.py): the same environ and answers as stock gunicorn,
and every request it is not sure of handed to gunicorn with the bytes already read."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.errors import InvalidSchemeHeaders, LimitRequestLine
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.base_async import AsyncWorker

from gateway.gunicorn_worker import GatewayWorker, LeanParser, connection_environ
from gateway.wsgi import GatewayApplication, reset_gateway
from tests.gateway.upstreams import Answer

PEER = ("10.1.2.3", 50123)
SERVER = ("127.0.0.1", 8000)
KEY = "ak_live_" + "A" * 38

ACCEPTED = [
    b"GET /api/users/v1/x HTTP/1.1\r\nHost: gw.example\r\nX-API-Key: " + KEY.encode(),
    b"GET /api/users/v1/x?a=1&b=%20two&c HTTP/1.1\r\nHost: gw.example:8080\r\nAccept: */*",
    b"HEAD /api/users/v1/%7Euser/..%2f HTTP/1.1\r\nHost: h",
    b"DELETE /a/b;c=d HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + KEY.encode(),
    b"OPTIONS /x HTTP/1.1\r\nHost: h\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: PUT",
    b"GET /x HTTP/1.0\r\nHost: h",
    b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive",
    b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close",
    b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, X-Custom",
    b"GET /x HTTP/1.1\r\nhost: h\r\nx-mixed-CASE: v",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-Spaces:   padded value \t ",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-Tab: a\tb",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-Empty:",
    b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Type: application/json",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-Request-ID: abc-123-def\r\nUser-Agent: wrk/4",
    b"GET /x HTTP/1.1",
]

REFUSED = {
    "a body": b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2",
    "content-length on GET": b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0",
    "chunked": b"GET /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked",
    "expect": b"GET /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue",
    "upgrade": b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
    "te": b"GET /x HTTP/1.1\r\nHost: h\r\nTE: trailers",
    "underscore in a name": b"GET /x HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 1.2.3.4",
    "repeated field": b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2",
    "repeated host": b"GET /x HTTP/1.1\r\nHost: h\r\nHost: evil",
    "repeated content-type": b"GET /x HTTP/1.1\r\nContent-Type: a\r\nContent-Type: b",
    "obsolete line folding": b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2",
    "space before colon": b"GET /x HTTP/1.1\r\nHost : h",
    "non-ascii value": b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: caf\xc3\xa9",
    "control byte in value": b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\x00b",
    "bare LF": b"GET /x HTTP/1.1\nHost: h",
    "fragment": b"GET /x#frag HTTP/1.1\r\nHost: h",
    "absolute form": b"GET http://h/x HTTP/1.1\r\nHost: h",
    "asterisk form": b"OPTIONS * HTTP/1.1\r\nHost: h",
    "non-ascii target": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: h",
    "lower-case method": b"get /x HTTP/1.1\r\nHost: h",
    "other method": b"PATCH /x HTTP/1.1\r\nHost: h",
    "HTTP/2.0": b"GET /x HTTP/2.0\r\nHost: h",
    "leading empty line": b"\r\nGET /x HTTP/1.1\r\nHost: h",
    "long request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h",
    "too many fields": b"GET /x HTTP/1.1\r\n" + b"\r\n".join(b"X-%d: v" % i for i in range(101)),
    # gunicorn counts a field's CRLF against limit_request_field_size (8190): 8189 bytes + CRLF is too long.
    "field one byte over the limit": b"GET /x HTTP/1.1\r\nX-Big: " + b"v" * (8189 - len(b"X-Big: ")),
}


def _cfg(**settings: Any) -> Config:
    cfg = Config()
    # The production limits (gunicorn.conf.py).
    for name, value in {"limit_request_line": 8190, "limit_request_fields": 100, "workers": 2, **settings}.items():
        cfg.set(name, value)
    return cfg


def _stock(raw_head: bytes, cfg: Config) -> tuple[dict[str, Any], bool]:
    req = Request(cfg, IterUnreader([raw_head + b"\r\n\r\n"]), PEER)
    _resp, environ = gunicorn_wsgi.create(req, None, PEER, SERVER, cfg)
    environ["wsgi.multithread"] = True  # as gunicorn's async workers set it (base_async.handle_request)
    return environ, req.should_close()


_OBJECTS = {"wsgi.input", "wsgi.errors", "gunicorn.socket", "wsgi.early_hints", "wsgi.file_wrapper"}


@pytest.mark.parametrize("raw", ACCEPTED, ids=[r.split(b"\r\n")[0].decode()[:40] for r in ACCEPTED])
def test_lean_environ_is_the_environ_gunicorn_builds(raw: bytes) -> None:
    cfg = _cfg()
    lean = LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER))
    assert lean is not None, "a plainly well-formed request must take the lean path"
    stock, stock_close = _stock(raw, cfg)
    assert {k: v for k, v in lean.environ.items() if k not in _OBJECTS} == {
        k: v for k, v in stock.items() if k not in _OBJECTS
    }
    assert lean.should_close() == stock_close
    assert lean.environ["wsgi.input"].read() == b""


@pytest.mark.parametrize("raw", list(REFUSED.values()), ids=list(REFUSED))
def test_anything_not_plainly_simple_is_left_to_gunicorn(raw: bytes) -> None:
    cfg = _cfg()
    assert LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER)) is None


def test_the_largest_field_gunicorn_accepts_takes_the_lean_path() -> None:
    cfg = _cfg()
    raw = b"GET /x HTTP/1.1\r\nX-Big: " + b"v" * (8188 - len(b"X-Big: "))
    assert LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER)) is not None
    _stock(raw, cfg)  # and gunicorn accepts it too


@pytest.mark.parametrize(
    ("limits", "line_length", "accepted"),
    [
        ({"limit_request_line": 20000}, 10_000, False),  # gunicorn caps the request line at 8190
        ({"limit_request_line": 0}, 10_000, True),  # 0: no limit
        ({"limit_request_line": 100}, 101, False),
        ({"limit_request_line": 100}, 100, True),
    ],
)
def test_request_line_limits_are_read_as_gunicorn_reads_them(limits: Any, line_length: int, accepted: bool) -> None:
    cfg = _cfg(**limits)
    raw = b"GET /" + b"a" * (line_length - len(b"GET / HTTP/1.1")) + b" HTTP/1.1\r\nHost: h"
    assert len(raw.split(b"\r\n")[0]) == line_length
    assert (LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER)) is not None) is accepted
    if accepted:
        _stock(raw, cfg)
    else:
        with pytest.raises(LimitRequestLine):
            _stock(raw, cfg)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted proxy", "untrusted peer"])
@pytest.mark.parametrize(
    "headers",
    [b"X-Forwarded-Proto: https", b"X-Forwarded-Proto: http", b"X-Forwarded-Ssl: on\r\nX-Forwarded-Proto: https"],
)
def test_secure_scheme_headers_count_only_from_trusted_proxies_as_in_gunicorn(trusted: bool, headers: bytes) -> None:
    cfg = _cfg(forwarded_allow_ips="10.1.2.3" if trusted else "127.0.0.1")
    raw = b"GET /x HTTP/1.1\r\nHost: h\r\n" + headers
    lean = LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER), trusted)
    assert lean is not None
    stock, _close = _stock(raw, cfg)
    assert lean.environ["wsgi.url_scheme"] == stock["wsgi.url_scheme"]
    assert lean.environ["HTTP_X_FORWARDED_PROTO"] == stock["HTTP_X_FORWARDED_PROTO"]
    if trusted and headers == b"X-Forwarded-Proto: https":
        assert lean.environ["wsgi.url_scheme"] == "https"
    if not trusted:
        assert lean.environ["wsgi.url_scheme"] == "http"


def test_disagreeing_scheme_headers_from_a_trusted_proxy_go_to_gunicorn() -> None:
    cfg = _cfg(forwarded_allow_ips="10.1.2.3")
    raw = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off"
    assert LeanParser(cfg).parse(raw, connection_environ(cfg, None, PEER, SERVER), True) is None
    with pytest.raises(InvalidSchemeHeaders):
        _stock(raw, cfg)


# -- the worker on a real socket, the gateway in-process ----------------------------------------------------------


class _Listener:
    def getsockname(self) -> tuple[str, int]:
        return SERVER


@pytest.fixture
def worker(db: Any) -> Iterator[GatewayWorker]:
    reset_gateway()
    cfg = _cfg(keepalive=2)
    w = GatewayWorker.__new__(GatewayWorker)
    w.cfg = cfg
    w.log = Logger(cfg)
    w.wsgi = GatewayApplication(get_wsgi_application())
    w.alive = True
    w.nr = 0
    w.max_requests = sys.maxsize
    # Requests that reach Django keep the test's transaction (like Django's test client).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield w
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
        reset_gateway()


@pytest.fixture
def handoffs(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The first bytes gunicorn's own loop read on each connection the lean path handed over."""
    seen: list[bytes] = []
    stock = AsyncWorker.handle

    def observed(self: Any, listener: Any, client: Any, addr: Any) -> None:
        seen.append(getattr(client, "_data", b""))
        stock(self, listener, client, addr)

    monkeypatch.setattr(AsyncWorker, "handle", observed)
    return seen


def _exchange(worker: GatewayWorker, data: bytes, *, close_write: bool = True) -> bytes:
    """Send ``data`` on a fresh connection, let the worker serve it, and return everything it answered."""
    ours, theirs = socket.socketpair()
    ours.sendall(data)
    if close_write:
        ours.shutdown(socket.SHUT_WR)
    worker.handle(_Listener(), theirs, PEER)
    ours.settimeout(5)
    chunks = []
    while chunk := ours.recv(65536):
        chunks.append(chunk)
    ours.close()
    return b"".join(chunks)


def _statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def test_keep_alive_and_pipelined_requests_are_answered_in_order_on_the_lean_path(
    worker, handoffs, users_api, upstream, key
) -> None:
    request = b"GET /api/users/v1/item/%d HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    answer = _exchange(worker, b"".join(request % i for i in range(3)))
    assert _statuses(answer) == [200, 200, 200]
    assert upstream.paths == ["/svc/item/0", "/svc/item/1", "/svc/item/2"]
    assert all(s.headers.get("x-api-key") is None for s in upstream.seen)
    assert handoffs == []  # all three took the lean path
    assert answer.count(b"X-Request-ID: ") == 3
    assert b"Connection: close" not in answer


def test_http_1_0_and_connection_close_end_the_connection_after_the_answer(
    worker, handoffs, users_api, upstream, key
) -> None:
    for head in (b"GET /api/users/v1/a HTTP/1.0", b"GET /api/users/v1/a HTTP/1.1\r\nConnection: close"):
        second = b"GET /api/users/v1/b HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
        answer = _exchange(worker, head + b"\r\nX-API-Key: " + key.encode() + b"\r\n\r\n" + second)
        assert _statuses(answer) == [200]  # the second request is never read
        assert b"Connection: close" in answer
    assert handoffs == []


def test_head_answers_without_a_body_and_keeps_the_connection(worker, users_api, upstream, key) -> None:
    upstream.respond = lambda seen: Answer(body=b"x" * 50)
    head = b"HEAD /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    get = b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    answer = _exchange(worker, head + get)
    assert _statuses(answer) == [200, 200]
    assert answer.endswith(b"\r\n\r\n" + b"x" * 50)
    assert answer.count(b"x" * 50) == 1


def test_a_control_plane_request_mid_connection_is_handed_to_gunicorn_and_django(
    worker, handoffs, users_api, upstream, key
) -> None:
    api = b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    health = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = _exchange(worker, api + health + api)
    assert _statuses(answer) == [200, 200, 200]
    assert len(handoffs) == 1 and handoffs[0].startswith(b"GET /health ")  # nothing read was lost
    assert len(upstream.seen) == 2


def test_a_request_with_a_body_is_served_by_gunicorn_with_its_body(worker, handoffs, users_api, upstream, key) -> None:
    post = b"POST /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\nContent-Length: 11\r\n\r\nhello world"
    answer = _exchange(worker, post)
    assert _statuses(answer) == [200]
    assert upstream.seen[0].body == b"hello world"
    assert len(handoffs) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/users/v1/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /api/users/v1/a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /api/users/v1/a HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
    ],
    ids=["repeated host", "content-length with chunked", "obsolete folding"],
)
def test_malformed_requests_get_gunicorns_400_and_never_reach_the_upstream(
    worker, handoffs, users_api, upstream, key, raw
) -> None:
    answer = _exchange(worker, raw)
    assert _statuses(answer) == [400]
    assert upstream.seen == []
    assert len(handoffs) == 1


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(worker, users_api, upstream, key) -> None:
    ours, theirs = socket.socketpair()
    ours.sendall(b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n")
    started = time.monotonic()
    worker.handle(_Listener(), theirs, PEER)  # keepalive=2: returns once the client stays silent that long
    elapsed = time.monotonic() - started
    ours.settimeout(1)
    answer = ours.recv(65536)
    assert _statuses(answer) == [200]
    assert ours.recv(65536) == b""  # closed by the worker
    assert 1.9 <= elapsed < 4
    ours.close()


def test_a_worker_past_max_requests_says_connection_close_and_stops(worker, users_api, upstream, key) -> None:
    worker.max_requests = 1
    request = b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    answer = _exchange(worker, request * 2)
    assert _statuses(answer) == [200]
    assert b"Connection: close" in answer
    assert worker.alive is False


def test_another_wsgi_app_under_this_worker_is_served_by_gunicorn_alone(worker, handoffs) -> None:
    # gunicorn.conf.py is read by every gunicorn started from the project directory (the demo's echo upstream too).
    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]

    worker.wsgi = hello
    answer = _exchange(worker, b"GET /api/users/v1/a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert _statuses(answer) == [200] and answer.endswith(b"hello")
    assert worker.lean is False
    assert len(handoffs) == 1


def test_a_slow_head_gets_the_keepalive_timeout_for_the_whole_head_not_per_read(worker, users_api, key) -> None:
    # A client trickling one byte at a time must not hold the connection past the keep-alive timeout (2 s here).
    ours, theirs = socket.socketpair()
    request = b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    stop = threading.Event()

    def trickle() -> None:
        for byte in request:
            if stop.wait(0.3):
                return
            try:
                ours.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    started = time.monotonic()
    worker.handle(_Listener(), theirs, PEER)
    elapsed = time.monotonic() - started
    stop.set()
    sender.join()
    assert 1.9 <= elapsed < 5  # the trickle alone would take 20 s (room for a loaded machine)
    ours.settimeout(1)
    assert ours.recv(65536) == b""  # closed without an answer, as gunicorn does
    ours.close()


def test_a_head_with_bare_line_feeds_is_refused_at_once(worker, handoffs, users_api, upstream) -> None:
    ours, theirs = socket.socketpair()
    ours.sendall(b"GET /api/users/v1/a HTTP/1.1\nHost: h\n\n")  # the connection stays open
    started = time.monotonic()
    worker.handle(_Listener(), theirs, PEER)
    assert time.monotonic() - started < 1  # not after the keep-alive timeout (2 s)
    ours.settimeout(1)
    assert _statuses(ours.recv(65536)) == [400]
    assert upstream.seen == [] and len(handoffs) == 1
    ours.close()


def test_a_worker_on_its_way_out_still_answers_the_request_in_hand(worker, users_api, upstream, key) -> None:
    worker.alive = False  # e.g. SIGTERM arrived, or max_requests reached on another connection
    request = b"GET /api/users/v1/a HTTP/1.1\r\nX-API-Key: " + key.encode() + b"\r\n\r\n"
    answer = _exchange(worker, request * 2)
    assert _statuses(answer) == [200]  # answered, then the connection closes
    assert b"Connection: close" in answer
