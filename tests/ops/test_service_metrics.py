"""The services' metrics tell the truth, on the real Kafka and Redis (plus a Redis we kill)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pyroaring import BitMap
from pytest_aiohttp import AiohttpClient

from dmp.change_follower import ChangeFollower
from dmp.config import Settings
from dmp.keys import PartitionKeys
from dmp.logs import JsonFormatter
from dmp.lookup import METRICS, create_lookup_app
from dmp.metrics import IngestMetrics, LookupMetrics
from dmp.redis_types import as_bytes
from dmp.replica import Replica
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest, wait_lookup_ready, wait_until
from tests.integration.helpers import new_car_view, produce
from tests.ops.test_logs import free_port

pytestmark = pytest.mark.integration
BASE_SEGMENTS = ("auto_new_car_intent", "geo_socal")


def value(metrics: IngestMetrics | LookupMetrics, name: str, **labels: str) -> float | None:
    """One sample of the metrics' own exposition (what Prometheus would scrape)."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@pytest.fixture
def ingest_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dmp.ingest")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


async def test_ingest_reports_lag_batches_connections_and_batch_ids(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    ingest_log: io.StringIO,
) -> None:
    # One event per batch, and a backlog waiting before the consumer starts: lag must show.
    s = replace(settings, kafka=replace(settings.kafka, max_batch=1))
    good = [new_car_view(f"lagging-{n % 40}", 1 + n % 3) for n in range(400)]
    await produce(producer, s.kafka.topic, good)
    await producer.send_and_wait(s.kafka.topic, b"{not json", key=b"broken-cookie")

    ingest = await start_ingest(s)
    metrics = ingest.service.metrics
    highest_lag = 0.0
    deadline = time.monotonic() + 30
    while (value(metrics, "dmp_ingest_events_applied_total") or 0) < len(good):
        assert time.monotonic() < deadline, "ingest did not apply the backlog"
        for partition in ("0", "1"):
            lag = value(metrics, "dmp_ingest_consumer_lag_messages", partition=partition)
            highest_lag = max(highest_lag, lag or 0.0)
        await asyncio.sleep(0.01)
    assert highest_lag > 0, "a backlog of 400 events never showed as consumer lag"

    def caught_up() -> bool:
        lags = [value(metrics, "dmp_ingest_consumer_lag_messages", partition=p) for p in ("0", "1")]
        return lags == [0.0, 0.0]

    await wait_until(caught_up, 10, "consumer lag back to 0 on both partitions")
    assert value(metrics, "dmp_kafka_connected") == 1
    assert value(metrics, "dmp_redis_connected") == 1
    assert value(metrics, "dmp_ingest_events_rejected_total", reason="invalid_json") == 1
    assert value(metrics, "dmp_ingest_events_consumed_total") == len(good) + 1
    assert value(metrics, "dmp_rule_set_info", version=rules.version[:12]) == 1
    for histogram in (
        "dmp_ingest_rule_evaluation_duration_seconds",
        "dmp_ingest_redis_transaction_duration_seconds",
        "dmp_ingest_produce_to_commit_seconds",
        "dmp_ingest_batch_duration_seconds",
    ):
        assert (value(metrics, f"{histogram}_count") or 0) >= len(good), histogram

    # The dead-letter warning names its batch: topic, partition and offsets, one event here.
    lines = [orjson.loads(line) for line in ingest_log.getvalue().splitlines()]
    warning = next(line for line in lines if "dead-lettered" in line["msg"])
    match = re.fullmatch(rf"{re.escape(s.kafka.topic)}:([01]):(\d+)-(\d+)", warning["batch_id"])
    assert match is not None, warning
    assert match.group(2) == match.group(3)
    assert f"offset {match.group(2)}:" in warning["msg"]


async def redis_truth(client: aioredis.Redis, settings: Settings) -> dict[str, int]:
    """Members per base segment, counted from the bitmaps in Redis."""
    truth = dict.fromkeys(BASE_SEGMENTS, 0)
    for partition in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, partition)
        async for key in client.scan_iter(match=keys.bitmap_pattern):
            segment, _ = keys.parse_bitmap_key(as_bytes(key).decode())
            truth[segment] += len(BitMap.deserialize(as_bytes(await client.get(key))))
    return truth


class SlowSnapshotReads(aioredis.Redis):
    """The real Redis with 30 ms added to each MGET, so that a snapshot spans commits."""

    async def mget(self, keys: Any, *args: Any) -> Any:
        await asyncio.sleep(0.03)
        return await super().mget(keys, *args)


async def test_segment_populations_stay_exact_when_snapshots_overlap_writes(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    """Snapshots taken while ingest commits replay entries the bitmaps already hold.

    Each replica must count those once: its populations end equal to Redis's bitmaps.
    """
    ingest = await start_ingest()
    slow_client = SlowSnapshotReads.from_url(settings.redis.url)
    stop = asyncio.Event()
    followers: list[ChangeFollower] = []
    tasks: list[asyncio.Task[None]] = []
    overlapped = 0

    expiring = 0

    async def write() -> None:
        nonlocal expiring
        for n in range(60):
            batch = []
            for i in range(20):
                uid = f"pop-{n}-{i}"
                if i % 5 == 0:
                    # Joins geo_socal now and leaves it two seconds later (30-day window).
                    batch.append(new_car_view(uid, 30 - 2 / 86400))
                    expiring += 1
                else:
                    batch += [new_car_view(uid, 2)] * (1 + i % 2)
            await produce(producer, settings.kafka.topic, batch)
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(write())
    try:
        while not writer.done() or not followers:
            follower = ChangeFollower(
                slow_client,
                Replica(rules),
                LookupMetrics.create(),
                prefix=settings.redis.key_prefix,
                topic=settings.kafka.topic,
                block_ms=50,
            )
            await follower.load_snapshot()
            overlapped += follower.overlapped_loads  # did a load overlap a commit?
            followers.append(follower)
            tasks.append(asyncio.create_task(follower.follow(stop)))
            await asyncio.sleep(0.03)
        await writer
        assert overlapped, "no snapshot overlapped a commit: the test proved nothing"
        removed = ingest.service.metrics.membership_changes.labels("removed")
        await wait_until(
            lambda: removed._value.get() >= expiring, 15, "expired memberships removed"
        )

        truth: dict[str, int] = {}

        async def settled() -> bool:
            nonlocal truth
            truth = await redis_truth(redis_client, settings)
            return all(f.replica.populations() == truth for f in followers)

        deadline = time.monotonic() + 15
        while not await settled():
            if time.monotonic() > deadline:
                wrong = [
                    f.replica.populations() for f in followers if f.replica.populations() != truth
                ]
                raise AssertionError(f"Redis has {truth}; replicas say {wrong}")
            await asyncio.sleep(0.1)
        assert truth == {"auto_new_car_intent": 60 * 8, "geo_socal": 60 * 16}
        for follower in followers:
            for segment, members in truth.items():
                exposed = value(follower.metrics, "dmp_replica_segment_members", segment=segment)
                assert exposed == members
        # Sized at snapshot load, then every few seconds: the last one loaded data.
        assert (value(followers[-1].metrics, "dmp_replica_bitmap_bytes") or 0) > 0
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5)
        if not writer.done():
            writer.cancel()
        await slow_client.aclose()


@contextlib.asynccontextmanager
async def own_redis(folder: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Redis of our own, so that the test may kill it."""
    proc = await asyncio.create_subprocess_exec(
        "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)),
        stdout=asyncio.subprocess.DEVNULL,
    )
    client = aioredis.Redis(port=port)
    try:
        await wait_for_async(client.ping, 10, "own redis-server")
        yield proc
    finally:
        await client.aclose()
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=10)


async def wait_for_async(probe: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await probe():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_replica_reports_redis_loss_and_recovery(
    tmp_path: Path, rules: CompiledRules, aiohttp_client: AiohttpClient
) -> None:
    port = free_port()
    settings = Settings.from_env({"DMP_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    metrics = app[METRICS]

    # Redis not there yet: not ready, and it says why.
    await wait_until(lambda: value(metrics, "dmp_redis_connected") == 0, 10, "redis down")
    assert value(metrics, "dmp_lookup_ready") == 0
    assert (await client.get("/readyz")).status == 503

    async with own_redis(tmp_path, port) as redis_proc:
        await wait_lookup_ready(app, 15)
        await wait_until(lambda: value(metrics, "dmp_redis_connected") == 1, 10, "connected")
        assert value(metrics, "dmp_lookup_ready") == 1
        assert (value(metrics, "dmp_replica_change_stream_lag_seconds") or 0) < 1
        assert (await client.get("/readyz")).status == 200
        redis_proc.kill()
        await redis_proc.wait()

        await wait_until(lambda: value(metrics, "dmp_redis_connected") == 0, 10, "loss seen")
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["status"] == "degraded"
        await wait_until(
            lambda: (value(metrics, "dmp_replica_change_stream_lag_seconds") or 0) > 1,
            10,
            "change-stream lag to grow while Redis is gone",
        )
        assert (value(metrics, "dmp_replica_follow_errors_total") or 0) > 0

    async with own_redis(tmp_path, port):
        await wait_until(lambda: value(metrics, "dmp_redis_connected") == 1, 15, "recovery")
        await wait_until(
            lambda: value(metrics, "dmp_replica_change_stream_lag_seconds") == 0, 5, "lag 0"
        )
        # Ready once every follower is back: the suppression list's may still be in its
        # back-off (1.6 s in a red CI run on a busy machine, which asked at once).
        deadline = time.monotonic() + 10
        while (status := (await client.get("/readyz")).status) != 200:
            assert time.monotonic() < deadline, f"/readyz still {status} 10 s after recovery"
            await asyncio.sleep(0.1)
