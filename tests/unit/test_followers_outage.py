"""The lookup's followers ride out a Redis that cannot be reached, single or cluster: they
report unhealthy and keep retrying, never end (a follower that ended would leave the replica
serving stale segments for good)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from dmp.change_follower import ChangeFollower
from dmp.config import RedisSettings
from dmp.match_table import MatchTable
from dmp.match_table_follower import MatchTableFollower, MatchTableMetrics
from dmp.metrics import LookupMetrics
from dmp.privacy_follow import SuppressionFollower, SuppressionList
from dmp.redis_client import connect
from dmp.replica import Replica
from segment_rules import CompiledRules, load_rules_file
from tests.conftest import EXAMPLE_RULES
from tests.faults.support import free_port


def change_follower(client: aioredis.Redis) -> Any:
    replica = Replica(CompiledRules(load_rules_file(EXAMPLE_RULES)))
    return ChangeFollower(
        client, replica, LookupMetrics.create(), prefix="x", topic="t", block_ms=50
    )


def match_follower(client: aioredis.Redis) -> Any:
    return MatchTableFollower(
        client, MatchTable(), MatchTableMetrics.create(), prefix="x", block_ms=50
    )


def suppression_follower(client: aioredis.Redis) -> Any:
    return SuppressionFollower(client, SuppressionList(), prefix="x", block_ms=50)


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("make", [change_follower, match_follower, suppression_follower])
async def test_a_follower_outlives_an_unreachable_redis(
    cluster: bool, make: Callable[[aioredis.Redis], Any]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = connect(RedisSettings(url=url, cluster=cluster, socket_timeout_seconds=0.5))
    follower = make(client)
    stop = asyncio.Event()
    following = asyncio.create_task(follower.follow(stop))
    try:
        await asyncio.sleep(1.5)  # several attempts
        assert not following.done(), following.exception() if following.done() else ""
        assert follower.healthy is False
    finally:
        stop.set()
        await asyncio.wait_for(following, 10)
        await client.aclose()
