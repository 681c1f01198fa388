"""Time on the real stack: cookies leave segments when windows and TTLs lapse, no event needed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules, parse_rules
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import DAY, segments_of

RULES = """segments:
  - id: intent
    rule:
      at_least: 2
      within: 14d
      where: {field: categories, prefix: auto/new-cars}
  - id: clicked_recently
    ttl: 2d
    rule: {at_least: 1, within: 30d, where: {field: type, equals: click}}
  - id: level1
    of: {and: [intent, clicked_recently]}
  - id: level2
    of: {or: [level1]}
  - id: level3
    of: {and: [level2, intent]}
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_window_and_ttl_lapse_without_new_events(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
) -> None:
    rules = CompiledRules(parse_rules(RULES, "time.yaml"))
    clock = Clock()
    s = replace(settings, ingest=replace(settings.ingest, max_future_seconds=400 * DAY))
    await start_ingest(s, rules, clock)
    app = create_lookup_app(s, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)

    start = clock.now
    first, second = start - 10 * DAY, start - 5 * DAY
    events = [
        {"uid": "u", "ts": first, "type": "page_view", "categories": ["auto/new-cars/suv"]},
        {"uid": "u", "ts": second, "type": "page_view", "categories": ["auto/new-cars"]},
        {"uid": "u", "ts": start - DAY, "type": "click"},
    ]
    for e in events:
        await producer.send_and_wait(settings.kafka.topic, orjson.dumps(e), key=b"u")
    all_five = ["intent", "clicked_recently", "level1", "level2", "level3"]
    async with asyncio.timeout(10):
        while await segments_of(client, "u") != all_five:
            await asyncio.sleep(0.02)

    # One second before the click's TTL runs out: still in; at it: out (composites follow).
    clock.now = start - DAY + 2 * DAY - 1
    await asyncio.sleep(1.5)
    assert await segments_of(client, "u") == all_five
    clock.now = start - DAY + 2 * DAY + 0.5
    async with asyncio.timeout(5):
        while await segments_of(client, "u") != ["intent"]:
            await asyncio.sleep(0.02)

    # The first page view leaves the 14-day window: intent needs 2 and has 1 left.
    clock.now = first + 14 * DAY - 1
    await asyncio.sleep(1.5)
    assert await segments_of(client, "u") == ["intent"]
    clock.now = first + 14 * DAY + 0.5
    async with asyncio.timeout(5):
        while await segments_of(client, "u") != []:
            await asyncio.sleep(0.02)
