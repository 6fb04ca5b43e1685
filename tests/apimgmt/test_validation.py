"""Validation messages say what to fix: base paths, upstream URLs, policy configs."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from apimgmt import validation


@pytest.mark.parametrize("path", ["/api/users/v1", "/v1", "/a-b_c.d~e", "/api/v1.2"])
def test_good_base_paths_pass(path: str) -> None:
    assert validation.validate_base_path(path) == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("api/v1", "must start with '/'"),
        ("/", "whole site"),
        ("/api/", "must not end with '/'"),
        ("/api//v1", "empty segments"),
        ("/api/../admin", "'.' or '..'"),
        ("/api/./v1", "'.' or '..'"),
        ("/api/%2e%2e", "not allowed"),
        ("/api/v1?x=1", "not allowed"),
        ("/api/v 1", "not allowed"),
        ("/api\\v1", "not allowed"),
        ("/admin", "reserved prefix"),
        ("/admin/x", "reserved prefix"),
        ("/mgmt/v1", "reserved prefix"),
        ("/portal", "reserved prefix"),
        ("/static/x", "reserved prefix"),
        ("/health", "reserved prefix"),
        ("/ready", "reserved prefix"),
        ("/metrics", "reserved prefix"),
        ("/" + "a" * 200, "at most 200"),
    ],
)
def test_bad_base_paths_are_refused_with_a_reason(path: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validation.validate_base_path(path)
    assert message in exc.value.messages[0]


def test_reserved_words_only_block_whole_segments() -> None:
    assert validation.validate_base_path("/healthz") == "/healthz"
    assert validation.validate_base_path("/api/admin") == "/api/admin"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com", "http:// or https://"),
        ("http://", "must name a host"),
        ("http://user:pw@example.com", "user name or password"),
        ("http://example.com/?a=1", "query string"),
        ("http://example.com/#x", "query string or fragment"),
        ("http://example.com/a/../b", "'.' or '..'"),
        ("http://127.0.0.1:8000", "loopback, private"),
        ("http://localhost", "loopback, private"),
        ("http://10.1.2.3", "loopback, private"),
        ("http://192.168.0.1", "loopback, private"),
        ("http://169.254.169.254/latest/meta-data", "loopback, private"),
        ("http://[::1]/", "loopback, private"),
        ("http://[::ffff:127.0.0.1]/", "loopback, private"),
        ("http://metadata.google.internal/", "loopback, private"),
        ("http://2130706433/", "loopback, private"),
        ("http://100.64.0.1/", "loopback, private"),
        ("http://0.0.0.0/", "loopback, private"),
        ("http://example.com:99999", "Port out of range"),
    ],
)
@override_settings(UPSTREAM_ALLOW_PRIVATE=False)
def test_bad_upstream_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validation.validate_upstream_url(url)
    assert message in exc.value.messages[0]


@pytest.mark.parametrize(
    "host",
    [
        "[64:ff9b::7f00:1]",  # NAT64 (RFC 6052) of 127.0.0.1
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "[::7f00:1]",  # IPv4-compatible 127.0.0.1
        "[::ffff:0:7f00:1]",  # IPv4-translated 127.0.0.1
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of the cloud metadata address
        "[2002:a00:1::1]",  # 6to4 of 10.0.0.1
        "[64:ff9b:1::a00:1]",  # NAT64 local-use prefix (RFC 8215)
    ],
)
@override_settings(UPSTREAM_ALLOW_PRIVATE=False)
def test_ipv6_forms_that_embed_a_private_ipv4_address_are_refused(host: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validation.validate_upstream_url(f"http://{host}:8080/v1")
    assert "loopback, private" in exc.value.messages[0]


@override_settings(UPSTREAM_ALLOW_PRIVATE=False)
def test_public_upstreams_pass() -> None:
    assert validation.validate_upstream_url("https://93.184.216.34/v1") == "https://93.184.216.34/v1"
    for host in ("[64:ff9b::5db8:d822]", "[2002:5db8:d822::1]", "[2606:4700:4700::1111]"):  # 93.184.216.34 within
        assert validation.validate_upstream_url(f"https://{host}/v1") == f"https://{host}/v1"


@override_settings(UPSTREAM_ALLOW_PRIVATE=True)
def test_private_upstreams_pass_when_allowed() -> None:
    assert validation.validate_upstream_url("http://127.0.0.1:8081") == "http://127.0.0.1:8081"


def test_the_operations_guide_policy_is_accepted_as_written() -> None:
    config = {"requests_per_minute": 1000, "burst_size": 100, "key_extraction": "consumer_id", "window_type": "sliding"}
    assert validation.validate_policy_config("rate_limiting", config) == config


@pytest.mark.parametrize(
    ("policy_type", "config", "message"),
    [
        ("rate_limiting", {"requests_per_minute": 0}, "requests_per_minute must be a positive integer"),
        ("rate_limiting", {"requests_per_minute": "10"}, "requests_per_minute must be a positive integer"),
        ("rate_limiting", {"requests_per_minute": True}, "requests_per_minute must be a positive integer"),
        ("rate_limiting", {"requests_per_hour": 1.5}, "requests_per_hour must be a positive integer"),
        ("rate_limiting", {}, "needs at least one of"),
        ("rate_limiting", {"requests_per_minute": 5, "burst_size": -1}, "burst_size must be a non-negative integer"),
        ("rate_limiting", {"requests_per_minute": 5, "key_extraction": "user"}, "key_extraction must be one of"),
        ("rate_limiting", {"requests_per_minute": 5, "window_type": "rolling"}, "window_type must be"),
        (
            "rate_limiting",
            {"requests_per_minute": 5, "window_type": "fixed", "burst_size": 3},
            "burst_size only applies",
        ),
        ("rate_limiting", {"requests_per_minute": 5, "rpm": 3}, "unknown config field(s) for rate_limiting: rpm;"),
        (
            "rate_limiting",
            {"requests_per_minute": 5, "burst": 3},
            "unknown config field(s) for rate_limiting: burst (did you mean `burst_size`?);",
        ),
        (
            "rate_limiting",
            {"requests_per_minut": 5},
            "needs at least one of requests_per_second, requests_per_minute, requests_per_hour, requests_per_day; "
            "unknown config field(s): requests_per_minut (did you mean `requests_per_minute`?).",
        ),
        (
            "quota",
            {"requests_per_mont": 5},
            "quota config needs requests_per_day and/or requests_per_month; unknown config field(s): "
            "requests_per_mont (did you mean `requests_per_month`?).",
        ),
        ("quota", {"requests_per_minute": 5}, "quota config needs"),
        ("quota", {"requests_per_month": -5}, "requests_per_month must be a positive integer"),
        ("quota", {"requests_per_day": 10, "burst_size": 1}, "unknown config field(s) for quota: burst_size"),
        ("caching", {"ttl": 5}, "policy_type must be one of rate_limiting, quota, cors"),
        ("rate_limiting", [1, 2], "config must be a JSON object"),
    ],
)
def test_bad_policy_configs_name_the_field(policy_type: str, config: object, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validation.validate_policy_config(policy_type, config)
    assert message in exc.value.messages[0]
