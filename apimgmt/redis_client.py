"""The one Redis client of a process (short timeouts), for standalone Redis, Sentinel or Redis Cluster by URL.

``REDIS_URL`` takes three forms (parsed by :func:`parse_redis_url`, refused at start with ImproperlyConfigured):

- ``redis://`` / ``rediss://`` / ``unix://``: one Redis server, as redis-py reads the URL;
- ``redis+sentinel://host:port[,host:port…]/<service_name>[/<db>]``: the master the sentinels elect for
  ``service_name``; every connection asks the sentinels again after a failure, so a promoted replica is
  followed without a restart;
- ``redis+cluster://host:port[,host:port…]``: a Redis Cluster, reached through these seed nodes.

Sentinel and cluster nodes take their password from ``REDIS_PASSWORD`` (sentinels from
``REDIS_SENTINEL_PASSWORD`` when they have one). Every caller that sends several keys in one call (a script,
a pipeline, MULTI) builds them with one hash tag, so a call never spans two cluster slots.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

logger = logging.getLogger(__name__)


def tenant_tag(prefix: str, tenant: str) -> str:
    """``<prefix>:{<tenant>}``: the start of every per-tenant key. The tenant is the hash tag, so all of one tenant's
    keys share a Redis Cluster slot and one script or pipelined write may touch any of them."""
    return f"{prefix}:{{{tenant}}}"


def hash_tag(key: str) -> str:
    """The part of a key that picks its Redis Cluster slot: between the first "{" and the next "}" (when not
    empty), else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if end > start + 1 else key


STANDALONE, SENTINEL, CLUSTER = "standalone", "sentinel", "cluster"
_SCHEMES = {
    "redis": STANDALONE,
    "rediss": STANDALONE,
    "unix": STANDALONE,
    "redis+sentinel": SENTINEL,
    "redis+cluster": CLUSTER,
}
# After a cluster could not be reached at all, wait this long before trying to build its client again: every
# request would otherwise pay the seed nodes' connect timeouts.
CLUSTER_RETRY_SECONDS = 1.0
# At most one slot-map refresh per this interval after a node failed (a failover promotes a replica).
TOPOLOGY_REFRESH_SECONDS = 0.5

# The client of this process: a redis.Redis (standalone, sentinel master) or a RedisCluster.
RedisClient = Any


@dataclass(frozen=True)
class RedisTopology:
    """What a REDIS_URL names."""

    kind: str  # standalone, sentinel or cluster
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes
    service_name: str = ""
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)


def _nodes(netloc: str, url: str, what: str) -> tuple[tuple[str, int], ...]:
    if "@" in netloc:
        raise ImproperlyConfigured(
            f"REDIS_URL {_redact(url)}: put the password in REDIS_PASSWORD, not in a {what} URL."
        )
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(
                f"REDIS_URL {_redact(url)}: every {what} must be written host:port (got {part.strip()!r})."
            )
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def parse_redis_url(url: str) -> RedisTopology:
    """The topology ``url`` names; a URL that cannot work raises ImproperlyConfigured saying what to fix."""
    scheme, sep, rest = url.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ImproperlyConfigured(
            f"REDIS_URL {_redact(url)}: the scheme must be redis://, rediss://, unix://, "
            "redis+sentinel://host:port[,host:port]/<service_name>[/<db>] or redis+cluster://host:port[,host:port]."
        )
    if kind == STANDALONE:
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise ImproperlyConfigured(f"REDIS_URL {_redact(url)}: {exc}") from None
        return RedisTopology(kind=STANDALONE, url=url)
    rest, _q, query = rest.partition("?")
    if query:
        raise ImproperlyConfigured(
            f"REDIS_URL {_redact(url)}: {scheme}:// takes no query options; timeouts come from "
            "REDIS_SOCKET_TIMEOUT and REDIS_CONNECT_TIMEOUT, the password from REDIS_PASSWORD."
        )
    netloc, _slash, path = rest.partition("/")
    if not netloc:
        raise ImproperlyConfigured(f"REDIS_URL {_redact(url)}: name at least one host:port.")
    segments = [unquote(s) for s in path.split("/") if s]
    if kind == SENTINEL:
        nodes = _nodes(netloc, url, "sentinel")
        if not segments or len(segments) > 2:
            raise ImproperlyConfigured(
                f"REDIS_URL {_redact(url)}: a sentinel URL ends with /<service_name> or /<service_name>/<db> "
                "(the name the sentinels monitor, e.g. redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0)."
            )
        db = segments[1] if len(segments) == 2 else "0"
        if not db.isdigit():
            raise ImproperlyConfigured(f"REDIS_URL {_redact(url)}: the database must be a number (got {db!r}).")
        return RedisTopology(kind=SENTINEL, url=url, nodes=nodes, service_name=segments[0], db=int(db))
    nodes = _nodes(netloc, url, "cluster seed node")
    if segments and segments != ["0"]:
        raise ImproperlyConfigured(
            f"REDIS_URL {_redact(url)}: Redis Cluster has only database 0; write redis+cluster://host:port[,host:port]."
        )
    return RedisTopology(kind=CLUSTER, url=url, nodes=nodes)


def _node_kwargs(socket_timeout: float | None, connect_timeout: float | None) -> dict[str, Any]:
    return {
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
        "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
        "health_check_interval": 0,
        "retry_on_timeout": False,
        "max_connections": 256,
        "password": settings.REDIS_PASSWORD or None,
    }


def make_client(
    topology: RedisTopology,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
    retry: Retry | None = None,
) -> RedisClient:
    """A new client for ``topology``: the gateway's short timeouts unless given (the flusher blocks longer)."""
    kwargs = _node_kwargs(socket_timeout, connect_timeout)
    if retry is not None:
        kwargs["retry"] = retry
    if topology.kind == STANDALONE:
        kwargs.pop("password")
        return redis.Redis.from_url(topology.url, **kwargs)
    if topology.kind == SENTINEL:
        sentinel = Sentinel(
            list(topology.nodes),
            sentinel_kwargs={
                "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
                "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT,
                "password": settings.REDIS_SENTINEL_PASSWORD or None,
            },
        )
        return sentinel.master_for(topology.service_name, db=topology.db, **kwargs)
    kwargs.pop("max_connections")
    kwargs.pop("retry_on_timeout")  # the cluster client's retry object decides
    # Fail fast and let each caller apply its own failure rule (on_store_error, spool, database): by default one
    # retry, right after redis-py refreshed its slot map.
    kwargs.setdefault("retry", Retry(NoBackoff(), 1))
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
        require_full_coverage=False,
        max_connections=256,
        **kwargs,
    )


def client_for_url(url: str, **options: Any) -> RedisClient:
    """A client of its own for ``url`` (any of the three forms), e.g. the flusher's with longer timeouts."""
    return make_client(parse_redis_url(url), **options)


class _Holder:
    """The process-wide client and what it was built from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: RedisClient | None = None
        self.url: str | None = None
        self.failed_at = -1e9
        self.refresh_wanted = False
        self.refreshed_at = 0.0


_holder = _Holder()


class _Unreachable:
    """Stands in for a cluster client while none of the seed nodes answers: every use raises redis.ConnectionError,
    which each caller already handles (on_store_error, the database, the spool)."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        raise redis.ConnectionError(f"Redis Cluster unreachable: {self._reason}")


def get_redis() -> RedisClient | None:
    """The process-wide client for REDIS_URL, or None when Redis is not configured.

    A cluster none of whose seed nodes answers cannot even be described to redis-py: then the client is a stand-in
    whose every call raises redis.ConnectionError (like any other Redis failure), and building the real one is
    tried again after CLUSTER_RETRY_SECONDS.
    """
    url = settings.REDIS_URL
    if not url:
        return None
    client = _holder.client
    if (
        client is not None
        and _holder.url == url
        and (not isinstance(client, _Unreachable) or time.monotonic() - _holder.failed_at < CLUSTER_RETRY_SECONDS)
    ):
        return client
    with _holder.lock:
        client = _holder.client
        if client is None or _holder.url != url or isinstance(client, _Unreachable):
            topology = parse_redis_url(url)
            try:
                client = make_client(topology)
            except Exception as exc:  # RedisClusterException is not a RedisError
                logger.warning("Redis Cluster unreachable; retrying in %.0f s", CLUSTER_RETRY_SECONDS)
                client = _Unreachable(str(exc))
                _holder.failed_at = time.monotonic()
            _holder.client, _holder.url = client, url
        return client


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def node_for_key(client: RedisClient, key: str) -> redis.Redis:
    """The plain client to send a one-slot call about ``key`` to: the client itself, or the slot's master."""
    if not isinstance(client, RedisCluster):
        return client
    if _holder.refresh_wanted:
        refresh_topology(client)
    node = client.get_node_from_key(key)
    return client.get_redis_connection(node)


def topology_failed(client: RedisClient) -> None:
    """A node did not answer or answered MOVED/CLUSTERDOWN: re-read the slot map before the next call."""
    if isinstance(client, RedisCluster):
        _holder.refresh_wanted = True


def refresh_topology(client: RedisClient) -> None:
    """Re-read the cluster's slot map (after a failover or a reshard); at most once per TOPOLOGY_REFRESH_SECONDS."""
    if not isinstance(client, RedisCluster):
        return
    now = time.monotonic()
    if now - _holder.refreshed_at < TOPOLOGY_REFRESH_SECONDS:
        return
    _holder.refreshed_at = now
    try:
        client.nodes_manager.initialize()
        _holder.refresh_wanted = False
    except Exception:  # no node answered yet: the next failure asks again
        logger.warning("Redis Cluster slot map could not be refreshed; retrying on the next failure")


def reset_redis() -> None:
    """Forget the client (after a fork, or when tests point REDIS_URL elsewhere)."""
    with _holder.lock:
        if _holder.client is not None:
            with contextlib.suppress(Exception):  # closing a client whose servers are gone
                _holder.client.close()
        _holder.client = None
        _holder.url = None
        _holder.failed_at = -1e9
        _holder.refresh_wanted = False


def cache_settings(
    url: str,
    *,
    ttl: int,
    connect_timeout: float,
    socket_timeout: float,
    password: str | None,
    sentinel_password: str | None,
) -> dict[str, Any]:
    """The Django CACHES['default'] entry for ``url``: django-redis, with its Sentinel client or our cluster factory.

    Called from settings.py, so it reads nothing from django.conf.settings.
    """
    topology = parse_redis_url(url)
    options: dict[str, Any] = {"SOCKET_CONNECT_TIMEOUT": connect_timeout, "SOCKET_TIMEOUT": socket_timeout}
    location: Any = url
    if topology.kind == SENTINEL:
        location = f"redis://{topology.service_name}/{topology.db}"
        options.update(
            CLIENT_CLASS="django_redis.client.SentinelClient",
            CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory",
            SENTINELS=list(topology.nodes),
            SENTINEL_KWARGS={
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": connect_timeout,
                "password": sentinel_password,
            },
            PASSWORD=password,
        )
    elif topology.kind == CLUSTER:
        # A list, so django-redis does not split the seed nodes into "primary, replica, ..." at the commas.
        location = [url]
        options.update(
            CLIENT_CLASS="apimgmt.redis_cache.ClusterCacheClient",
            CONNECTION_FACTORY="apimgmt.redis_cache.ClusterConnectionFactory",
        )
    return {
        "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
        "LOCATION": location,
        "TIMEOUT": ttl,
        "OPTIONS": options,
    }
