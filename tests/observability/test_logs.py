"""Control-plane logs: one JSON line per request, the request id on every line, slow queries named, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client

from apimgmt.context import request_id_var
from apimgmt.logs import JsonFormatter, RequestIdFilter
from tests.support.secrets_scan import find_secrets


class JsonLines:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["logger"] == "apimgmt.access"]


@pytest.fixture
def json_log() -> Iterator[JsonLines]:
    """The lines the production console handler would write (same formatter and filter), at DEBUG."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield JsonLines(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_every_response_carries_a_request_id_and_keeps_a_valid_incoming_one(db: Any, client: Client) -> None:
    outside = request_id_var.get()
    fresh = client.get("/health")
    kept = client.get("/health", HTTP_X_REQUEST_ID="req-from-upstream-123")
    replaced = client.get("/health", HTTP_X_REQUEST_ID="bad id\nwith newline")

    assert len(fresh["X-Request-ID"]) == 32
    assert kept["X-Request-ID"] == "req-from-upstream-123"
    assert replaced["X-Request-ID"] != "bad id\nwith newline" and len(replaced["X-Request-ID"]) == 32
    assert request_id_var.get() == outside, "the request id does not outlive its request"


def test_one_json_access_line_per_request_with_the_route_template(
    json_log: JsonLines, client: Client, staff: User
) -> None:
    client.force_login(staff)
    response = client.get("/admin/apimgmt/", HTTP_X_REQUEST_ID="req-admin-0001")

    (line,) = json_log.access()
    assert line["request_id"] == "req-admin-0001" == response["X-Request-ID"]
    assert line["method"] == "GET" and line["status"] == 200
    assert line["path"].startswith("/admin/") and "<" in line["path"], "a template, not the raw path"
    assert line["duration_ms"] > 0 and line["user_id"] == staff.pk
    assert line["level"] == "INFO" and line["message"] == "request"


def test_unknown_paths_are_logged_without_the_raw_path(json_log: JsonLines, client: Client, db: Any) -> None:
    client.get("/no/such/page/amt_reset_token_value")

    (line,) = json_log.access()
    assert line["status"] == 404 and line["path"] == "<unmatched>"
    assert "amt_reset_token_value" not in json_log.stream.getvalue()


def test_probes_write_nothing_at_info_level_on_success(json_log: JsonLines, client: Client, db: Any) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200

    assert json_log.records, "they do log, at debug level"
    assert all(r["level"] == "DEBUG" for r in json_log.records), json_log.records


def test_every_line_written_while_serving_carries_the_request_id(
    json_log: JsonLines, client: Client, staff: User, settings: Any
) -> None:
    settings.SLOW_QUERY_MS = 0  # every query is "slow": lines from deep inside the request
    client.force_login(staff)
    json_log.stream.truncate(0)
    json_log.stream.seek(0)
    client.get("/admin/apimgmt/", HTTP_X_REQUEST_ID="req-every-line-01")

    during = [r for r in json_log.records if r["logger"] in ("apimgmt.db", "apimgmt.access")]
    assert len(during) > 2
    assert {r.get("request_id") for r in during} == {"req-every-line-01"}


def test_slow_queries_are_logged_with_their_duration_but_not_their_parameters(
    json_log: JsonLines, db: Any, settings: Any
) -> None:
    settings.SLOW_QUERY_MS = 50
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 WHERE %s = %s", ["ak_live_fast", "x"])
        cursor.execute("SELECT pg_sleep(0.08), %s", ["ak_live_secretsecretsecret"])

    slow = [r for r in json_log.records if r["logger"] == "apimgmt.db"]
    assert len(slow) == 1
    assert "slow query" in slow[0]["message"] and slow[0]["level"] == "WARNING"
    assert slow[0]["duration_ms"] >= 50 and "pg_sleep" in slow[0]["sql"]
    assert "secret" not in json_log.stream.getvalue()


def test_the_secret_scanner_recognises_what_must_never_be_logged() -> None:
    # The suite-wide scan (tests/conftest.py) is only as good as its patterns.
    assert find_secrets('{"headers": {"Authorization": "Token amt_0123456789abcdefghijklmnop"}}')
    assert find_secrets("key=ak_live_" + "a" * 38)
    assert find_secrets('{"password": "hunter2"}')
    assert find_secrets("alice-password-123")
    assert not find_secrets('{"key_prefix": "ak_live_Ab3x", "path": "/api/users/v1"}')
