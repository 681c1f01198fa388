"""``dmp rules backfill``: a paused segment built from Kafka's history under live traffic,
then switched on for lookups all at once."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.audience import Audience
from dmp.config import Settings
from dmp.keys import PartitionKeys
from dmp.lookup import REPLICA, create_lookup_app
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules, parse_rules
from tests.conftest import EXAMPLE_RULES
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import new_car_view, segments_of

DAY = 86400.0
V1 = EXAMPLE_RULES.read_text()
V2 = (
    V1
    + """
  - id: clickers
    status: paused
    rule: {at_least: 2, within: 14d, where: {field: type, equals: click}}

  - id: engaged
    status: paused
    rule: {at_least: 1, within: 30d, where: {field: type, in: [click, buy]}}
"""
)


def click(uid: str, age_days: float) -> dict[str, Any]:
    return {"uid": uid, "ts": time.time() - age_days * DAY, "type": "click"}


async def produce_at_event_time(
    producer: AIOKafkaProducer, topic: str, events: list[dict[str, Any]]
) -> None:
    """Kafka's timestamp is the event's, as a collector replaying its buffer would set it."""
    for event in events:
        await producer.send(
            topic,
            orjson.dumps(event),
            key=event["uid"].encode(),
            timestamp_ms=int(event["ts"] * 1000),
        )
    await producer.flush()


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "DMP_REDIS_URL": settings.redis.url,
        "DMP_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DMP_KAFKA_TOPIC": settings.kafka.topic,
        "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "DMP_LOG_LEVEL": "WARNING",
    }


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmp.cli", *args]


async def dmp_cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cli_command(*args),
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def applied_offsets(redis_client: aioredis.Redis, settings: Settings) -> int:
    total = 0
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        raw = await redis_client.get(keys.offset)
        total += int(raw) if raw is not None else 0
    return total


async def test_backfill_builds_a_paused_segment_under_live_traffic_and_flips_it_at_once(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    topic = settings.kafka.topic
    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    await versions.apply(V1, "v1.yaml")
    await start_ingest()
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)

    # History, all before the segment exists. 'ancient' clicks are inside the rule's 14 days
    # but outside the 8 days asked for; 'once' has one click only; 'mixed' gets its second
    # click live, after the segment is paused in.
    ancient = [f"ancient-{n}" for n in range(4)]
    history = [f"hist-{n}" for n in range(30)]
    once = [f"once-{n}" for n in range(6)]
    mixed = [f"mixed-{n}" for n in range(6)]
    events = [click(u, age) for u in ancient for age in (11, 10)]
    events += [click(u, age) for u in history for age in (5, 3)]
    events += [click(u, 4) for u in once + mixed]
    events += [new_car_view(u, 1) for u in history[:10]]  # also in other segments
    events.sort(key=lambda e: e["ts"])
    await produce_at_event_time(producer, topic, events)
    async with asyncio.timeout(20):
        while await applied_offsets(redis_client, settings) < len(events):
            await asyncio.sleep(0.05)

    await versions.apply(V2, "v2.yaml")  # clickers paused: fed and materialised, not served
    marks = [
        PartitionKeys(settings.redis.key_prefix, topic, p).rules_from
        for p in range(settings.kafka.partitions)
    ]
    async with asyncio.timeout(10):  # ingest took v2 (events before this are history)
        while not all([await redis_client.hexists(m, "2") for m in marks]):
            await asyncio.sleep(0.05)
    live_only = [f"live-{n}" for n in range(5)]
    live = [click(u, 0.5) for u in mixed] + [click(u, a) for u in live_only for a in (0.2, 0.1)]
    await produce_at_event_time(producer, topic, live)
    expected = set(history + mixed + live_only)
    everyone = [*ancient, *history, *once, *mixed, *live_only]
    audience = Audience(
        redis_client, settings.redis.key_prefix, topic, CompiledRules(parse_rules(V2))
    )
    async with asyncio.timeout(20):
        while await audience.estimate("clickers") < len(live_only):
            await asyncio.sleep(0.05)
    assert "clickers" not in await segments_of(client, "live-0")  # paused: hidden
    code, out, err = await dmp_cli(settings, "rules", "estimate", "clickers")
    assert code == 0, err
    assert out.startswith("clickers: ")
    assert "(paused: built, not answered by lookups)" in out

    # Lookups all through: in one synchronous pass over every cookie, clickers is either in
    # no answer or in exactly the expected ones, never a partial audience.
    replica = app[REPLICA]
    views: set[frozenset[str]] = set()

    async def watch() -> None:
        while True:
            views.add(frozenset(u for u in everyone if "clickers" in replica.segments(u)))
            await asyncio.sleep(0.005)

    # Live traffic all through, for cookies the backfill does not touch.
    async def traffic() -> None:
        n = 0
        while True:
            await produce_at_event_time(producer, topic, [new_car_view(f"bg-{n % 50}", 0.01)])
            n += 1
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(watch()), asyncio.create_task(traffic())]
    try:
        started = time.monotonic()
        code, out, err = await dmp_cli(settings, "rules", "backfill", "clickers", "--days", "8")
        took = time.monotonic() - started
        assert code == 0, err
        async with asyncio.timeout(10):
            while await segments_of(client, "hist-0") != ["geo_socal", "clickers"]:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert views == {frozenset(), frozenset(expected)}, [sorted(v) for v in views]
    for uid in ancient + once:
        assert "clickers" not in await segments_of(client, uid)
    assert await audience.estimate("clickers") == len(expected)
    assert "backfill events " in err  # the progress line (plain: stderr is not a terminal)
    assert "clickers@2: read " in out
    assert f"{len(history) * 2 + len(once) + len(mixed)} feed the segment" in out
    assert "version 3 is live: 'clickers' active" in out
    active = await versions.active()
    assert active is not None
    assert active.source == "backfill clickers (from v2)"
    print(f"backfill CLI wall time {took:.1f}s; {out.strip()}")

    # Each partition merged exactly once; no stage is left behind.
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, topic, p)
        assert await redis_client.hexists(keys.backfilled, "clickers@2")
        assert not await redis_client.exists(keys.backfill_stages)

    # More days than Kafka holds: all there is is read, and the command says how much.
    code, out, err = await dmp_cli(settings, "rules", "backfill", "engaged", "--days", "60")
    assert code == 0, err
    assert re.search(r"Kafka holds only 11\.\d of the 60 days asked", out), out
    assert "version 4 is live: 'engaged' active" in out
    assert await audience.estimate("engaged") == len(everyone)
    async with asyncio.timeout(10):
        while "engaged" not in await segments_of(client, "ancient-0"):
            await asyncio.sleep(0.02)


async def test_backfill_refusals(settings: Settings, redis_client: aioredis.Redis) -> None:
    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    code, _, err = await dmp_cli(settings, "rules", "backfill", "clickers", "--days", "1")
    assert code == 1
    assert "no rule version has been applied" in err
    await versions.apply(V2, "v2.yaml")
    code, _, err = await dmp_cli(settings, "rules", "backfill", "ghost", "--days", "1")
    assert code == 1
    assert "unknown segment 'ghost' in the live rule version 1" in err
    code, _, err = await dmp_cli(settings, "rules", "backfill", "geo_socal", "--days", "1")
    assert "'geo_socal' is active in the live rule version 1" in err
    # No ingest is running: nobody marks where live evaluation starts.
    code, _, err = await dmp_cli(
        settings, "rules", "backfill", "clickers", "--days", "1", "--wait", "1"
    )
    assert code == 1
    assert "ingest has not applied rule version 1 on partitions [0, 1] after 1s" in err
    assert (await versions.active_number()) == 1  # nothing was changed

    # Ctrl-C while it waits: a clean exit that says the segment stays paused.
    proc = await asyncio.create_subprocess_exec(
        *cli_command("rules", "backfill", "clickers", "--days", "1", "--wait", "60"),
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_sigint_as_at_a_terminal,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):  # past start-up (Kafka clients): waiting for ingest
            while True:
                line = await proc.stderr.readline()
                assert line, "the command ended before it waited for ingest"
                if b"waiting up to 60s for ingest" in line:
                    break
        proc.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:  # a failed wait above: never leave it running
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err_bytes.decode()
    assert "interrupted: 'clickers' stays paused" in err_bytes.decode()
    assert (await versions.active_number()) == 1


def _sigint_as_at_a_terminal() -> None:
    """In the child: Ctrl-C's default. Tests started in the background by a shell without job
    control (``sh -c '... &'``) run with SIGINT ignored, children inherit that, and the
    command would then rightly go on waiting."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
