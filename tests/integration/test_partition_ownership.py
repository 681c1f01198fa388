"""Who may write a partition: the rebalance listener waits for the batch in hand, and a
partition whose offset another writer moved is re-read from Redis, not dropped.

aiokafka calls the listener from its own task while run() may be in the middle of a batch
(GroupCoordinator._on_join_prepare), so these are real interleavings, not hypotheticals.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from dmp.config import Settings
from dmp.ingest import IngestService, _Rebalance
from dmp.keys import PartitionKeys
from dmp.metrics import IngestMetrics
from dmp.partition_store import PartitionStore
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest
from tests.integration.helpers import new_car_view


async def send_to_partition(
    producer: AIOKafkaProducer, topic: str, partition: int, uids: list[str]
) -> None:
    for uid in uids:
        event = orjson.dumps(new_car_view(uid, 1))
        await producer.send(topic, event, key=uid.encode(), partition=partition)
    await producer.flush()


async def stored_offset(client: aioredis.Redis, keys: PartitionKeys) -> int:
    raw = await client.get(keys.offset)
    return int(raw) if raw is not None else 0


async def test_a_fenced_partition_continues_from_the_offset_redis_holds(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0)
    ingest = await start_ingest()
    await send_to_partition(producer, settings.kafka.topic, 0, [f"own-{n}" for n in range(5)])
    await wait_offset(redis_client, keys, 5)

    # Another writer (a consumer the group has already replaced, say) applied 5..7.
    await redis_client.set(keys.offset, 8)
    later = [f"after-{n}" for n in range(6)]  # offsets 5..10
    await send_to_partition(producer, settings.kafka.topic, 0, later)
    await wait_offset(redis_client, keys, 11)

    fenced = ingest.service.metrics.registry.get_sample_value("dmp_ingest_fenced_total")
    assert fenced is not None
    assert fenced >= 1
    assert 0 in {tp.partition for tp in ingest.service.partitions}, "still owned"
    # What the other writer claimed is its own; what came after it is ours, applied once.
    held = await redis_client.mget([keys.cookie(uid) for uid in later])
    assert [raw is not None for raw in held] == [False] * 3 + [True] * 3


async def wait_offset(client: aioredis.Redis, keys: PartitionKeys, offset: int) -> None:
    deadline = time.monotonic() + 30
    while (got := await stored_offset(client, keys)) != offset:
        assert time.monotonic() < deadline, f"offset {got}, never {offset}"
        await asyncio.sleep(0.05)


async def test_revoking_waits_for_the_batch_in_hand(
    settings: Settings, rules: CompiledRules, redis_client: aioredis.Redis
) -> None:
    service = IngestService(settings, rules, redis_client, IngestMetrics.create())
    tp = TopicPartition(settings.kafka.topic, 0)
    keys = PartitionKeys(settings.redis.key_prefix, tp.topic, tp.partition)
    service.partitions[tp] = PartitionStore(redis_client, keys, state_ttl=60, stream_maxlen=100)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)  # never started
    try:
        listener = _Rebalance(service, consumer)

        async with service._owned:  # as run() holds it while it works on a batch
            revoking = asyncio.create_task(listener.on_partitions_revoked([tp]))
            await asyncio.sleep(0.2)
            assert not revoking.done()
            assert tp in service.partitions, "revoked under a batch in hand"
            # A batch waiting out a Redis failure gives up at once rather than hold the group.
            started = time.monotonic()
            assert await service._interrupted_within(30.0)
            assert time.monotonic() - started < 5.0
        await asyncio.wait_for(revoking, 5.0)
        assert tp not in service.partitions
    finally:
        await consumer.stop()
    assert not await service._interrupted_within(0.01), "the rebalance is over"


async def test_a_stop_still_ends_a_retry_wait(
    settings: Settings, rules: CompiledRules, redis_client: aioredis.Redis
) -> None:
    service = IngestService(settings, rules, redis_client, IngestMetrics.create())
    service._stop.set()
    started = time.monotonic()
    assert await service._interrupted_within(30.0)
    assert time.monotonic() - started < 5.0
