"""SIGTERM in the middle of a backlog: the batch in hand is applied whole or not at all, the
offsets are committed (Redis and Kafka agree), and the process exits within the drain bound."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from pyroaring import BitMap

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.ids import chunk_of
from dmp.keys import PartitionKeys
from dmp.partition_batch import plan_batch
from dmp.redis_types import as_bytes
from segment_rules import CompiledRules, load_rules_file
from tests.faults.conftest import scaled
from tests.faults.support import (
    Process,
    committed_offsets,
    produce,
    service_env,
    started,
    state_snapshot,
    stored_offsets,
    stream_events,
)

EVENTS = scaled("DMP_FAULTS_STOP_EVENTS", 60_000)
# A batch is at most DMP_KAFKA_MAX_BATCH events per partition: well under a second of work.
DRAIN_BOUND_SECONDS = 10.0


async def read_partitions(settings: Settings, ends: dict[int, int]) -> dict[int, list[bytes]]:
    """Each partition's event values, offsets 0 to ends[p] - 1."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    out: dict[int, list[bytes]] = defaultdict(list)
    try:
        tps = [TopicPartition(settings.kafka.topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(60):
            while any(len(out[p]) < end for p, end in ends.items()):
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        if r.offset < ends[tp.partition] and r.value is not None:
                            out[tp.partition].append(r.value)
    finally:
        await consumer.stop()
    return out


def expected_state(
    settings: Settings, values: dict[int, list[bytes]], now: float
) -> dict[str, object]:
    """What exactly the first ends[p] events of every partition make, planned in one go."""
    rules = CompiledRules(load_rules_file(settings.rules_path))
    out: dict[str, object] = {}
    for p, raws in values.items():
        keys = PartitionKeys("", settings.kafka.topic, p)
        events = [orjson.loads(v) for v in raws]
        plan = plan_batch(rules, events, [], {}, 0, now)
        chunks: dict[str, BitMap] = {}
        for uid, state in plan.states.items():
            out[keys.cookie(uid)] = state
            for seg in state.members:
                key = keys.bitmap(seg, chunk_of(state.local))
                chunks.setdefault(key, BitMap()).add(state.local)
        out.update({k: list(v) for k, v in chunks.items()})
    return out


async def test_sigterm_mid_backlog_applies_whole_batches_and_commits(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    events = list(stream_events(EVENTS, EVENTS // 8, seed=11, now=time.time()))
    await produce(settings.kafka.bootstrap, settings.kafka.topic, events)
    proc = Process("ingest", service_env(settings), tmp_path / "ingest.log")
    try:
        await started(proc)
        async with asyncio.timeout(60):
            while sum((await stored_offsets(redis_client, settings)).values()) < EVENTS // 10:
                await asyncio.sleep(0.005)
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await proc.wait(DRAIN_BOUND_SECONDS + 20)
        drained = time.monotonic() - signalled
    finally:
        if proc.alive:
            await proc.kill()
    assert code == 0, proc.output()[-3000:]
    assert drained < DRAIN_BOUND_SECONDS
    offsets = await stored_offsets(redis_client, settings)
    assert 0 < sum(offsets.values()) < EVENTS, "stopped mid-stream"
    # Kafka's committed offsets (lag, monitoring) were committed after the last transaction.
    assert await committed_offsets(settings) == {p: o or -1 for p, o in offsets.items()}

    # Whole batches only: Redis holds exactly what the first `offset` events make.
    state = await state_snapshot(redis_client, settings.redis.key_prefix)
    stored = {
        k: CookieState.decode(as_bytes(v)) if ":c:" in k and isinstance(v, bytes) else v
        for k, v in state.items()
        if ":c:" in k or ":bm:" in k
    }
    values = await read_partitions(settings, offsets)
    assert stored == expected_state(settings, values, time.time())
    print(f"\nSIGTERM after {sum(offsets.values())} of {EVENTS} events; exit 0 in {drained:.2f}s")
