"""gunicorn per-request shortcuts of gateway/gunicorn_response.py give exactly what stock gunicorn gives."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import message, wsgi
from gunicorn.http.errors import InvalidResponseHeader, InvalidResponseHeaderName

from gateway import gunicorn_response


def _config(**settings: Any) -> Config:
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def test_date_header_is_the_current_second_in_http_format() -> None:
    for _ in range(5):  # retried if the second turns over in between
        before = email.utils.formatdate(time.time(), usegmt=True)
        text = gunicorn_response.http_date()
        after = email.utils.formatdate(time.time(), usegmt=True)
        if before == after:
            assert text == before
            return
    pytest.fail("the clock kept crossing second boundaries")


def test_date_header_for_a_given_timestamp_is_gunicorns() -> None:
    assert gunicorn_response.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_each_request_gets_its_own_environ_with_gunicorns_keys_and_values() -> None:
    cfg = _config(errorlog="-", workers=2)
    first, second = gunicorn_response.base_environ(cfg), gunicorn_response.base_environ(cfg)
    stock = gunicorn_response._stock_base_environ(cfg)
    assert first is not second
    assert first.keys() == stock.keys()
    assert {k: v for k, v in first.items() if k != "wsgi.errors"} == {
        k: v for k, v in stock.items() if k != "wsgi.errors"
    }
    assert first["wsgi.errors"].streams == stock["wsgi.errors"].streams
    first["REQUEST_METHOD"] = "POST"  # one request's changes never reach the next
    assert "REQUEST_METHOD" not in gunicorn_response.base_environ(cfg)


def test_an_error_log_file_gets_a_fresh_errors_stream_per_request(tmp_path: Any) -> None:
    cfg = _config(errorlog=str(tmp_path / "error.log"))
    first, second = gunicorn_response.base_environ(cfg), gunicorn_response.base_environ(cfg)
    assert first["wsgi.errors"] is not second["wsgi.errors"]


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1,::1"),
        ("10.0.0.7", "127.0.0.1,::1"),
        ("10.0.0.7", "10.0.0.0/8"),
        ("::1", "127.0.0.1,::1"),
        ("not-an-ip", "127.0.0.1"),
        ("192.0.2.1", "*"),
    ],
)
def test_forwarded_allow_check_answers_as_gunicorn_does(peer: str, allowed: str) -> None:
    cfg = _config(forwarded_allow_ips=allowed)
    expected = message._ip_in_allow_list(peer, cfg.forwarded_allow_ips, cfg.forwarded_allow_networks())
    for _ in range(2):  # computed, then remembered
        assert (
            gunicorn_response.ip_in_allow_list(peer, cfg.forwarded_allow_ips, cfg.forwarded_allow_networks())
            == expected
        )


def _processed(response_class: type, headers: list[tuple[Any, Any]]) -> tuple[list[tuple[str, str]], int | None]:
    response = response_class(None, None, _config())
    response.process_headers(headers)
    return response.headers, response.response_length


HEADER_SETS: list[list[tuple[Any, Any]]] = [
    [("Content-Type", "application/json"), ("Content-Length", " 12 "), ("X-Cache", "HIT")],
    [("Content-Type", "text/plain"), ("Connection", "close"), ("Keep-Alive", "timeout=5"), ("Age", "3")],
    [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")],
    [("Upgrade", "h2c"), ("Content-Type", "text/plain")],
    [("Content-Type", "text/plain\t"), ("ETag", ' W/"1" '), ("X-Odd", "caf\xe9")],
    [("Server", "upstream/1.0"), ("Date", "Mon, 30 Nov 2026 19:05:35 GMT"), ("Content-Type", "text/plain")],
]


@pytest.mark.parametrize("headers", HEADER_SETS)
def test_headers_are_kept_dropped_and_trimmed_as_stock_gunicorn_does_the_first_time_and_after(
    headers: list[tuple[Any, Any]],
) -> None:
    stock = _processed(wsgi.Response, headers)
    for _ in range(3):  # the first time checks every name; later ones take the fast path
        for earlier in HEADER_SETS:
            _processed(gunicorn_response.CoalescingResponse, earlier)
        assert _processed(gunicorn_response.CoalescingResponse, headers) == stock


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([("Content-Type", "text/plain"), ("X-Cache", "HIT\r\nSet-Cookie: session=stolen")], InvalidResponseHeader),
        ([("Content-Type", "text/plain\n")], InvalidResponseHeader),
        ([("X-Cache", "a\x00b")], InvalidResponseHeader),
        ([("Content-Type", b"text/plain")], TypeError),
        ([("Bad Name", "x")], InvalidResponseHeaderName),
    ],
)
def test_a_header_gunicorn_refuses_is_refused_even_when_its_name_was_seen_before(
    headers: list[tuple[Any, Any]], error: type[Exception]
) -> None:
    _processed(gunicorn_response.CoalescingResponse, [("Content-Type", "text/plain"), ("X-Cache", "MISS")])
    with pytest.raises(error):
        _processed(wsgi.Response, headers)
    with pytest.raises(error):
        _processed(gunicorn_response.CoalescingResponse, headers)
