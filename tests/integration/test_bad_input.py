"""Bad events land in the dead-letter topic with their reason; good ones around them apply."""

from __future__ import annotations

import asyncio

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.ids import uid_hash
from dmp.keys import PartitionKeys
from dmp.redis_types import as_bytes
from tests.integration.conftest import StartIngest
from tests.integration.helpers import new_car_view


async def read_dead_letters(settings: Settings, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        settings.kafka.dead_letter_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(20):
            while len(got) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


async def find_state(client: aioredis.Redis, settings: Settings, uid: str) -> CookieState | None:
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        raw = await client.get(keys.cookie(uid))
        if raw is not None:
            return CookieState.decode(as_bytes(raw))
    return None


async def test_bad_events_are_dead_lettered_and_good_ones_applied(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    topic = settings.kafka.topic
    # All on one key so they share a partition and their order is the offset order.
    uid = "mixed-cookie"
    good_before = orjson.dumps(new_car_view(uid, 2))
    good_after = orjson.dumps(new_car_view(uid, 1))
    wrong_type = new_car_view(uid, 1)
    wrong_type["ts"] = "yesterday"
    no_uid = new_car_view(uid, 1)
    del no_uid["uid"]
    huge = new_car_view(uid, 1)
    huge["attrs"] = {"blob": "x" * (2 * 1024 * 1024)}
    bad = [
        (b"{this is not json", "invalid JSON"),
        (orjson.dumps(no_uid), "missing or non-string uid"),
        (orjson.dumps(wrong_type), "ts must be a number (seconds since the epoch)"),
        (orjson.dumps(huge), "event is 2097"),
    ]
    await producer.send_and_wait(topic, good_before, key=uid.encode())
    for value, _ in bad:
        await producer.send_and_wait(topic, value, key=uid.encode())
    await producer.send_and_wait(topic, good_after, key=uid.encode())

    ingest = await start_ingest()
    dead = await read_dead_letters(settings, len(bad))
    assert len(dead) == len(bad)
    for record, (value, reason) in zip(dead, bad, strict=True):
        headers = dict(record.headers)
        assert headers["dmp-reason"].decode().startswith(reason)
        assert headers["dmp-source"].decode().startswith(f"{topic}:")
        assert record.key == uid.encode()
        if len(value) <= 512 * 1024:
            assert record.value == value
        else:  # kept under Kafka's default request size, the original size noted
            assert headers["dmp-truncated-from"] == str(len(value)).encode()
            assert record.value == value[: 512 * 1024]

    async with asyncio.timeout(20):
        while (state := await find_state(redis_client, settings, uid)) is None or not state.members:
            await asyncio.sleep(0.05)
    # Both good events counted: two new-car views make the intent segment.
    assert state.members == {"auto_new_car_intent", "geo_socal"}
    assert sorted(len(v) for v in state.history.values()) == [1, 2]
    rejected = ingest.service.metrics.events_rejected
    total = sum(
        rejected.labels(label)._value.get()  # reading the counter back
        for label in ("invalid_json", "schema", "bad_timestamp", "too_large")
    )
    assert total == len(bad)
    assert uid_hash(uid) > 0
