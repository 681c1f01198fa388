"""Ingest commits its offsets to Kafka once per interval and at stop, not after each batch.

Kafka's committed offsets are informational (lag tools); Redis holds the offset each batch
applied (test_restart.py). DMP_KAFKA_COMMIT_INTERVAL_MS batches the commits (decision
0010): these tests watch the group's offsets in the real broker.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from dmp.config import Settings
from dmp.keys import PartitionKeys
from tests.integration.conftest import StartIngest
from tests.integration.helpers import new_car_view, produce

UIDS = [f"commit-{n}" for n in range(30)]


async def redis_offsets(client: aioredis.Redis, settings: Settings) -> dict[int, int]:
    out = {}
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        raw = await client.get(keys.offset)
        out[p] = int(raw) if raw is not None else 0
    return out


async def kafka_offsets(settings: Settings) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(settings.kafka.group_id)
    finally:
        await admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in found.items()
        if tp.topic == settings.kafka.topic and meta.offset >= 0
    }


async def applied(client: aioredis.Redis, settings: Settings, total: int) -> dict[int, int]:
    for _ in range(1500):
        offsets = await redis_offsets(client, settings)
        if sum(offsets.values()) >= total:
            return offsets
        await asyncio.sleep(0.02)
    raise AssertionError(f"Redis offsets never reached {total}")


def with_interval(settings: Settings, ms: int) -> Settings:
    return replace(settings, kafka=replace(settings.kafka, commit_interval_ms=ms))


async def test_offsets_reach_kafka_within_the_interval_while_running(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    s = with_interval(settings, 300)
    ingest = await start_ingest(s)
    await produce(producer, s.kafka.topic, [new_car_view(uid, 1) for uid in UIDS])
    in_redis = await applied(redis_client, s, len(UIDS))
    seen: dict[int, int] = {}
    for _ in range(40):  # well within 0.3 s + a poll; 4 s of slack for a busy machine
        seen = await kafka_offsets(s)
        if seen == {p: o for p, o in in_redis.items() if o}:
            break
        await asyncio.sleep(0.1)
    assert seen == {p: o for p, o in in_redis.items() if o}
    assert not ingest.task.done()


async def test_a_long_interval_commits_nothing_until_stop(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    s = with_interval(settings, 3_600_000)
    ingest = await start_ingest(s)
    await produce(producer, s.kafka.topic, [new_car_view(uid, 1) for uid in UIDS])
    in_redis = await applied(redis_client, s, len(UIDS))
    await asyncio.sleep(0.5)  # several polls: a commit per batch would have landed
    assert await kafka_offsets(s) == {}
    await ingest.stop()
    assert await kafka_offsets(s) == {p: o for p, o in in_redis.items() if o}
