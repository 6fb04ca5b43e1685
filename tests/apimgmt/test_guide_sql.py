"""The operations guide's SQL runs as written on the migrated PostgreSQL schema."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apimgmt.models import ApiKey, Consumer, Tenant, UsageRecord

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the guide's SQL is PostgreSQL")


def _run(sql: str) -> list[tuple[object, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description else []


def test_key_lookup_by_prefix(bob_app: Consumer) -> None:
    ApiKey.objects.create(consumer=bob_app, key_prefix="ak_live_1234", key_hash="f" * 64)
    rows = _run("SELECT key_id, key_prefix, active, expires_at FROM am_api_keys WHERE key_prefix = 'ak_live_1234';")
    assert len(rows) == 1 and rows[0][1] == "ak_live_1234" and rows[0][2] is True


def test_update_expired_key(bob_app: Consumer) -> None:
    ApiKey.objects.create(
        key_id="key_123",
        consumer=bob_app,
        key_prefix="ak_live_abcd",
        key_hash="e" * 64,
        expires_at=timezone.now() - timedelta(days=1),
    )
    _run(
        "UPDATE am_api_keys SET expires_at = '2026-12-31 23:59:59+00' WHERE key_id = 'key_123' AND expires_at < NOW();"
    )
    assert ApiKey.objects.get(key_id="key_123").expires_at.year == 2026


def test_explain_analyze_apis_by_tenant(acme_api: object) -> None:
    plan = _run("EXPLAIN ANALYZE SELECT * FROM am_apis WHERE tenant_id = 'xxx';")
    assert plan and "Execution Time" in plan[-1][0]


def test_usage_by_tenant_newest_first(acme: Tenant) -> None:
    now = timezone.now().replace(second=0, microsecond=0)
    for minutes in (3, 1, 2):
        UsageRecord.objects.create(
            tenant=acme, timestamp=now - timedelta(minutes=minutes), status_code=200, request_count=1
        )
    rows = _run(
        "SELECT timestamp FROM am_usage_records WHERE tenant_id = 'acme' ORDER BY timestamp DESC LIMIT 100 OFFSET 0;"
    )
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True) and len(rows) == 3


def test_the_guides_indexes_exist(db: object) -> None:
    rows = _run("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
    defs = {name: definition for name, definition in rows}
    assert '(tenant_id, "timestamp" DESC)' in defs["idx_usage_records_tenant_time"]
    assert (
        "WHERE active" in defs["idx_api_keys_consumer_active"]
        and "(consumer_id)" in defs["idx_api_keys_consumer_active"]
    )
    assert "(tenant_id, status)" in defs["idx_apis_tenant_status"]
    assert "UNIQUE" in next(d for n, d in rows if "key_hash" in d and "am_api_keys" in d and "UNIQUE" in d)
