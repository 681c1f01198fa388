"""Real-stack fixtures: a fresh topic pair, group and Redis key prefix for every test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer

from bidder_adapter.app_keys import MATCH_FOLLOWER
from dmp.config import Settings
from dmp.ingest import IngestService
from dmp.lookup import FOLLOWER
from dmp.metrics import IngestMetrics
from dmp.privacy_routes import PRIVACY_FOLLOWER
from dmp.topics import create_topics
from segment_rules import CompiledRules, load_rules_file
from tests.conftest import EXAMPLE_RULES, delete_topics

pytestmark = pytest.mark.integration


def _reachable(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


@pytest.fixture(scope="session")
def stack(base_settings: Settings) -> Settings:
    """Fail loudly (never skip) when the real services are not running."""
    kafka = base_settings.kafka.bootstrap
    redis_hostport = base_settings.redis.url.split("//", 1)[1].split("/", 1)[0]
    missing = [n for n, hp in (("Kafka", kafka), ("Redis", redis_hostport)) if not _reachable(hp)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not reachable: start them with deploy/services.sh start"
        )
    return base_settings


@pytest.fixture
async def settings(stack: Settings) -> AsyncIterator[Settings]:
    run = uuid.uuid4().hex[:10]
    s = replace(
        stack,
        kafka=replace(
            stack.kafka,
            topic=f"t-{run}",
            dead_letter_topic=f"t-{run}.dlq",
            group_id=f"g-{run}",
            partitions=2,
        ),
        redis=replace(stack.redis, key_prefix=f"test-{run}"),
        rules_path=EXAMPLE_RULES,
    )
    await create_topics(s.kafka)
    yield s
    await delete_topics(s)
    client = aioredis.Redis.from_url(s.redis.url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{s.redis.key_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def rules() -> CompiledRules:
    return CompiledRules(load_rules_file(EXAMPLE_RULES))


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", max_request_size=4 * 1024 * 1024
    )
    await p.start()
    yield p
    await p.stop()


class RunningIngest:
    """An IngestService running in a task of the test's loop, stopped like SIGTERM would."""

    def __init__(
        self, service: IngestService, task: asyncio.Task[None], stop: asyncio.Event
    ) -> None:
        self.service = service
        self.task = task
        self.stop_event = stop

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout=30)

    async def wait_assigned(self, count: int, timeout: float = 30.0) -> None:
        await wait_until(
            lambda: len(self.service.partitions) >= count, timeout, "partition assignment"
        )


StartIngest = Callable[..., Awaitable[RunningIngest]]


@pytest.fixture
async def start_ingest(
    settings: Settings, rules: CompiledRules, redis_client: aioredis.Redis
) -> AsyncIterator[StartIngest]:
    running: list[RunningIngest] = []

    async def start(
        s: Settings | None = None,
        r: CompiledRules | None = None,
        clock: Callable[[], float] = time.time,
    ) -> RunningIngest:
        service = IngestService(
            s or settings, r or rules, redis_client, IngestMetrics.create(), clock
        )
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        ingest = RunningIngest(service, task, stop)
        running.append(ingest)
        await ingest.wait_assigned((s or settings).kafka.partitions)
        return ingest

    yield start
    for ingest in running:
        if not ingest.task.done():
            await ingest.stop()


async def wait_lookup_ready(app: web.Application, timeout: float = 10) -> None:
    """Until the lookup app's followers are loaded, as /readyz asks: the replica, the
    suppression list (until it is loaded every cookie is answered as in nothing) and, with
    partner routes, the match table."""
    followers: list[Any] = [app[FOLLOWER], app[PRIVACY_FOLLOWER]]
    if MATCH_FOLLOWER in app:
        followers.append(app[MATCH_FOLLOWER])
    await wait_until(lambda: all(f.ready.is_set() for f in followers), timeout, "lookup readiness")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
