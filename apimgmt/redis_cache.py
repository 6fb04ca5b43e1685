"""The Django cache on Redis Cluster: django-redis has no cluster client, so it gets a RedisCluster from here.

settings.py selects these for a ``redis+cluster://`` REDIS_URL (see apimgmt.redis_client.cache_settings). The
portal's lock-outs and throttles count in this cache, so they live on the cluster like everything else.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import ImproperlyConfigured
from django_redis.client.default import DefaultClient
from django_redis.pool import ConnectionFactory

from apimgmt.redis_client import CLUSTER, RedisClient, make_client, parse_redis_url


class ClusterConnectionFactory(ConnectionFactory):
    """django-redis CONNECTION_FACTORY for a redis+cluster:// LOCATION: one RedisCluster with the short timeouts."""

    def connect(self, url: str) -> RedisClient:
        topology = parse_redis_url(url)
        if topology.kind != CLUSTER:
            raise ImproperlyConfigured("ClusterConnectionFactory needs a redis+cluster:// LOCATION.")
        return make_client(topology)

    def disconnect(self, connection: RedisClient) -> None:
        connection.close()


class ClusterCacheClient(DefaultClient):
    """django-redis client for a cluster: the calls that take many keys go key by key (the keys lie in many slots)."""

    def get_many(self, keys: Any, version: Any = None, client: Any = None) -> dict[Any, Any]:
        found: dict[Any, Any] = {}
        for key in keys:
            value = self.get(key, version=version, client=client)
            if value is not None:
                found[key] = value
        return found

    def set_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None, client: Any = None
    ) -> None:
        for key, value in data.items():
            self.set(key, value, timeout, version=version, client=client)

    def delete_many(self, keys: Any, version: Any = None, client: Any = None) -> int:
        return sum(int(bool(self.delete(key, version=version, client=client))) for key in keys)
