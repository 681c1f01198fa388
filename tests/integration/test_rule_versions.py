"""Rule versions: hot reload under live traffic, rollback, and audience arithmetic."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.audience import Audience
from dmp.config import Settings
from dmp.lookup import create_lookup_app
from dmp.rule_versions import RuleVersions, diff_rules
from segment_rules import CompiledRules, RuleFileError
from tests.conftest import EXAMPLE_RULES
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import new_car_view, produce, segments_of

V1 = EXAMPLE_RULES.read_text()
# v2: geo_socal paused, a new composite, and a new base segment fed by clicks.
V2 = (
    V1.replace(
        "    owner: adops-geo\n",
        "    owner: adops-geo\n    status: paused\n",
    )
    + """
  - id: intent_anywhere
    of: {or: [auto_new_car_intent]}

  - id: clicker
    rule: {at_least: 1, within: 1d, where: {field: type, equals: click}}
"""
)


async def test_hot_reload_rollback_and_audience(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    await start_ingest()
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)
    topic = settings.kafka.topic
    buyers = [f"buyer-{n}" for n in range(10)]
    await produce(producer, topic, [new_car_view(u, age) for u in buyers for age in (3, 1)])
    await produce(
        producer, topic, [new_car_view(f"ny-{n}", a, "501", "NY") for n in range(5) for a in (2, 1)]
    )
    v1_answer = ["auto_new_car_intent", "geo_socal", "new_car_socal"]
    # Every buyer, not one: the buyers sit in different partitions, applied at different times.
    async with asyncio.timeout(10):
        for uid in buyers:
            while await segments_of(client, uid) != v1_answer:
                await asyncio.sleep(0.02)

    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    assert diff_rules(V1, V2) == [
        "+ intent_anywhere: added",
        "+ clicker: added",
        "~ geo_socal: changed status",
    ]
    await versions.apply(V1, "v1.yaml")

    # Lookups run all through the switch; each answer is one version's, never a mix.
    v2_answer = ["auto_new_car_intent", "intent_anywhere"]
    seen: set[tuple[str, ...]] = set()

    async def hammer() -> None:
        while True:
            seen.add(tuple(await segments_of(client, "buyer-3")))
            await asyncio.sleep(0)

    task = asyncio.create_task(hammer())
    try:
        await versions.apply(V2, "v2.yaml")
        async with asyncio.timeout(10):
            while await segments_of(client, "buyer-3") != v2_answer:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
    assert seen <= {tuple(v1_answer), tuple(v2_answer)}
    assert tuple(v2_answer) in seen
    # Only the version in force is reported, or one replica would look like a split fleet.
    text = await (await client.get("/metrics")).text()
    versions_reported = [ln for ln in text.splitlines() if ln.startswith("dmp_rule_set_info{")]
    assert len(versions_reported) == 1, versions_reported

    # Ingest picked up the new base segment without a restart.
    click = {"uid": "clicky", "ts": new_car_view("x", 0)["ts"], "type": "click"}
    await producer.send_and_wait(topic, orjson.dumps(click), key=b"clicky")
    async with asyncio.timeout(10):
        while await segments_of(client, "clicky") != ["clicker"]:
            await asyncio.sleep(0.02)

    # A bad version is refused whole; the live one stays.
    with pytest.raises(RuleFileError) as refused:
        await versions.apply("segments:\n  - id: x\n    of: {and: [ghost]}\n", "bad.yaml")
    assert str(refused.value.errors[0]).startswith("bad.yaml:3:")
    assert (await versions.active_number()) == 2

    rolled = await versions.rollback()
    assert rolled.number == 3
    async with asyncio.timeout(10):
        while await segments_of(client, "buyer-3") != v1_answer:
            await asyncio.sleep(0.02)

    audience = Audience(redis_client, settings.redis.key_prefix, topic, rules)
    assert await audience.estimate("auto_new_car_intent") == 15
    assert await audience.estimate("geo_socal") == 10
    assert await audience.estimate("new_car_socal") == 10
    (overlap,) = await audience.overlap(["auto_new_car_intent", "geo_socal"])
    assert (overlap.both, overlap.a_total, overlap.b_total) == (10, 15, 10)
    assert round(overlap.percent_of_a, 1) == 66.7
    sample = await audience.sample("new_car_socal", 3)
    assert len(sample) == 3
    assert set(sample) <= set(buyers)
