"""Credentials on the wire to the stores: Redis `requirepass`, Kafka SASL/PLAIN on loopback.

Each test starts a private server through the deploy/ scripts (own state dir and ports)
with authentication on, and runs the real ingest and lookup against it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pytest_aiohttp import AiohttpClient
from redis.exceptions import AuthenticationError, ResponseError

from dmp.auth_transport import kafka_security_options
from dmp.config import Settings, describe
from dmp.ingest import IngestService
from dmp.lookup import create_lookup_app
from dmp.metrics import IngestMetrics
from dmp.topics import create_topics
from segment_rules import CompiledRules
from tests.faults.support import PrivateKafka, PrivateRedis
from tests.integration.conftest import wait_lookup_ready, wait_until
from tests.integration.helpers import new_car_view, produce, segments_of
from tests.integration.test_restart import wait_until_offsets

REDIS_PASSWORD = "redis-pw-4f1c"
KAFKA_USER, KAFKA_PASSWORD = "dmp-ingest", "kafka-pw-9e2a"
ALL = ["auto_new_car_intent", "geo_socal", "new_car_socal"]


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis-auth"), password=REDIS_PASSWORD)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kafka_with_sasl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    server = PrivateKafka(
        tmp_path_factory.mktemp("kafka-sasl"), sasl_users=f"{KAFKA_USER}:{KAFKA_PASSWORD},other:x"
    )
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def ingesting(
    settings: Settings, rules: CompiledRules, client: aioredis.Redis
) -> AsyncIterator[IngestService]:
    stop = asyncio.Event()
    service = IngestService(settings, rules, client, IngestMetrics.create())
    task = asyncio.create_task(service.run(stop))
    try:
        await wait_until(
            lambda: len(service.partitions) == settings.kafka.partitions or task.done(),
            30,
            "assignment",
        )
        if task.done():
            task.result()  # raise what stopped it
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def start_with(settings: Settings, rules: CompiledRules, client: aioredis.Redis) -> None:
    async with ingesting(settings, rules, client):
        pass


async def test_redis_requirepass(
    settings: Settings,
    rules: CompiledRules,
    producer: AIOKafkaProducer,
    redis_with_password: PrivateRedis,
    aiohttp_client: AiohttpClient,
) -> None:
    url = redis_with_password.url
    assert REDIS_PASSWORD in url
    without = url.replace(f":{REDIS_PASSWORD}@", "")
    anonymous = aioredis.Redis.from_url(without)
    with pytest.raises((AuthenticationError, ResponseError)):
        await anonymous.ping()
    await anonymous.aclose()

    s = replace(settings, redis=replace(settings.redis, url=url))
    client = aioredis.Redis.from_url(url)
    try:
        async with ingesting(s, rules, client):
            await produce(
                producer, s.kafka.topic, [new_car_view("pw-user", d + 1) for d in range(2)]
            )
            await wait_until_offsets(client, s, 2)
            app = create_lookup_app(s, rules)
            lookup = await aiohttp_client(app)
            await wait_lookup_ready(app, 10)
            assert await segments_of(lookup, "pw-user") == ALL

            # Without the password a replica never loads: not ready, and it answers nothing.
            blind = await aiohttp_client(
                create_lookup_app(replace(s, redis=replace(s.redis, url=without)), rules)
            )
            await asyncio.sleep(0.5)
            assert (await blind.get("/readyz")).status == 503
            assert await segments_of(blind, "pw-user") == []
    finally:
        await client.flushdb()
        await client.aclose()
    # `dmp config` never prints the password.
    assert REDIS_PASSWORD not in str(describe(s))


async def test_kafka_sasl_plain(
    settings: Settings,
    rules: CompiledRules,
    redis_client: aioredis.Redis,
    kafka_with_sasl: PrivateKafka,
    tmp_path: Path,
) -> None:
    sasl = replace(
        settings.kafka,
        bootstrap=f"127.0.0.1:{kafka_with_sasl.sasl_port}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=KAFKA_USER,
        sasl_password=KAFKA_PASSWORD,
    )
    s = replace(settings, kafka=sasl)
    await create_topics(s.kafka)
    producer = AIOKafkaProducer(bootstrap_servers=sasl.bootstrap, **kafka_security_options(sasl))
    await producer.start()
    try:
        await produce(producer, sasl.topic, [new_car_view("sasl-user", d + 1) for d in range(2)])
    finally:
        await producer.stop()
    async with ingesting(s, rules, redis_client):
        await wait_until_offsets(redis_client, s, 2)
    assert KAFKA_PASSWORD not in str(describe(s))

    # A wrong password is refused at the door: ingest does not start.
    wrong = replace(s, kafka=replace(sasl, sasl_password="wrong", group_id=sasl.group_id + "-x"))
    with pytest.raises(KafkaError):
        await asyncio.wait_for(start_with(wrong, rules, redis_client), 60)
