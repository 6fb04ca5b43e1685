"""Tell every gateway worker that configuration changed, through a version counter in Redis.

Gateways poll ``route_cache:version`` every few hundred milliseconds; when it
moves they reload their route table and drop their key caches. Redis-level key
caches include the version in their key (``cache:api:key:<version>:<hash>``), so
one INCR invalidates them all at once. apimgmt never imports the gateway.
"""

from __future__ import annotations

import logging
import threading

import redis
from django.db import transaction

from apimgmt.redis_client import get_redis

CONFIG_VERSION_KEY = "route_cache:version"
CONFIG_CHANNEL = "route_cache:changed"

logger = logging.getLogger(__name__)

# Without Redis (development on one process) the version lives here.
_local_version = 0
_local_lock = threading.Lock()


def bump_config_version() -> int:
    """Increment the configuration version now and return it (-1 if Redis could not be reached)."""
    global _local_version
    client = get_redis()
    if client is None:
        with _local_lock:
            _local_version += 1
            return _local_version
    try:
        version = int(client.incr(CONFIG_VERSION_KEY))
        client.publish(CONFIG_CHANNEL, version)
        return version
    except redis.RedisError:
        # The change is committed; gateways pick it up from the database when
        # their cache TTL ends. Say so loudly.
        logger.error(
            "could not bump %s in Redis; gateways see the change only after their cache TTL", CONFIG_VERSION_KEY
        )
        return -1


def read_config_version() -> int:
    client = get_redis()
    if client is None:
        return _local_version
    value = client.get(CONFIG_VERSION_KEY)
    return int(value) if value is not None else 0


def config_changed() -> None:
    """Bump the version once the current transaction commits (immediately outside one)."""
    transaction.on_commit(bump_config_version)
