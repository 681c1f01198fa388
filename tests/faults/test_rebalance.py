"""A second consumer joins the group mid-stream and leaves again: partitions move back and
forth, and the end state equals a clean run's."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from dmp.config import Settings
from tests.faults.conftest import run_as_other, scaled
from tests.faults.support import (
    Process,
    ingest_until,
    produce,
    service_env,
    started,
    state_snapshot,
    stored_offsets,
    stream_events,
    summarize_difference,
    topic_records,
    wait_applied,
)

EVENTS = scaled("DMP_FAULTS_REBALANCE_EVENTS", 40_000)


async def test_consumer_joins_and_leaves_mid_stream(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    events = list(stream_events(EVENTS, EVENTS // 10, seed=31, now=time.time()))
    env = service_env(settings)
    producing = asyncio.create_task(
        produce(settings.kafka.bootstrap, settings.kafka.topic, events, chunk=1000, pause=0.2)
    )
    first = Process("ingest", env, tmp_path / "first.log")
    second: Process | None = None
    try:
        await started(first)
        async with asyncio.timeout(60):
            while sum((await stored_offsets(redis_client, settings)).values()) < EVENTS // 5:
                await asyncio.sleep(0.01)
        second = Process("ingest", env, tmp_path / "second.log")
        await started(second)  # it owns partitions now: they moved from the first
        joined_at = sum((await stored_offsets(redis_client, settings)).values())
        async with asyncio.timeout(60):
            while sum((await stored_offsets(redis_client, settings)).values()) < joined_at + 4000:
                await asyncio.sleep(0.01)
        second.signal(signal.SIGTERM)  # leaves the group: its partitions go back
        assert await second.wait(30) == 0, second.output()[-3000:]
        left_at = sum((await stored_offsets(redis_client, settings)).values())
        await producing
        assert await topic_records(settings) == len(events), "the producer wrote one twice"
        await wait_applied(redis_client, settings, len(events), timeout=180)
        assert first.alive
        first.signal(signal.SIGTERM)
        assert await first.wait(30) == 0, first.output()[-3000:]
    finally:
        producing.cancel()
        for proc in (first, second):
            if proc is not None and proc.alive:
                await proc.kill()
    assert joined_at < left_at < len(events), "the second consumer came and went mid-stream"
    assert first.output().count("assigned") >= 2  # it got partitions back

    clean = run_as_other(settings, "clean")
    await ingest_until(clean, redis_client, tmp_path / "clean.log", len(events))
    after = await state_snapshot(redis_client, settings.redis.key_prefix)
    reference = await state_snapshot(redis_client, clean.redis.key_prefix)
    assert after == reference, summarize_difference(after, reference)
    print(f"\n{len(events)} events; a consumer joined at {joined_at}, left at {left_at}: no change")
