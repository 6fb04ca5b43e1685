"""gunicorn per-request shortcuts of gateway/gunicorn_response.py give exactly what stock gunicorn gives."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import message

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
