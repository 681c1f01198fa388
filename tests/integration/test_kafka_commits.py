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

from dmp.config import Settings
from tests.faults.support import as_committed, committed_offsets, stored_offsets, wait_applied
from tests.integration.conftest import RunningIngest, StartIngest
from tests.integration.helpers import new_car_view, produce

UIDS = [f"commit-{n}" for n in range(30)]


async def ingest_applied(
    settings: Settings,
    interval_ms: int,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> tuple[Settings, RunningIngest, dict[int, int]]:
    """Ingest running with this commit interval, once Redis holds every event's offset:
    (its settings, it, what Kafka should hold once committed: -1 where nothing was)."""
    s = replace(settings, kafka=replace(settings.kafka, commit_interval_ms=interval_ms))
    ingest = await start_ingest(s)
    await produce(producer, s.kafka.topic, [new_car_view(uid, 1) for uid in UIDS])
    await wait_applied(redis_client, s, len(UIDS), timeout=30)
    return s, ingest, as_committed(await stored_offsets(redis_client, s))


async def test_offsets_reach_kafka_within_the_interval_while_running(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    s, ingest, expected = await ingest_applied(settings, 300, start_ingest, producer, redis_client)
    seen: dict[int, int] = {}
    for _ in range(40):  # well within 0.3 s + a poll; 4 s of slack for a busy machine
        seen = await committed_offsets(s)
        if seen == expected:
            break
        await asyncio.sleep(0.1)
    assert seen == expected
    assert not ingest.task.done()


async def test_a_long_interval_commits_nothing_until_stop(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    s, ingest, expected = await ingest_applied(
        settings, 3_600_000, start_ingest, producer, redis_client
    )
    await asyncio.sleep(0.5)  # several polls: a commit per batch would have landed
    assert set((await committed_offsets(s)).values()) == {-1}
    await ingest.stop()
    assert await committed_offsets(s) == expected
