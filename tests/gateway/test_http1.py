"""The lean HTTP/1.1 client behind body-less idempotent requests: framing, keep-alive reuse, broken upstreams."""

from __future__ import annotations

import socket
import threading
import time

from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import Answer, raw_upstream, read_request_head


def _api(acme, bob_app, url):
    api = publish(acme, url, retries=0)
    subscribe(bob_app, api)
    return api


def test_chunked_upstream_response_is_decoded_and_sent_on_with_the_same_bytes(gateway, acme, bob_app, key):
    def chunked(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        conn.close()

    with raw_upstream(chunked) as url:
        _api(acme, bob_app, url)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 200 and response.body == b"hello world"
    assert response.header("Transfer-Encoding") is None and response.header("X-Trailer") is None


def test_body_delimited_by_connection_close_is_passed_on_whole(gateway, acme, bob_app, key):
    def until_close(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 200_000)
        conn.close()

    with raw_upstream(until_close) as url:
        _api(acme, bob_app, url)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 200 and response.body == b"z" * 200_000


def test_keep_alive_connection_is_reused_and_a_stale_one_is_replaced_without_an_error(gateway, acme, bob_app, key):
    connections: list[int] = []
    lock = threading.Lock()

    def one_answer_then_close(conn: socket.socket) -> None:
        # Answers one request with keep-alive, then closes (as an upstream's idle timeout would).
        with lock:
            connections.append(1)
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_request_head(conn)  # the next request on this connection is never answered
        conn.close()

    with raw_upstream(one_answer_then_close) as url:
        _api(acme, bob_app, url)
        statuses = [gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert len(connections) >= 2  # the closed connection was replaced by a fresh one


def test_invalid_content_length_from_the_upstream_gives_502(gateway, acme, bob_app, key):
    def bad_length(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        conn.close()

    with raw_upstream(bad_length) as url:
        _api(acme, bob_app, url)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 502


def test_interim_103_answer_is_skipped(gateway, acme, bob_app, key):
    def early_hints(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        conn.close()

    with raw_upstream(early_hints) as url:
        _api(acme, bob_app, url)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 200 and response.body == b"ok"
    assert response.header("Link") is None


def test_head_answer_has_no_body_and_the_connection_stays_usable(gateway, acme, bob_app, key, upstream):
    upstream.respond = lambda seen: Answer(headers=[("Content-Length", "12")], body=b"")
    _api(acme, bob_app, upstream.url)
    head = gateway.request("HEAD", "/api/users/v1/x", headers={"X-API-Key": key})
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == "12"
    upstream.respond = lambda seen: Answer(body=b"after")
    assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).body == b"after"


def test_bytes_an_idle_upstream_sent_unasked_are_never_taken_as_the_next_answer(gateway, acme, bob_app, key):
    def answer_then_408(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # unasked, then idle close
        time.sleep(0.3)
        conn.close()

    with raw_upstream(answer_then_408) as url:
        _api(acme, bob_app, url)
        first = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
        time.sleep(0.1)
        second = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert (first.status, first.body) == (200, b"first")
    assert (second.status, second.body) == (200, b"first")  # a fresh connection, a real answer


def test_response_with_both_length_and_chunked_framing_is_passed_on_dechunked_without_the_length(
    gateway, acme, bob_app, key
):
    def both(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        conn.close()

    with raw_upstream(both) as url:
        _api(acme, bob_app, url)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 200 and response.body == b"abc"
    assert response.header("Content-Length") is None
