"""Events in Kafka become segment answers over HTTP, on the real broker and store."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import new_car_view, produce, segments_of

ALL_THREE = ["auto_new_car_intent", "geo_socal", "new_car_socal"]


async def ready_lookup(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules
) -> TestClient[Any, Any]:
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)
    return client


async def poll_segments(
    client: TestClient[Any, Any], uid: str, want: list[str], timeout: float
) -> float:
    """Seconds until the lookup answers ``want`` for ``uid``."""
    started = time.monotonic()
    while True:
        got = await segments_of(client, uid)
        if got == want:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{uid}: still {got}, wanted {want}")
        await asyncio.sleep(0.01)


async def test_events_become_segments_within_a_second(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
) -> None:
    await start_ingest()
    client = await ready_lookup(aiohttp_client, settings, rules)
    topic = settings.kafka.topic

    await produce(producer, topic, [new_car_view("socal-buyer", 3), new_car_view("socal-buyer", 1)])
    assert await poll_segments(client, "socal-buyer", ALL_THREE, timeout=1.0) < 1.0

    await produce(
        producer,
        topic,
        [
            new_car_view("one-view", 1),  # one page view is not enough for intent
            new_car_view("ny-buyer", 2, metro="501", region="NY"),
            new_car_view("ny-buyer", 1, metro="501", region="NY"),
            new_car_view("old-la", 40),  # older than every window
        ],
    )
    await poll_segments(client, "ny-buyer", ["auto_new_car_intent"], timeout=1.0)
    await poll_segments(client, "one-view", ["geo_socal"], timeout=1.0)
    assert await segments_of(client, "old-la") == []
    assert await segments_of(client, "never-seen") == []


async def test_events_from_kcat(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    aiohttp_client: AiohttpClient,
) -> None:
    await start_ingest()
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat is missing: deploy/install.sh kcat installs it"
    client = await ready_lookup(aiohttp_client, settings, rules)
    lines = b"".join(
        b"kcat-buyer|" + orjson.dumps(new_car_view("kcat-buyer", age)) + b"\n" for age in (5, 2)
    )
    subprocess.run(
        [kcat, "-P", "-b", settings.kafka.bootstrap, "-t", settings.kafka.topic, "-K", "|"],
        input=lines,
        check=True,
        timeout=30,
    )
    assert await poll_segments(client, "kcat-buyer", ALL_THREE, timeout=1.0) < 1.0
