"""The exported metrics carry django-prometheus's database and cache metrics, not only the gateway's."""

from __future__ import annotations

from django.core.cache import cache
from django.db import connection
from django.test import Client
from prometheus_client import generate_latest


def test_database_and_cache_metrics_are_exported(client: Client, db: object) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    cache.get("anything")
    client.get("/health")
    # The registry the metrics listener exports (gunicorn.conf.py sums every worker's copy of it).
    body = generate_latest().decode()
    assert "django_db_execute_total" in body
    assert (
        "django_http_requests_total_by_method_total" in body or "django_http_requests_before_middlewares_total" in body
    )
    if connection.vendor == "postgresql":
        assert 'vendor="postgresql"' in body
    assert "django_cache_get_total" in body
