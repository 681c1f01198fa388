"""Who may write a partition: the rebalance listener waits for the batch in hand, and a
partition whose offset another writer moved is re-read from Redis, not dropped.

aiokafka calls the listener from its own task while run() may be in the middle of a batch
(GroupCoordinator._on_join_prepare), so these are real interleavings, not hypotheticals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import cast

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import RedisError

from dmp.config import RedisSettings, Settings
from dmp.ingest import IngestService, _Rebalance
from dmp.keys import PartitionKeys
from dmp.metrics import IngestMetrics
from dmp.partition_batch import BatchPlan
from dmp.partition_store import Fenced, PartitionStore
from dmp.redis_client import connect
from segment_rules import CompiledRules
from tests.faults.support import free_port
from tests.integration.conftest import StartIngest, wait_until
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


@pytest.mark.parametrize("cluster", [False, True])
async def test_a_redis_outage_does_not_hold_up_a_rebalance(
    settings: Settings,
    rules: CompiledRules,
    producer: AIOKafkaProducer,
    caplog: pytest.LogCaptureFixture,
    cluster: bool,
) -> None:
    """Redis never answers, so a batch waits and retries under the partitions' lock; a
    second member joins the group; the join must not wait for Redis (the group waits for a
    revoking member up to aiokafka's rebalance timeout, the session timeout by default)."""
    caplog.set_level(logging.INFO, logger="dmp.ingest")
    # A cluster client that reaches no node raises RedisClusterException, not RedisError.
    nowhere = connect(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", cluster=cluster))
    # aiokafka's rebalance timeout is the session timeout: past it the broker would drop
    # the stuck member and let the join finish anyway, so make it far longer than the wait.
    patient = replace(
        settings,
        kafka=replace(settings.kafka, session_timeout_ms=60_000, heartbeat_interval_ms=1_000),
    )
    service = IngestService(patient, rules, nowhere, IngestMetrics.create())
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    other = AIOKafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=settings.kafka.group_id,
    )
    try:
        await wait_until(lambda: len(service.partitions) == 2, 30, "assignment")
        await send_to_partition(producer, settings.kafka.topic, 0, ["waits-for-redis"])
        await wait_until(lambda: "batch retried in" in caplog.text, 30, "a retry")
        assert service._owned.locked(), "run() waits out Redis holding the partitions' lock"

        joining = time.monotonic()
        await other.start()  # joins the group: waits for the rebalance
        while not other.assignment():
            await other.getmany(timeout_ms=100)  # blocks while the group rebalances
        # A stuck member would hold the join until the 60 s rebalance timeout.
        assert time.monotonic() - joining < 20, "the join waited for Redis"
        assert "batch in hand was not applied" in caplog.text
    finally:
        await other.stop()
        stop.set()
        await asyncio.wait_for(running, 30)
        await nowhere.aclose()


async def test_a_stop_still_ends_a_retry_wait(
    settings: Settings, rules: CompiledRules, redis_client: aioredis.Redis
) -> None:
    service = IngestService(settings, rules, redis_client, IngestMetrics.create())
    service._stop.set()
    started = time.monotonic()
    assert await service._interrupted_within(30.0)
    assert time.monotonic() - started < 5.0


class _NoBeginning:
    """A consumer whose broker cannot say where a partition begins."""

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        raise KafkaConnectionError("no broker")


async def test_a_failed_reload_stays_pending(
    settings: Settings, rules: CompiledRules, redis_client: aioredis.Redis
) -> None:
    """Redis holds no offset, so a reload asks Kafka where the partition begins; when that
    fails the partition must still be reloaded before the next write, or the retried batch
    would be applied from wherever it began."""
    service = IngestService(settings, rules, redis_client, IngestMetrics.create())
    tp = TopicPartition(settings.kafka.topic, 0)
    keys = PartitionKeys(settings.redis.key_prefix, tp.topic, tp.partition)
    store = PartitionStore(redis_client, keys, state_ttl=60, stream_maxlen=100)
    service._reload.add(tp)
    with pytest.raises(KafkaConnectionError):
        await service._reload_store(cast(AIOKafkaConsumer, _NoBeginning()), tp, store)
    assert tp in service._reload


async def test_a_redis_that_stops_answering_mid_transaction_is_not_another_writer(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """redis-py raises WatchError when the connection fails while a key is watched. That is
    a Redis failure (retried with backoff, Redis marked down), not a fence."""
    impatient = connect(replace(settings.redis, socket_timeout_seconds=0.3))
    keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0)
    store = PartitionStore(impatient, keys, state_ttl=60, stream_maxlen=100)
    try:
        await store.load()
        # Writes wait (the offset's SET inside EXEC); the watch and its GET still answer.
        await redis_client.client_pause(3000, all=False)  # CLIENT PAUSE 3000 WRITE
        with pytest.raises(RedisError) as failed:
            await store.commit(BatchPlan(), 1, time.time())
        assert not isinstance(failed.value, Fenced)
    finally:
        await redis_client.client_unpause()
        await impatient.aclose()
    assert await stored_offset(redis_client, keys) in (0, 1)  # EXEC's fate is unknown
