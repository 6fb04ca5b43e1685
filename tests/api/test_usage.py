"""GET /mgmt/v1/usage/: am_usage_records aggregated by minute, hour or day, filtered, empty buckets omitted."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Tenant
from apimgmt.usage import add_minute

pytestmark = pytest.mark.django_db

WINDOW = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"}


def record(tenant: str, api: str, consumer: str, key: str, at: str, code: int, count: int, latency: float) -> None:
    add_minute(
        tenant_id=tenant,
        api_id=api,
        consumer_id=consumer,
        key_id=key,
        timestamp=at,
        status_code=code,
        request_count=count,
        error_count=count if code >= 400 else 0,
        bytes_in=count,
        bytes_out=10 * count,
        latency_ms_sum=latency * count,
        latency_ms_max=latency,
    )


@pytest.fixture
def traffic(acme: Tenant, acme_api: Api, bob_app: Consumer, bob_key: tuple[ApiKey, str], alice: User) -> dict[str, str]:
    ops = services.consumer_create(tenant=acme, name="ops", actor=alice)
    ids = {"api": acme_api.pk, "bob": bob_app.pk, "ops": ops.pk, "key": bob_key[0].pk}
    record("acme", ids["api"], ids["bob"], ids["key"], "2026-01-01T10:01:00Z", 200, 10, 5.0)
    record("acme", ids["api"], ids["bob"], ids["key"], "2026-01-01T10:01:00Z", 429, 3, 1.0)
    record("acme", ids["api"], ids["bob"], ids["key"], "2026-01-01T10:59:00Z", 200, 7, 20.0)
    record("acme", ids["api"], ids["ops"], "", "2026-01-02T08:00:00Z", 500, 2, 100.0)
    return ids


def test_minute_buckets_omit_minutes_without_traffic(alice: User, traffic: dict[str, str], client_for: Any) -> None:
    r = client_for(alice).get(
        "/mgmt/v1/usage/", {"interval": "minute", "from": "2026-01-01T10:00:00Z", "to": "2026-01-01T11:00:00Z"}
    )
    results = r.json()["results"]
    assert [b["bucket"] for b in results] == ["2026-01-01T10:01:00Z", "2026-01-01T10:59:00Z"]
    assert results[0]["requests"] == 13 and results[0]["rate_limited"] == 3 and results[0]["errors"] == 3


def test_hour_and_day_buckets_sum_and_average(alice: User, traffic: dict[str, str], client_for: Any) -> None:
    c = client_for(alice)
    hours = c.get("/mgmt/v1/usage/", {"interval": "hour", **WINDOW}).json()["results"]
    assert [(b["bucket"], b["requests"]) for b in hours] == [("2026-01-01T10:00:00Z", 20), ("2026-01-02T08:00:00Z", 2)]
    assert hours[0]["latency_ms_avg"] == round((50 + 3 + 140) / 20, 3) and hours[0]["latency_ms_max"] == 20.0
    days = c.get("/mgmt/v1/usage/", {"interval": "day", **WINDOW}).json()["results"]
    assert [(b["bucket"], b["requests"], b["bytes_out"]) for b in days] == [
        ("2026-01-01T00:00:00Z", 20, 200),
        ("2026-01-02T00:00:00Z", 2, 20),
    ]


def test_filters_and_group_by(alice: User, traffic: dict[str, str], client_for: Any) -> None:
    c = client_for(alice)
    only_ops = c.get("/mgmt/v1/usage/", {"interval": "day", "consumer_id": traffic["ops"], **WINDOW}).json()["results"]
    assert [b["requests"] for b in only_ops] == [2]
    by_key = c.get("/mgmt/v1/usage/", {"interval": "day", "key_id": traffic["key"], **WINDOW}).json()["results"]
    assert [b["requests"] for b in by_key] == [20]
    grouped = c.get("/mgmt/v1/usage/", {"interval": "day", "group_by": "status_code", **WINDOW}).json()["results"]
    assert [(b["status_code"], b["requests"]) for b in grouped] == [(200, 17), (429, 3), (500, 2)]


def test_developer_sees_only_their_consumers_usage(bob: User, traffic: dict[str, str], client_for: Any) -> None:
    days = client_for(bob).get("/mgmt/v1/usage/", {"interval": "day", **WINDOW}).json()["results"]
    assert [b["requests"] for b in days] == [20]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"interval": "week"}, "interval"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"interval": "minute", "from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, "from"),
        ({"bogus": "1"}, "bogus"),
        ({"api_id": "x" * 200}, "api_id"),
    ],
)
def test_bad_usage_queries_name_the_parameter(params: dict[str, str], field: str, alice: User, client_for: Any) -> None:
    r = client_for(alice).get("/mgmt/v1/usage/", params)
    assert r.status_code == 400 and field in r.json()["errors"]
