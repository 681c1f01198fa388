"""The store on a real 3-master Redis Cluster (deploy/redis_cluster.sh, started by deploy/test.sh).

Each partition's keys share one hash tag, so a batch's WATCH/MULTI/EXEC stays in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pyroaring import BitMap
from redis.asyncio.cluster import RedisCluster

from dmp.audience import Audience
from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.ids import uid_hash
from dmp.ingest import IngestService
from dmp.keys import PartitionKeys, partitions_key
from dmp.metrics import IngestMetrics, LookupMetrics
from dmp.partition_batch import BatchPlan
from dmp.partition_store import Fenced, PartitionStore
from dmp.redis_client import REDIS_FAILURES, connect
from dmp.redis_types import as_bytes
from segment_rules import CompiledRules
from tests.integration.conftest import wait_until
from tests.integration.helpers import new_car_view, produce

CLUSTER_URL_VAR = "DMP_TEST_REDIS_CLUSTER_URL"


@pytest.fixture
async def cluster_settings(settings: Settings) -> AsyncIterator[Settings]:
    url = os.environ.get(CLUSTER_URL_VAR, "redis://127.0.0.1:17000/0")
    s = replace(settings, redis=replace(settings.redis, url=url, cluster=True))
    client = connect(s.redis)
    try:
        await client.ping()
    except Exception as exc:  # connection refused, cluster down, ...
        pytest.fail(f"no Redis Cluster at {url} ({exc}): run deploy/redis_cluster.sh start")
    finally:
        await client.aclose()
    yield s
    client = connect(s.redis)
    try:
        # Keys live on three nodes: delete one by one (a multi-key DEL must stay in one slot).
        async for key in client.scan_iter(match=f"{s.redis.key_prefix}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def cluster(cluster_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = connect(cluster_settings.redis)
    assert isinstance(client, RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


def _plan(uid: str, local: int, segment: str) -> BatchPlan:
    state = CookieState(local=local)
    state.members = frozenset({segment})
    return BatchPlan(
        states={uid: state},
        new_ids=[(local, uid_hash(uid))],
        next_local=local + 1,
        added={segment: [local]},
    )


async def test_a_partitions_keys_hash_to_one_slot_across_three_masters(
    cluster: aioredis.Redis, cluster_settings: Settings
) -> None:
    assert isinstance(cluster, RedisCluster)
    assert len(cluster.get_primaries()) == 3
    prefix, topic = cluster_settings.redis.key_prefix, cluster_settings.kafka.topic
    slots = set()
    for partition in range(8):
        keys = PartitionKeys(prefix, topic, partition)
        names = [keys.offset, keys.ids, keys.changes, keys.cookie("c1"), keys.bitmap("s", 3)]
        per_key = {cluster.keyslot(n) for n in names}
        assert len(per_key) == 1, f"partition {partition} spans slots {per_key}"
        slots |= per_key
    assert len(slots) == 8


async def test_commit_is_one_transaction_and_a_second_writer_is_fenced(
    cluster: aioredis.Redis, cluster_settings: Settings
) -> None:
    keys = PartitionKeys(cluster_settings.redis.key_prefix, cluster_settings.kafka.topic, 0)
    first = PartitionStore(cluster, keys, state_ttl=3600, stream_maxlen=1000)
    second = PartitionStore(cluster, keys, state_ttl=3600, stream_maxlen=1000)
    await first.load()
    await second.load()
    await first.commit(_plan("c1", 0, "seg_a"), 10, 1.0)
    assert await cluster.get(keys.offset) == b"10"
    assert await cluster.get(keys.next_local) == b"1"
    assert await cluster.xlen(keys.changes) == 1
    assert await cluster.sismember(partitions_key(keys.prefix, keys.topic), "0")
    # The second store loaded before the first committed: its offset is stale.
    with pytest.raises(Fenced):
        await second.commit(_plan("c2", 0, "seg_a"), 20, 2.0)
    assert await cluster.get(keys.offset) == b"10"
    await first.commit(_plan("c3", 1, "seg_b"), 20, 3.0)
    assert await cluster.get(keys.offset) == b"20"


async def test_ingest_on_the_cluster(
    cluster_settings: Settings,
    cluster: aioredis.Redis,
    rules: CompiledRules,
    producer: AIOKafkaProducer,
) -> None:
    service = IngestService(cluster_settings, rules, cluster, IngestMetrics.create())
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await wait_until(lambda: len(service.partitions) == 2, 30, "partition assignment")
        events = [new_car_view(f"cl-{n}", age_days=1 + n % 2) for n in range(40)]
        events += [new_car_view(f"cl-{n}", age_days=0.5) for n in range(40)]
        await produce(producer, cluster_settings.kafka.topic, events)
        prefix, topic = cluster_settings.redis.key_prefix, cluster_settings.kafka.topic
        parts = [PartitionKeys(prefix, topic, p) for p in range(2)]

        async def applied() -> int:
            raw = [await cluster.get(k.offset) for k in parts]
            return sum(int(v) for v in raw if v is not None)

        deadline = asyncio.get_running_loop().time() + 60
        while await applied() < len(events):
            assert asyncio.get_running_loop().time() < deadline, "ingest did not catch up"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    # Every cookie is numbered once and is in auto_new_car_intent (two views in 14 days).
    members = 0
    for keys in parts:
        ids = await cluster.get(keys.ids)
        assert ids is not None
        async for key in cluster.scan_iter(match=f"{keys.tag}:bm:auto_new_car_intent:*"):
            raw = await cluster.get(key)
            assert raw is not None
            members += len(BitMap.deserialize(as_bytes(raw)))
    assert members == 40
    # The ad-ops audience tools read the same keys across the three masters.
    audience = Audience(cluster, prefix, topic, rules)
    assert await audience.estimate("auto_new_car_intent") == 40
    sample = await audience.sample("auto_new_car_intent", 5)
    assert len(sample) == 5
    assert set(sample) <= {f"cl-{n}" for n in range(40)}


async def test_a_replica_follows_the_cluster(
    cluster_settings: Settings, cluster: aioredis.Redis, rules: CompiledRules
) -> None:
    from dmp.change_follower import ChangeFollower
    from dmp.replica import Replica

    prefix, topic = cluster_settings.redis.key_prefix, cluster_settings.kafka.topic
    for partition in range(2):
        keys = PartitionKeys(prefix, topic, partition)
        store = PartitionStore(cluster, keys, state_ttl=3600, stream_maxlen=1000)
        await store.load()
        await store.commit(_plan(f"r{partition}", 0, "geo_socal"), 5, 1.0)
    replica = Replica(rules)
    follower = ChangeFollower(
        cluster, replica, LookupMetrics.create(), prefix=prefix, topic=topic, block_ms=50
    )
    await asyncio.wait_for(follower.load_snapshot(), 5)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.follow(stop))
    try:
        keys = PartitionKeys(prefix, topic, 1)
        store = PartitionStore(cluster, keys, state_ttl=3600, stream_maxlen=1000)
        await store.load()
        await store.commit(_plan("r9", 1, "geo_socal"), 6, 2.0)
        await wait_until(lambda: replica.base_segments("r9") == ["geo_socal"], 5, "follow")
        assert follower.healthy
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stops answering, as a master behind a partition that drops packets."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_master_that_stops_answering_fails_a_call_within_the_retries(
    cluster_settings: Settings, retries: int
) -> None:
    """Each attempt against a hung master waits the whole socket timeout, so a call fails
    after about (retries + 1) x the timeout. redis-py's default of 10 retries made it about
    20 x (10.1 s at 0.5 s, docs/decisions/0021). The batch commit is what ingest waits on."""
    timeout = 0.5
    redis_settings = replace(
        cluster_settings.redis, socket_timeout_seconds=timeout, cluster_retries=retries
    )
    client = connect(redis_settings)
    assert isinstance(client, RedisCluster)
    keys = PartitionKeys(redis_settings.key_prefix, cluster_settings.kafka.topic, 0)
    store = PartitionStore(client, keys, state_ttl=3600, stream_maxlen=1000)
    try:
        await store.load()
        node = client.get_node_from_key(keys.offset)
        direct = aioredis.Redis(host=node.host, port=node.port)
        pid = int((await direct.info("server"))["process_id"])
        await direct.aclose()
        bound = (retries + 1) * timeout + 1.0  # the backoff (capped at 1 s) and slack
        with stopped(pid):
            started = time.monotonic()
            with pytest.raises(REDIS_FAILURES):
                await asyncio.wait_for(client.get(keys.offset), 30)
            took_get = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(REDIS_FAILURES):
                await asyncio.wait_for(store.commit(_plan("h1", 0, "geo_socal"), 1, 1.0), 30)
            took_commit = time.monotonic() - started
        assert timeout * (retries + 1) <= took_get < bound
        assert timeout <= took_commit < bound
        # Answering again, the same client carries on.
        await store.load()
        await store.commit(_plan("h1", 0, "geo_socal"), 1, 1.0)
        assert await client.get(keys.offset) == b"1"
    finally:
        await client.aclose()
