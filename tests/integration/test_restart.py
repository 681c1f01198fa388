"""Restarting ingest and lookup changes no answer and applies no event twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.keys import PartitionKeys
from dmp.lookup import create_lookup_app
from dmp.redis_types import as_bytes
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import new_car_view, produce, segments_of

UIDS = [f"cookie-{n}" for n in range(40)]


async def stored_offsets(client: aioredis.Redis, settings: Settings) -> dict[int, int]:
    out = {}
    for p in range(settings.kafka.partitions):
        raw = await client.get(
            PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).offset
        )
        out[p] = int(raw) if raw is not None else 0
    return out


async def all_states(client: aioredis.Redis, settings: Settings) -> dict[str, Any]:
    states = {}
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        for uid in UIDS:
            raw = await client.get(keys.cookie(uid))
            if raw is not None:
                states[uid] = CookieState.decode(as_bytes(raw))
    return states


async def answers(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules
) -> dict[str, list[str]]:
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)
    result = {uid: await segments_of(client, uid) for uid in UIDS}
    await client.close()
    return result


async def test_restart_replays_nothing_twice(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    # Each cookie gets one new-car view: not yet enough for intent (needs 2).
    events = [new_car_view(uid, 3, metro="803" if n % 2 else "501") for n, uid in enumerate(UIDS)]
    await produce(producer, settings.kafka.topic, events)
    first = await start_ingest()
    await wait_until_offsets(redis_client, settings, len(events))
    await first.stop()
    before_states = await all_states(redis_client, settings)
    before_answers = await answers(aiohttp_client, settings, rules)
    assert sum(1 for a in before_answers.values() if a == ["geo_socal"]) == 20
    assert all(len(ts) == 1 for s in before_states.values() for ts in s.history.values())

    # A new group id has no committed offsets in Kafka, so Kafka alone would replay
    # everything from the start; the offsets stored in Redis must prevent that.
    replay = replace(
        settings, kafka=replace(settings.kafka, group_id=settings.kafka.group_id + "-2")
    )
    second = await start_ingest(replay)
    await produce(producer, settings.kafka.topic, [new_car_view("cookie-1", 1)])
    await wait_until_offsets(redis_client, settings, len(events) + 1)
    await second.stop()

    after_states = await all_states(redis_client, settings)
    after_answers = await answers(aiohttp_client, settings, rules)
    # Only cookie-1 changed: its second view (not a replayed first one) made it an intender.
    assert after_answers.pop("cookie-1") == ["auto_new_car_intent", "geo_socal", "new_car_socal"]
    before_answers.pop("cookie-1")
    assert after_answers == before_answers
    # Two views kept for intent (needs 2), one for SoCal geo (needs 1): none replayed.
    assert sorted(len(v) for v in after_states["cookie-1"].history.values()) == [1, 2]
    after_states.pop("cookie-1")
    before_states.pop("cookie-1")
    assert after_states == before_states


async def wait_until_offsets(client: aioredis.Redis, settings: Settings, total: int) -> None:
    for _ in range(1500):
        if sum((await stored_offsets(client, settings)).values()) >= total:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"offsets never reached {total}: {await stored_offsets(client, settings)}")
