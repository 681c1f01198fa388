"""Replicas start from snapshots, and one that fell behind a trimmed stream reloads."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from dmp.change_follower import ChangeFollower
from dmp.config import Settings
from dmp.keys import PartitionKeys
from dmp.metrics import LookupMetrics
from dmp.replica import Replica
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce

UIDS = [f"snap-{n}" for n in range(60)]


def follower(client: aioredis.Redis, settings: Settings, rules: CompiledRules) -> ChangeFollower:
    return ChangeFollower(
        client,
        Replica(rules),
        LookupMetrics.create(),
        prefix=settings.redis.key_prefix,
        topic=settings.kafka.topic,
        block_ms=50,
    )


def answers(f: ChangeFollower, uids: list[str]) -> dict[str, list[str]]:
    return {uid: f.replica.segments(uid) for uid in uids}


async def applied(client: aioredis.Redis, settings: Settings, total: int) -> None:
    async with asyncio.timeout(30):
        while True:
            done = 0
            for p in range(settings.kafka.partitions):
                raw = await client.get(
                    PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).offset
                )
                done += int(raw or 0)
            if done >= total:
                return
            await asyncio.sleep(0.05)


async def test_snapshot_start_and_trimmed_stream_reload(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    await start_ingest()
    first = [new_car_view(uid, 2, metro="803" if n % 3 else "501") for n, uid in enumerate(UIDS)]
    await produce(producer, settings.kafka.topic, first)
    await applied(redis_client, settings, len(first))

    writer = follower(redis_client, settings, rules)
    await writer.load_snapshot()
    assert set(writer.sources.values()) == {"bitmaps"}
    assert await writer.write_snapshots() == settings.kafka.partitions

    # A new replica starts from the snapshots and answers exactly like the one that wrote them.
    reader = follower(redis_client, settings, rules)
    await reader.load_snapshot()
    assert set(reader.sources.values()) == {"snapshot"}
    assert answers(reader, UIDS) == answers(writer, UIDS)
    assert reader.replica.populations() == writer.replica.populations()

    # The reader stops following; more events arrive; the streams are trimmed past its cursor.
    second = [new_car_view(uid, 1) for uid in UIDS[::2]]
    await produce(producer, settings.kafka.topic, second)
    await applied(redis_client, settings, len(first) + len(second))
    for p in range(settings.kafka.partitions):
        await redis_client.xtrim(
            PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).changes, maxlen=0
        )

    stop = asyncio.Event()
    task = asyncio.create_task(reader.follow(stop))
    try:
        await wait_until(lambda: reader.reloads >= 1, 10, "gap detection and reload")
        fresh = follower(redis_client, settings, rules)
        await fresh.load_snapshot()
        assert set(fresh.sources.values()) == {"bitmaps"}  # snapshots are behind the trim too
        await wait_until(lambda: answers(reader, UIDS) == answers(fresh, UIDS), 10, "convergence")
        assert (
            sum(1 for a in answers(fresh, UIDS).values() if "new_car_socal" in a) == 30
        )  # every re-viewed cookie (2nd view in LA)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
