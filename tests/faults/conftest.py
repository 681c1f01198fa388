"""Fault-test fixtures: fresh topics and key prefixes per test, ingest run as a real process."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis

from dmp.config import Settings
from tests.conftest import delete_topics
from tests.faults.support import (
    FAULT_RULES,
    PrivateKafka,
    PrivateRedis,
    create_topic,
    delete_keys,
)

pytestmark = pytest.mark.integration


def fault_settings(
    base: Settings, *, bootstrap: str | None = None, redis_url: str | None = None
) -> Settings:
    """Own topic, group and key prefix; a short session so a killed consumer's partitions
    move within seconds; the fault rule file."""
    run = uuid.uuid4().hex[:10]
    return replace(
        base,
        rules_path=FAULT_RULES,
        kafka=replace(
            base.kafka,
            bootstrap=bootstrap or base.kafka.bootstrap,
            topic=f"f-{run}",
            dead_letter_topic=f"f-{run}.dlq",
            group_id=f"fg-{run}",
            partitions=4,
            session_timeout_ms=3000,
            heartbeat_interval_ms=500,
        ),
        redis=replace(base.redis, url=redis_url or base.redis.url, key_prefix=f"fault-{run}"),
    )


def run_as_other(settings: Settings, tag: str) -> Settings:
    """The same topic and Redis under another group and key prefix (a clean comparison run)."""
    return replace(
        settings,
        kafka=replace(settings.kafka, group_id=f"{settings.kafka.group_id}-{tag}"),
        redis=replace(settings.redis, key_prefix=f"{settings.redis.key_prefix}-{tag}"),
    )


def scaled(name: str, ci_default: int) -> int:
    """A size the CI run keeps small; loadtests/faults.py runs the full one (README.md)."""
    return int(os.environ.get(name, ci_default))


@dataclass
class PrivateStack:
    kafka: PrivateKafka
    redis: PrivateRedis
    base: Settings


@pytest.fixture(scope="session")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """A Kafka broker and a Redis of the fault tests' own, which they may stop and restart.

    Started by the deploy/ scripts (own DMP_STATE_DIR and ports), so the shared services
    that other tests use are never touched.
    """
    state = tmp_path_factory.mktemp("fault-stack")
    kafka = PrivateKafka(state)
    redis = PrivateRedis(state)
    redis.start()
    try:
        kafka.start()
    except BaseException:
        redis.stop()
        raise
    base = Settings.from_env(os.environ)
    base = replace(
        base,
        kafka=replace(base.kafka, bootstrap=kafka.bootstrap),
        redis=replace(base.redis, url=redis.url),
    )
    try:
        yield PrivateStack(kafka, redis, base)
    finally:
        kafka.stop()
        redis.stop()


@pytest.fixture
async def settings(private_stack: PrivateStack) -> AsyncIterator[Settings]:
    s = fault_settings(private_stack.base)
    await create_topic(s)
    yield s
    await delete_topics(s)
    client = aioredis.Redis.from_url(s.redis.url)
    try:
        await delete_keys(client, s.redis.key_prefix)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis.url)
    yield client
    await client.aclose()
