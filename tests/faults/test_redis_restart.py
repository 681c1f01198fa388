"""Redis restarts (AOF on) under load.

Nothing committed is lost; during the outage lookups keep answering from memory while
/readyz says degraded, and ingest retries the batch in hand with backoff without committing
Kafka offsets; afterwards both catch up by themselves, with no restart.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules, load_rules_file
from tests.faults.conftest import PrivateStack, run_as_other, scaled
from tests.faults.support import (
    Process,
    as_committed,
    committed_offsets,
    ingest_until,
    produce,
    service_env,
    started,
    state_snapshot,
    stored_offsets,
    stream_events,
    summarize_difference,
    wait_applied,
    wait_for,
)

EVENTS = scaled("DMP_FAULTS_REDIS_EVENTS", 20_000)


async def answers(client: Any, uids: list[str]) -> dict[str, list[str]]:
    out = {}
    for uid in uids:
        response = await client.get(f"/v1/users/{uid}/segments")
        assert response.status == 200
        out[uid] = (await response.json())["segments"]
    return out


async def readyz(client: Any) -> str:
    response = await client.get("/readyz")
    status: str = (await response.json())["status"]
    return status


async def test_redis_restart_loses_nothing_and_nobody_waits(
    settings: Settings,
    redis_client: aioredis.Redis,
    private_stack: PrivateStack,
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
) -> None:
    now = time.time()
    first = list(stream_events(EVENTS // 2, 2000, seed=41, now=now))
    # The second half: other cookies, so the first half's states must stay exactly as they were.
    second = [
        {**e, "uid": "late-" + e["uid"]} for e in stream_events(EVENTS // 2, 2000, seed=42, now=now)
    ]
    rules = CompiledRules(load_rules_file(settings.rules_path))
    lookup = await aiohttp_client(create_lookup_app(settings, rules))
    probe = sorted({e["uid"] for e in first})[:200]

    proc = Process("ingest", service_env(settings), tmp_path / "ingest.log")
    try:
        await started(proc)
        await produce(settings.kafka.bootstrap, settings.kafka.topic, first)
        await wait_applied(redis_client, settings, len(first))
        await wait_for(lambda: readyz(lookup), 20, "lookup ready")
        await wait_for(
            lambda: _same(
                answers(lookup, probe), _segments_in_redis(redis_client, settings, probe)
            ),
            20,
            "lookup caught up",
        )
        before_answers = await answers(lookup, probe)
        assert sum(1 for a in before_answers.values() if a) > 50
        before = await state_snapshot(redis_client, settings.redis.key_prefix)
        # Kafka gets the offsets Redis holds at most DMP_KAFKA_COMMIT_INTERVAL_MS later
        # (decision 0010): all of them, before the outage begins.
        applied = as_committed(await stored_offsets(redis_client, settings))
        await wait_for(
            lambda: _is(committed_offsets(settings), applied), 10, "Kafka offsets committed"
        )
        kafka_committed = await committed_offsets(settings)

        await asyncio.to_thread(private_stack.redis.stop)
        outage_started = time.monotonic()
        await produce(settings.kafka.bootstrap, settings.kafka.topic, second)
        # Lookups answer from memory, and say they no longer follow Redis.
        await wait_for(lambda: _is(readyz(lookup), "degraded"), 15, "/readyz degraded")
        assert await answers(lookup, probe) == before_answers
        await asyncio.sleep(2)
        assert proc.alive, proc.output()[-3000:]  # ingest waits, it does not crash
        assert await committed_offsets(settings) == kafka_committed  # nor commits to Kafka
        outage = time.monotonic() - outage_started
        await asyncio.to_thread(private_stack.redis.start)
        await redis_client.connection_pool.disconnect()  # the test's own pooled connections

        # Every committed write survived the restart (AOF): the first half's keys are intact.
        restarted = await state_snapshot(redis_client, settings.redis.key_prefix)
        for key, value in before.items():
            if ":offset" in key:
                assert int(restarted[key]) >= int(value)  # type: ignore[call-overload]  # bytes
            elif ":c:" in key:
                assert restarted[key] == value, key
        # Both catch up by themselves.
        await wait_applied(redis_client, settings, len(first) + len(second), timeout=120)
        await wait_for(lambda: _is(readyz(lookup), "ready"), 30, "/readyz ready again")
        late = sorted({e["uid"] for e in second})[:200]
        await wait_for(
            lambda: _same(answers(lookup, late), _segments_in_redis(redis_client, settings, late)),
            30,
            "lookup has the events sent during the outage",
        )
        assert proc.alive
        assert "Redis failed" in proc.output()
        assert "retried in 0.8s" in proc.output()  # the pause doubled while Redis was away
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()[-3000:]
    finally:
        if proc.alive:
            await proc.kill()

    clean = run_as_other(settings, "clean")
    await ingest_until(clean, redis_client, tmp_path / "clean.log", len(first) + len(second))
    after = await state_snapshot(redis_client, settings.redis.key_prefix)
    reference = await state_snapshot(redis_client, clean.redis.key_prefix)
    assert after == reference, summarize_difference(after, reference)
    print(f"\n{len(first) + len(second)} events; Redis down {outage:.1f}s; nothing lost")


async def _is(status: Any, wanted: object) -> bool:
    return bool(await status == wanted)


async def _same(a: Any, b: Any) -> bool:
    return bool(await a == await b)


async def _segments_in_redis(
    client: aioredis.Redis, settings: Settings, uids: list[str]
) -> dict[str, list[str]]:
    """What a fresh replica would answer: every cookie's memberships as Redis holds them."""
    from dmp.change_follower import ChangeFollower
    from dmp.metrics import LookupMetrics
    from dmp.replica import Replica

    rules = CompiledRules(load_rules_file(settings.rules_path))
    fresh = ChangeFollower(
        client,
        Replica(rules),
        LookupMetrics.create(),
        prefix=settings.redis.key_prefix,
        topic=settings.kafka.topic,
        block_ms=50,
    )
    await fresh.load_snapshot()
    return {uid: fresh.replica.segments(uid) for uid in uids}
