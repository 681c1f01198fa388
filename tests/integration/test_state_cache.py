"""The partition owner's cache of cookie states is bounded (DMP_INGEST_STATE_CACHE_SIZE).

Whether a state came from the cache or from Redis is seen by deleting its key behind the
store's back: the cache still answers it, Redis no longer does.
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.keys import PartitionKeys
from dmp.partition_batch import BatchPlan
from dmp.partition_store import PartitionStore


def states_plan(*uids: str, first_local: int) -> BatchPlan:
    states = {uid: CookieState(local=first_local + n) for n, uid in enumerate(uids)}
    return BatchPlan(states=states, next_local=first_local + len(uids))


async def loaded_store(
    settings: Settings, client: aioredis.Redis, cached: int = 500_000
) -> PartitionStore:
    """Partition 0's store, loaded, keeping at most ``cached`` states in memory."""
    keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0)
    store = PartitionStore(client, keys, state_ttl=60, stream_maxlen=100, max_cached_states=cached)
    await store.load()
    return store


async def answered_after_deleting(
    store: PartitionStore, client: aioredis.Redis, uids: list[str]
) -> list[str]:
    await client.delete(*[store.keys.cookie(u) for u in uids])
    found = await store.fetch_states(uids)
    return sorted(uid for uid, state in found.items() if state is not None)


async def test_the_cache_keeps_at_most_its_size_then_starts_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    store = await loaded_store(settings, redis_client, cached=2)
    await store.commit(states_plan("a", "b", first_local=0), 1, time.time())
    await store.commit(states_plan("c", first_local=2), 2, time.time())
    # "c" would have made three: the cache was emptied, then took "c" alone.
    assert await answered_after_deleting(store, redis_client, ["a", "b", "c"]) == ["c"]


async def test_a_batch_larger_than_the_cache_is_not_cached(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    store = await loaded_store(settings, redis_client, cached=2)
    await store.commit(states_plan("a", "b", "c", first_local=0), 1, time.time())
    assert await answered_after_deleting(store, redis_client, ["a", "b", "c"]) == []


async def test_size_zero_keeps_no_state_in_memory(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    store = await loaded_store(settings, redis_client, cached=0)
    await store.commit(states_plan("a", first_local=0), 1, time.time())
    assert (await store.fetch_states(["a"]))["a"] == CookieState(local=0)  # read from Redis
    assert await answered_after_deleting(store, redis_client, ["a"]) == []


def test_a_negative_size_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="DMP_INGEST_STATE_CACHE_SIZE=-1: must be 0 or more"):
        Settings.from_env({"DMP_INGEST_STATE_CACHE_SIZE": "-1"})


async def test_a_state_reads_back_equal_whether_cached_as_bytes_or_as_an_object(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A cookie first seen is cached as the bytes written, one seen again as its object."""
    store = await loaded_store(settings, redis_client)
    state = CookieState(
        local=0, history={"0a1b2c3d": [1.5, 2.25], "e4f5": [[3.0, 7]]}, members=frozenset({"s"})
    )
    await store.commit(BatchPlan(states={"a": state}, next_local=1), 1, time.time())
    await redis_client.delete(store.keys.cookie("a"))
    first = (await store.fetch_states(["a"]))["a"]  # from the bytes
    assert first == state
    assert first is not state
    assert first is not None
    first.history["0a1b2c3d"].append(4.0)
    await store.commit(BatchPlan(states={"a": first}, next_local=1), 2, time.time())
    await redis_client.delete(store.keys.cookie("a"))
    second = (await store.fetch_states(["a"]))["a"]  # the object itself, seen again
    assert second == first
    assert second is not None
    assert second.history["0a1b2c3d"] == [1.5, 2.25, 4.0]
