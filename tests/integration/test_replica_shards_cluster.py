"""Replica shards on the 3-master Redis Cluster (deploy/redis_cluster.sh, started by
deploy/test.sh): a real `dmp ingest` and `dmp lookup` processes with DMP_REDIS_CLUSTER=1,
a full replica and shards 0/2 and 1/2, each shard reading partitions that live on two
different masters (docs/scaling.md, Replica sharding)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from bidder_adapter.client import ClientConfig, DmpClient
from bidder_adapter.sharded_client import ShardedClientConfig, ShardedDmpClient
from dmp.config import Settings
from dmp.keys import PartitionKeys
from dmp.redis_client import connect
from dmp.topics import create_topics
from tests.bidder_adapter.partner_yaml import ACME_KEY, BETA_KEY
from tests.conftest import delete_topics
from tests.integration.test_redis_cluster import CLUSTER_URL_VAR
from tests.integration.test_replica_shards import (
    COOKIES,
    PARTITIONS,
    UNKNOWN,
    Services,
    _cases,
    _fill,
    _gauge,
    _get,
    _picks,
    _start,
    _sync_buyeruids,
    _wait_gauge,
    _wait_ready,
)

# What dmp.demo_events makes of cookie n, by n % 3.
HELD = (
    ["auto_new_car_intent", "geo_socal", "new_car_socal"],
    ["auto_new_car_intent"],
    ["geo_socal"],
)


def _master(cluster: RedisCluster, keys: PartitionKeys) -> str:
    node = cluster.get_node_from_key(keys.ids)
    assert node is not None
    return f"{node.host}:{node.port}"


async def _spread_topic(cluster: RedisCluster, prefix: str, base: str) -> tuple[str, list[str]]:
    """A topic name whose partitions' hash tags put each shard's two partitions on two
    different masters, and use all three: chosen, not left to the luck of a random name."""
    for n in range(1000):
        topic = f"{base}-c{n}"
        masters = [_master(cluster, PartitionKeys(prefix, topic, p)) for p in range(PARTITIONS)]
        # Shard 0 holds partitions 0 and 2, shard 1 holds 1 and 3 (dmp/shards.py).
        if len(set(masters)) == 3 and masters[0] != masters[2] and masters[1] != masters[3]:
            return topic, masters
    raise AssertionError("no topic name spreads the partitions over three masters")


@pytest.fixture
async def cluster_sharded_settings(settings: Settings) -> AsyncIterator[Settings]:
    """The test's prefix, a 4-partition topic, and the cluster for Redis."""
    url = os.environ.get(CLUSTER_URL_VAR, "redis://127.0.0.1:17000/0")
    redis = replace(settings.redis, url=url, cluster=True)
    client = connect(redis)
    assert isinstance(client, RedisCluster)
    try:
        await client.initialize()
    except Exception as exc:  # connection refused, cluster down, ...
        pytest.fail(f"no Redis Cluster at {url} ({exc}): run deploy/redis_cluster.sh start")
    try:
        assert len(client.get_primaries()) == 3
        topic, _ = await _spread_topic(client, redis.key_prefix, f"t-{uuid.uuid4().hex[:8]}")
        kafka = replace(
            settings.kafka, topic=topic, dead_letter_topic=f"{topic}.dlq", partitions=PARTITIONS
        )
        s = replace(settings, redis=redis, kafka=kafka)
        await create_topics(s.kafka)
        try:
            yield s
        finally:
            await delete_topics(s)
            # Keys live on three nodes: delete one by one (a multi-key DEL stays in one slot).
            async for key in client.scan_iter(match=f"{redis.key_prefix}:*", count=1000):
                await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def cluster_services(
    cluster_sharded_settings: Settings, tmp_path: Path
) -> AsyncIterator[Services]:
    running = Services(cluster_sharded_settings, tmp_path)
    try:
        yield running
    finally:
        await running.stop_all()


async def test_two_shards_on_the_cluster_answer_for_both_shards_and_421_elsewhere(
    cluster_sharded_settings: Settings, cluster_services: Services
) -> None:
    settings = cluster_sharded_settings
    stack = _start(cluster_services)
    full, shards = stack.full, stack.shards
    cluster = connect(settings.redis)
    assert isinstance(cluster, RedisCluster)
    await cluster.initialize()
    try:
        masters = [
            _master(cluster, PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p))
            for p in range(PARTITIONS)
        ]
    finally:
        await cluster.aclose()
    async with aiohttp.ClientSession() as http:
        for service in (full, *shards):
            await _wait_ready(http, service, 60)
        for n, shard in enumerate(shards):
            _, ready, _ = await _get(http, f"{shard.url}/readyz")
            assert ready == {"status": "ready", "shard": f"{n}/2", "partitions": [n, n + 2]}
        await _fill(http, stack, settings)
        memberships = [await _gauge(http, s, "dmp_replica_memberships") for s in (full, *shards)]
        assert memberships[0] == (memberships[1] or 0) + (memberships[2] or 0) > 0

        # Each cookie: its shard answers what the demo stream made of it (and what the full
        # replica answers); the other shard answers 421 naming the owner.
        for uid in stack.uids + UNKNOWN:
            mine = stack.owner[uid]
            want = [] if uid in UNKNOWN else HELD[int(uid.removeprefix("demo-")) % 3]
            status, body, _ = await _get(http, f"{full.url}/v1/users/{uid}/segments")
            assert (status, sorted(body["segments"])) == (200, want), uid
            status, body, _ = await _get(http, f"{shards[mine].url}/v1/users/{uid}/segments")
            assert (status, sorted(body["segments"])) == (200, want), (uid, mine)
            status, body, headers = await _get(
                http, f"{shards[1 - mine].url}/v1/users/{uid}/segments"
            )
            assert status == 421, (uid, body)
            assert body["shard"] == mine
            assert body["error"].startswith(f"this cookie belongs to shard {mine}/2")
            assert headers["X-DMP-Shard"] == f"{mine}/2"

        # The sharded client over them, for both partners, single and batch, as the full one.
        for key in (ACME_KEY, BETA_KEY):
            config = ClientConfig("", key, default_tmax_ms=2000)
            urls = tuple(s.url for s in shards)
            async with (
                DmpClient(replace(config, base_url=full.url)) as single,
                ShardedDmpClient(ShardedClientConfig(urls, PARTITIONS, key, config)) as sharded,
            ):
                everyone = stack.uids + UNKNOWN
                expected = await single.segments_batch(everyone)
                assert sum(1 for ids in expected.values() if ids) > COOKIES // 4
                assert await sharded.segments_batch(everyone) == expected
                for uid in everyone[::7]:
                    assert await sharded.segments(uid) == expected[uid], uid

        # ID syncs go into the match table on the cluster and reach every replica: acme's
        # buyeruid bu-<cookie> resolves to that cookie on the full replica and the shards.
        picks = _picks(stack)
        await _sync_buyeruids(http, full, shards, picks[0] + picks[1])

        # Bid requests with ids in both shards (buyeruids among them), as the full replica
        # answers them.
        answered = 0
        async with contextlib.AsyncExitStack() as opened:
            clients: dict[str, tuple[DmpClient, ShardedDmpClient]] = {}
            for key in (ACME_KEY, BETA_KEY):
                config = ClientConfig("", key, default_tmax_ms=2000)
                urls = tuple(s.url for s in shards)
                clients[key] = (
                    await opened.enter_async_context(DmpClient(replace(config, base_url=full.url))),
                    await opened.enter_async_context(
                        ShardedDmpClient(ShardedClientConfig(urls, PARTITIONS, key, config))
                    ),
                )
            for key, request, param, _, _ in _cases(picks):
                single, sharded = clients[key]
                want = await single.enrich(request, uid=param)
                assert await sharded.enrich(request, uid=param) == want, (request, param)
                answered += bool(want)
        assert answered > 100, answered

        # A restarted shard loads its two partitions from the snapshots the shards wrote on
        # the cluster (each partition's snapshot sits on its own master, under its hash tag).
        await _snapshots_written(settings)
        await cluster_services.stop(shards[0])
        again = cluster_services.lookup("shard0-again", "0/2", snapshot_interval=0)
        await _wait_ready(http, again, 60)
        log = again.log.read_text()
        loaded = sorted(int(p) for p in re.findall(r"partition (\d+) loaded from snapshot", log))
        assert loaded == [0, 2], log[-3000:]
        await _wait_gauge(http, again, "dmp_replica_cookies", stack.split[0], 30)
    assert len(set(masters)) == 3
    assert stack.ingest.proc.poll() is None, stack.ingest.log.read_text()[-3000:]
    # The lookups' own followers (memberships, rule versions, opt-outs, the match table)
    # never failed on the cluster.
    for service in (full, *shards, again):
        log = service.log.read_text()
        assert not re.search(r" (WARNING|ERROR) (dmp|bidder_adapter)\.", log), log[-3000:]


async def _snapshots_written(settings: Settings) -> None:
    """Wait until every partition has a snapshot key on the cluster (shards write them every
    second)."""
    client = connect(settings.redis)
    try:
        deadline = time.monotonic() + 20
        while True:
            present = [
                await client.exists(
                    PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).snapshot
                )
                for p in range(PARTITIONS)
            ]
            if all(present):
                return
            assert time.monotonic() < deadline, f"snapshots present: {present}"
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
