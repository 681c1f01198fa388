"""Hostile input never stops ingest: every bad event is dead-lettered with its reason and
every good one is applied.

The first test fuzzes the decoder and the rule engine in-process (many examples); the second
sends a hypothesis-generated stream through Kafka to a real `dmp ingest` process.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.events import BadEvent, decode_event
from dmp.keys import PartitionKeys
from dmp.partition_batch import plan_batch
from segment_rules import CompiledRules, load_rules_file
from tests.faults.conftest import scaled
from tests.faults.poison import Message, message
from tests.faults.support import FAULT_RULES, Process, service_env, started, wait_applied

RULES = CompiledRules(load_rules_file(FAULT_RULES))
PURE_EXAMPLES = scaled("DMP_FAULTS_POISON_PURE", 1500)
STREAM_MESSAGES = scaled("DMP_FAULTS_POISON_STREAM", 800)
QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


def decode(msg: Message, now: float) -> tuple[dict[str, Any] | None, str]:
    try:
        return decode_event(msg.value, msg.key, max_bytes=64 * 1024, now=now, max_future=3600), ""
    except BadEvent as exc:
        return None, exc.reason


@settings(max_examples=PURE_EXAMPLES, deadline=None, database=None, suppress_health_check=QUIET)
@given(st.data())
def test_decoder_and_rules_take_anything(data: st.DataObject) -> None:
    msg: Message = data.draw(message(0))
    now = time.time()
    event, reason = decode(msg, now)
    if event is None:
        assert not msg.good, f"good event refused: {reason}"
        assert reason
        return
    assert msg.good, f"{msg.kind} accepted"
    plan = plan_batch(RULES, [event], [], {}, 0, now)
    state = plan.states[event["uid"]]
    assert state.history  # the sports/ category always matches a trait
    assert CookieState.decode(state.encode()) == state


def generate_stream(count: int) -> list[Message]:
    collected: list[Message] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=QUIET,
    )
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        collected.append(data.draw(message(len(collected))))

    collect()
    return collected


async def read_all(settings: Settings, topic: str, count: int) -> list[tuple[object, ...]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_bytes=8 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    got: list[tuple[object, ...]] = []
    try:
        async with asyncio.timeout(60):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend((r.key, r.value, dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return got


async def test_poisoned_stream_through_a_real_consumer(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    stream = await asyncio.to_thread(generate_stream, STREAM_MESSAGES)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(settings.kafka.topic, m.value, key=m.key) for m in stream]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    where = {(md.partition, md.offset): m for md, m in zip(sent, stream, strict=True)}
    bad = {pos: m for pos, m in where.items() if not m.good}
    good = {pos: m for pos, m in where.items() if m.good}
    assert len(bad) > STREAM_MESSAGES // 4
    assert len(good) > STREAM_MESSAGES // 4

    proc = Process("ingest", service_env(settings), tmp_path / "ingest.log")
    try:
        await started(proc)
        await wait_applied(redis_client, settings, len(stream), timeout=120)
        dead = await read_all(settings, settings.kafka.dead_letter_topic, len(bad))
        assert proc.alive, proc.output()[-3000:]
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()[-3000:]
    finally:
        if proc.alive:
            await proc.kill()
    assert "Traceback" not in proc.output()

    # Every bad one is in the dead-letter topic once, with a reason, traceable to its offset.
    sources = {}
    for _key, _value, headers in dead:
        assert isinstance(headers, dict)
        topic, partition, offset = headers["dmp-source"].decode().rsplit(":", 2)
        assert topic == settings.kafka.topic
        sources[int(partition), int(offset)] = headers["dmp-reason"].decode()
    assert set(sources) == set(bad)
    assert all(sources.values())
    # Every good one was applied: its cookie has state, in the partition its key chose.
    for (partition, _), m in good.items():
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, partition)
        assert m.key is not None
        raw = await redis_client.get(keys.cookie(m.key.decode()))
        assert raw is not None, m
    kinds = sorted({m.kind for m in bad.values()})
    print(f"\n{len(stream)} messages ({len(bad)} bad of {len(kinds)} kinds): 0 crashes")
