"""The broker restarts under load: ingest pauses, resumes by itself, and loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from dmp.config import Settings
from tests.faults.conftest import PrivateStack, run_as_other, scaled
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
    wait_applied,
)

EVENTS = scaled("DMP_FAULTS_KAFKA_EVENTS", 40_000)


async def test_broker_restart_under_load_loses_nothing(
    settings: Settings, redis_client: aioredis.Redis, private_stack: PrivateStack, tmp_path: Path
) -> None:
    events = list(stream_events(EVENTS, EVENTS // 10, seed=21, now=time.time()))
    half = len(events) // 2
    topic, bootstrap = settings.kafka.topic, settings.kafka.bootstrap
    await produce(bootstrap, topic, events[:half])
    proc = Process("ingest", service_env(settings), tmp_path / "ingest.log")
    try:
        await started(proc)
        async with asyncio.timeout(60):
            while sum((await stored_offsets(redis_client, settings)).values()) < half // 4:
                await asyncio.sleep(0.005)
        await asyncio.to_thread(private_stack.kafka.stop)
        during = await stored_offsets(redis_client, settings)
        await asyncio.sleep(3)
        assert proc.alive, proc.output()[-3000:]
        assert await stored_offsets(redis_client, settings) == during  # paused
        await asyncio.to_thread(private_stack.kafka.start)
        await produce(bootstrap, topic, events[half:])
        await wait_applied(redis_client, settings, len(events), timeout=180)
        assert proc.alive, "ingest resumed without a restart"
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()[-3000:]
    finally:
        if proc.alive:
            await proc.kill()

    clean = run_as_other(settings, "clean")
    await ingest_until(clean, redis_client, tmp_path / "clean.log", len(events))
    after = await state_snapshot(redis_client, settings.redis.key_prefix)
    reference = await state_snapshot(redis_client, clean.redis.key_prefix)
    assert after == reference, summarize_difference(after, reference)
    print(f"\n{len(events)} events, broker restarted after {sum(during.values())}: none lost")
