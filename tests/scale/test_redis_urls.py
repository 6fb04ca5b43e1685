"""REDIS_URL names a standalone Redis, a Sentinel-watched master or a Redis Cluster; a URL that cannot work stops
the start with a message that says what to write instead."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from apimgmt.redis_client import CLUSTER, SENTINEL, STANDALONE, cache_settings, parse_redis_url
from tests.support.settings_probe import run_python


def test_plain_redis_urls_keep_their_meaning() -> None:
    for url in ("redis://127.0.0.1:6379/3", "rediss://:secret@redis.internal:6380/0", "unix:///run/redis.sock?db=2"):
        assert parse_redis_url(url).kind == STANDALONE


def test_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    topology = parse_redis_url("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/mymaster/4")
    assert topology.kind == SENTINEL
    assert topology.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert topology.service_name == "mymaster"
    assert topology.db == 4
    assert parse_redis_url("redis+sentinel://s1:26379/mymaster").db == 0


def test_cluster_url_names_its_seed_nodes() -> None:
    topology = parse_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert topology.kind == CLUSTER
    assert topology.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:6379", "the scheme must be redis://"),
        ("redis+sentinel://s1:26379", "ends with /<service_name>"),
        ("redis+sentinel://s1:26379/mymaster/zero", "the database must be a number"),
        ("redis+sentinel://s1/mymaster", "host:port"),
        ("redis+sentinel://:pw@s1:26379/mymaster", "REDIS_PASSWORD"),
        ("redis+cluster://10.0.0.1:7000/3", "only database 0"),
        ("redis+cluster://10.0.0.1:notaport", "host:port"),
        ("redis+cluster://", "at least one host:port"),
        ("redis+cluster://10.0.0.1:7000?socket_timeout=5", "no query options"),
    ],
)
def test_a_url_that_cannot_work_is_refused_with_what_to_fix(url: str, says: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL") as refused:
        parse_redis_url(url)
    assert says in str(refused.value)


def test_the_refusal_never_repeats_a_password() -> None:
    with pytest.raises(ImproperlyConfigured) as refused:
        parse_redis_url("redis+sentinel://:hunter2-secret@s1:26379/mymaster")
    assert "hunter2-secret" not in str(refused.value)


def test_the_django_cache_follows_the_topology() -> None:
    sentinel = cache_settings(
        "redis+sentinel://s1:26379,s2:26379/mymaster/2",
        ttl=300,
        connect_timeout=0.25,
        socket_timeout=1.0,
        password="pw",
        sentinel_password=None,
    )
    assert sentinel["LOCATION"] == "redis://mymaster/2"
    assert sentinel["OPTIONS"]["CLIENT_CLASS"] == "django_redis.client.SentinelClient"
    assert sentinel["OPTIONS"]["SENTINELS"] == [("s1", 26379), ("s2", 26379)]
    cluster = cache_settings(
        "redis+cluster://n1:7000,n2:7001",
        ttl=300,
        connect_timeout=0.25,
        socket_timeout=1.0,
        password=None,
        sentinel_password=None,
    )
    # A list, or django-redis would take "n2:7001" for a replica of "redis+cluster://n1:7000".
    assert cluster["LOCATION"] == ["redis+cluster://n1:7000,n2:7001"]
    assert cluster["OPTIONS"]["CONNECTION_FACTORY"] == "apimgmt.redis_cache.ClusterConnectionFactory"


def test_a_process_with_a_bad_redis_url_does_not_start() -> None:
    result = run_python(
        "import django; django.setup()",
        {"REDIS_URL": "redis+sentinel://s1:26379", "DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "ends with /<service_name>" in result.stderr
