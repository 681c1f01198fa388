"""Hot reload and rollback with `dmp rules` while events stream through ingest and lookups run."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import segments_of

V1 = """segments:
  - id: clicked_twice
    rule: {at_least: 2, within: 1d, where: {field: type, equals: click}}
"""
# v2: a new base segment fed by page views, and a composite over the unchanged one.
V2 = (
    V1
    + """  - id: viewed
    rule: {within: 1d, where: {field: type, equals: page_view}}
  - id: twice_too
    of: {or: [clicked_twice]}
"""
)


async def dmp_rules(settings: Settings, *args: str) -> str:
    """Run `dmp rules ...` as its own process against the test's store; its stdout."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DMP_REDIS_URL": settings.redis.url,
        "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "DMP_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DMP_KAFKA_TOPIC": settings.kafka.topic,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dmp.cli",
        "rules",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_reload_and_rollback_under_live_events_and_lookups(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    (tmp_path / "v1.yaml").write_text(V1)
    (tmp_path / "v2.yaml").write_text(V2)
    topic = settings.kafka.topic
    assert "applied" in await dmp_rules(settings, "apply", str(tmp_path / "v1.yaml"))
    ingest = await start_ingest()
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app, 10)

    async def send(uid: str, kind: str) -> None:
        event = {"uid": uid, "ts": time.time(), "type": kind}
        await producer.send(topic, orjson.dumps(event), key=uid.encode())

    for _ in range(2):
        await send("steady", "click")
    await producer.flush()
    async with asyncio.timeout(10):
        while await segments_of(client, "steady") != ["clicked_twice"]:
            await asyncio.sleep(0.02)

    # Events stream all through the switch: round n gives cookie n a click and a page view,
    # and cookie n - 1 its second click. Lookups of a settled cookie run all the while.
    sent: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            n = len(sent)
            await send(f"c{n}", "click")
            await send(f"c{n}", "page_view")
            if n:
                await send(f"c{n - 1}", "click")
            sent.append(f"c{n}")
            await asyncio.sleep(0.01)
        await send(f"c{len(sent) - 1}", "click")
        await producer.flush()

    seen: set[tuple[str, ...]] = set()

    async def lookups() -> None:
        while True:
            seen.add(tuple(await segments_of(client, "steady")))
            await asyncio.sleep(0)

    producing = asyncio.create_task(traffic())
    looking = asyncio.create_task(lookups())
    try:
        await asyncio.sleep(0.3)
        assert await dmp_rules(settings, "diff", str(tmp_path / "v2.yaml")) == (
            "+ viewed: added\n+ twice_too: added\n"
        )
        before_apply = len(sent)
        assert "as version 2" in await dmp_rules(settings, "apply", str(tmp_path / "v2.yaml"))
        # Both services poll once a second; after that, everything sent counts under v2.
        await asyncio.sleep(1.5)
        switched = len(sent)
        await asyncio.sleep(0.5)
        stop.set()
        await producing
        async with asyncio.timeout(10):
            while await segments_of(client, "steady") != ["clicked_twice", "twice_too"]:
                await asyncio.sleep(0.02)
    finally:
        looking.cancel()
        stop.set()
    assert len(sent) - switched >= 5, "too little traffic after the switch to test it"
    # Every answer was one version's: never a half-applied one (no membership lost).
    assert seen <= {("clicked_twice",), ("clicked_twice", "twice_too")}
    assert not ingest.task.done()  # the same ingest, never restarted

    both = ["clicked_twice", "viewed", "twice_too"]
    async with asyncio.timeout(10):
        while await segments_of(client, sent[-1]) != both:
            await asyncio.sleep(0.02)
    answers = {uid: await segments_of(client, uid) for uid in sent}
    for n, uid in enumerate(sent):
        # No click lost or counted twice across the switch: everyone clicked twice.
        assert "clicked_twice" in answers[uid], (uid, answers[uid])
        # Page views before v2 fed no test; after the switch every one counts.
        if n < before_apply:
            assert answers[uid] == ["clicked_twice", "twice_too"], (uid, answers[uid])
        elif n >= switched:
            assert answers[uid] == both, (uid, answers[uid])

    # Rolling back is one command; ingest and lookup follow without a restart.
    assert "version 3 is live" in await dmp_rules(settings, "rollback")
    async with asyncio.timeout(10):
        while await segments_of(client, "steady") != ["clicked_twice"]:
            await asyncio.sleep(0.02)
    for kind in ("page_view", "click", "click"):
        await send("after", kind)
    await producer.flush()
    async with asyncio.timeout(10):
        while await segments_of(client, "after") != ["clicked_twice"]:
            await asyncio.sleep(0.02)
    assert await segments_of(client, sent[-1]) == ["clicked_twice"]
    assert not ingest.task.done()
