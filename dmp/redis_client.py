"""The one place a Redis client is made: a single server, or a Redis Cluster.

Every key one partition writes shares a hash tag (dmp/keys.py), so a batch's WATCH/MULTI/EXEC
transaction stays in one slot, which redis-py's asyncio ``RedisCluster`` pipelines support.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError

from dmp.config import RedisSettings

# redis-py's cluster client says "no node reachable" with RedisClusterException, which is not
# a RedisError: code that rides out a Redis outage catches both.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def connect(settings: RedisSettings) -> aioredis.Redis:
    """A client for ``settings.url``; a cluster client when ``settings.cluster``."""
    timeout = settings.socket_timeout_seconds
    if settings.cluster:
        # Same command API for the keys we use; the callers are typed for Redis.
        cluster = RedisCluster.from_url(
            settings.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Bounds a call to a hung master near (retries + 1) x the timeout: each
            # attempt waits it out (docs/decisions/0021). Backoff as redis-py's default.
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), settings.cluster_retries),
        )
        return cast(aioredis.Redis, cluster)
    return aioredis.Redis.from_url(
        settings.url, socket_timeout=timeout, socket_connect_timeout=timeout
    )


async def scan_batches(
    client: aioredis.Redis, pattern: str, count: int
) -> AsyncIterator[list[Any]]:
    """The keys matching ``pattern``, up to ``count`` at a time (for one MGET each).

    ``scan_iter`` walks every master of a cluster and the one server otherwise; a bare
    ``SCAN`` cursor means nothing to a cluster client (it answers per node). Keys of one
    batch share the pattern's hash tag where callers MGET them on a cluster.
    """
    batch: list[Any] = []
    async for key in client.scan_iter(match=pattern, count=count):
        batch.append(key)
        if len(batch) >= count:
            yield batch
            batch = []
    if batch:
        yield batch


async def read_streams(
    client: aioredis.Redis, cursors: Mapping[Any, Any], count: int, block_ms: int
) -> list[Any]:
    """XREAD of every stream after its cursor: ``[(stream, entries), ...]``.

    A cluster refuses one XREAD over streams in different slots, so there each stream is
    read on its own without blocking, and the wait comes after when all were empty.
    """
    if isinstance(client, RedisCluster):
        reply: list[Any] = []
        for stream, cursor in list(cursors.items()):
            reply.extend(await client.xread({stream: cursor}, count=count) or [])
        if not reply:
            await asyncio.sleep(block_ms / 1000)
        return reply
    return list(await client.xread(dict(cursors), count=count, block=block_ms) or [])
