"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaProducer

DAY = 86400.0


def new_car_view(
    uid: str, age_days: float, metro: str = "803", region: str = "CA"
) -> dict[str, Any]:
    return {
        "uid": uid,
        "ts": time.time() - age_days * DAY,
        "type": "page_view",
        "url": "https://cars.example/new/chevrolet-equinox",
        "categories": ["auto/new-cars", "auto/new-cars/suv"],
        "geo": {"country": "USA", "region": region, "metro": metro, "zip": "90012"},
    }


async def produce(producer: AIOKafkaProducer, topic: str, events: list[dict[str, Any]]) -> None:
    for event in events:
        await producer.send(topic, orjson.dumps(event), key=event["uid"].encode())
    await producer.flush()


async def segments_of(client: TestClient[Any, Any], uid: str) -> list[str]:
    response = await client.get(f"/v1/users/{uid}/segments")
    assert response.status == 200, await response.text()
    doc = await response.json()
    assert doc["uid"] == uid
    segments: list[str] = doc["segments"]
    return segments
