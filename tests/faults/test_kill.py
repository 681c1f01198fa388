"""SIGKILL the ingest process at random instants of a stream: the end state equals a clean run.

Every bitmap chunk, cookie state (history counters and memberships), id array, position
counter, due time and offset is compared key by key with a run that was never interrupted,
over the same events in another key prefix. CI runs a reduced stream; the full one (200,000
events, 10 kills) is `python -m loadtests.faults` (tests/faults/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis

from dmp.config import Settings
from tests.faults.conftest import run_as_other, scaled
from tests.faults.support import (
    Process,
    count_kinds,
    ingest_until,
    produce,
    service_env,
    state_snapshot,
    stored_offsets,
    stream_events,
    summarize_difference,
    wait_applied,
)

log = logging.getLogger(__name__)
EVENTS = scaled("DMP_FAULTS_EVENTS", 40_000)
KILLS = scaled("DMP_FAULTS_KILLS", 4)
COOKIES = max(1000, EVENTS // 10)
CYCLE_SECONDS = 4.5  # start, join the group (the killed member's session lapses), work


async def test_sigkill_at_random_instants_equals_a_clean_run(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(20261129)
    events = list(stream_events(EVENTS, COOKIES, seed=4, now=time.time()))
    # The stream keeps arriving while the consumer is being killed, about as fast as the
    # kill cycles go, so each restarted consumer finds a backlog and is killed working on it.
    pause = KILLS * CYCLE_SECONDS / (len(events) / 1000)
    producing = asyncio.create_task(
        produce(settings.kafka.bootstrap, settings.kafka.topic, events, chunk=1000, pause=pause)
    )
    env = service_env(settings)
    kills = 0
    kills_with_backlog = 0
    try:
        while kills < KILLS:
            proc = Process("ingest", env, tmp_path / f"kill-{kills}.log")
            try:
                before = sum((await stored_offsets(redis_client, settings)).values())
                # Let it make progress (it owns partitions and commits), then kill it at a
                # random instant of its work.
                deadline = time.monotonic() + 60
                while sum((await stored_offsets(redis_client, settings)).values()) == before:
                    assert proc.alive, proc.output()[-3000:]
                    assert time.monotonic() < deadline, "no progress: " + proc.output()[-3000:]
                    await asyncio.sleep(0.01)
                await asyncio.sleep(rng.uniform(0.0, 0.25))
                at = sum((await stored_offsets(redis_client, settings)).values())
                kills_with_backlog += at < len(events)
            finally:
                await proc.kill()
            kills += 1
            log.info("kill %d at %d applied events", kills, at)
        await producing
        final = Process("ingest", env, tmp_path / "final.log")
        try:
            await wait_applied(redis_client, settings, len(events), timeout=300)
            final.signal(signal.SIGTERM)
            assert await final.wait(30) == 0, final.output()[-3000:]
        finally:
            if final.alive:
                await final.kill()
    finally:
        if not producing.done():
            producing.cancel()

    clean = run_as_other(settings, "clean")
    await ingest_until(clean, redis_client, tmp_path / "clean.log", len(events))

    killed_state = await state_snapshot(redis_client, settings.redis.key_prefix)
    clean_state = await state_snapshot(redis_client, clean.redis.key_prefix)
    assert killed_state == clean_state, summarize_difference(killed_state, clean_state)
    kinds = count_kinds(clean_state)
    assert kinds["offsets"] == settings.kafka.partitions
    assert kinds["bitmap chunks"] > 0
    assert kinds["cookie states"] > COOKIES // 2
    assert sum((await stored_offsets(redis_client, settings)).values()) == len(events)
    assert kills_with_backlog == KILLS  # every kill landed while events were still pending
    print(f"\n{len(events)} events, {kills} SIGKILLs, {kinds} identical to a clean run")
