"""A small synthetic event stream for the Quick start: some cookies qualify, some don't."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

DAY = 86400.0
SOCAL_METROS = ("803", "825", "804")
OTHER_GEOS = (("USA", "NY", "501"), ("USA", "TX", "623"), ("USA", "CA", "807"))


def demo_events(cookies: int, seed: int, now: float) -> Iterator[dict[str, Any]]:
    """Events for ``cookies`` cookies; about a third are SoCal new-car intenders."""
    rng = random.Random(seed)
    for n in range(cookies):
        uid = f"demo-{n:05d}"
        kind = n % 3
        if kind == 0:  # qualifies for all three segments
            geo = {
                "country": "USA",
                "region": "CA",
                "metro": rng.choice(SOCAL_METROS),
                "zip": "90012",
            }
            views = 2 + rng.randrange(3)
        elif kind == 1:  # new-car intent elsewhere
            country, region, metro = rng.choice(OTHER_GEOS)
            geo = {"country": country, "region": region, "metro": metro}
            views = 2 + rng.randrange(2)
        else:  # SoCal, only one new-car view: not enough
            geo = {"country": "USA", "region": "CA", "metro": "803"}
            views = 1
        for _ in range(views):
            yield {
                "uid": uid,
                "ts": now - rng.uniform(0, 10 * DAY),
                "type": "page_view",
                "url": "https://cars.example/new/chevrolet-equinox",
                "categories": ["auto/new-cars", "auto/new-cars/suv"],
                "geo": geo,
            }


async def produce_demo(bootstrap: str, topic: str, cookies: int, seed: int) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    sent = 0
    try:
        for event in demo_events(cookies, seed, time.time()):
            await producer.send(topic, orjson.dumps(event), key=event["uid"].encode())
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent
