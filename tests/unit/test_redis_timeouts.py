"""A Redis that stops answering fails the call after DMP_REDIS_SOCKET_TIMEOUT_SECONDS.

The server here accepts connections and never answers, the way a network partition that
drops packets looks from the client (no reset, no error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import RedisClusterException, RedisError

from dmp.config import RedisSettings, Settings
from dmp.redis_client import connect


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing, keep it open

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("cluster", [False, True])
async def test_a_silent_redis_fails_the_call_in_time(silent_port: int, cluster: bool) -> None:
    settings = RedisSettings(
        url=f"redis://127.0.0.1:{silent_port}/0", cluster=cluster, socket_timeout_seconds=0.5
    )
    client = connect(settings)
    started = time.monotonic()
    # A cluster client that reaches no node at all says so with RedisClusterException, which
    # is not a RedisError (redis-py); one node silent among others is a RedisError.
    failure = (RedisError, RedisClusterException) if cluster else RedisError
    try:
        with pytest.raises(failure):
            await asyncio.wait_for(client.get("any"), timeout=10)
    finally:
        await client.aclose()
    assert time.monotonic() - started < 5


def test_a_blocking_read_longer_than_the_socket_timeout_is_refused_at_start() -> None:
    env = {"DMP_REDIS_SOCKET_TIMEOUT_SECONDS": "2", "DMP_LOOKUP_FOLLOW_BLOCK_MS": "2000"}
    with pytest.raises(ValueError, match="DMP_LOOKUP_FOLLOW_BLOCK_MS=2000: must stay below"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "DMP_LOOKUP_FOLLOW_BLOCK_MS": "1999"})
    assert settings.redis.socket_timeout_seconds == 2.0


def test_negative_cluster_retries_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="DMP_REDIS_CLUSTER_RETRIES=-1: must be 0 or more"):
        Settings.from_env({"DMP_REDIS_CLUSTER_RETRIES": "-1"})
