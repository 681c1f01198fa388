"""The one place a Redis client is made: a single server, or a Redis Cluster.

Every key one partition writes shares a hash tag (dmp/keys.py), so a batch's WATCH/MULTI/EXEC
transaction stays in one slot, which redis-py's asyncio ``RedisCluster`` pipelines support.
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from dmp.config import RedisSettings


def connect(settings: RedisSettings) -> aioredis.Redis:
    """A client for ``settings.url``; a cluster client when ``settings.cluster``."""
    if settings.cluster:
        # Same command API for the keys we use; the callers are typed for Redis.
        return cast(aioredis.Redis, RedisCluster.from_url(settings.url))
    return aioredis.Redis.from_url(settings.url)
