"""Destinations on the real stack: Kafka -> ingest -> change streams -> exporter -> a real
HTTP receiver on 127.0.0.1 (or files), across a crash and restart of the exporter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from bidder_adapter.partner_file import parse_partner_bytes
from bidder_adapter.partner_metrics import PartnerMetrics
from bidder_adapter.partner_registry import PartnerRegistry
from bidder_adapter.profiles import PartnerProfile, hash_api_key
from dmp.config import Settings
from dmp.destinations import DestinationMetrics, Exporter
from dmp.destinations_keys import DestinationKeys
from dmp.destinations_service import DestinationService
from dmp.destinations_sinks import FileSink, HttpSink
from dmp.match_table import MatchTableStore
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import partner_yaml, write_partners
from tests.conftest import EXAMPLE_RULES
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce

DAY = 86400.0
INTENT, GEO = "g-intent", "g-geo"


def gamma_yaml(destination: str, base: str | None = None) -> str:
    """A third partner granted two base segments, plainly mapped, with a destination."""
    return (partner_yaml() if base is None else base) + (
        "  - partner_id: gamma-dsp\n"
        "    kind: dsp\n"
        f"    api_key_sha256: {hash_api_key('gamma-key-0004')}\n"
        "    granted_segments: [auto_new_car_intent, geo_socal]\n"
        f"    segment_id_map: {{auto_new_car_intent: {INTENT}, geo_socal: {GEO}}}\n"
        "    output_format: ids\n"
        "    segtax: 700\n"
        "    data_provider_id: dmp.example\n"
        "    data_provider_name: Example DMP\n"
        "    max_segments: 5\n"
        "    user_id_sources: [cookie, buyeruid]\n"
        f"    destination: {destination}\n"
    )


def gamma(destination: str) -> PartnerProfile:
    return parse_partner_bytes(gamma_yaml(destination).encode(), "p.yaml").profiles["gamma-dsp"]


def following(
    settings: Settings, path: Path, registry: CollectorRegistry | None = None
) -> tuple[Settings, PartnerRegistry]:
    """Settings for a destinations service re-reading the partner file ``path`` every
    0.05 s, and its partner registry, loaded."""
    s = replace(
        settings,
        partners_path=path,
        partner=replace(settings.partner, reload_poll_seconds=0.05),
    )
    partners = PartnerRegistry(path, PartnerMetrics.create(registry or CollectorRegistry()))
    partners.load()
    return s, partners


@dataclass
class Receiver:
    """A partner's endpoint: applies each batch once (by Idempotency-Key), strictly."""

    state: dict[str, set[str]] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    fail_next: int = 0
    hang_at_batch: int | None = None
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        body = await request.read()
        assert request.content_type == "application/x-ndjson"
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503)
        if key in self.bodies:
            self.duplicates.append(key)
            if self.bodies[key] != body:
                self.violations.append(f"{key} resent with different bytes")
            return web.Response(status=200)
        self.bodies[key] = body
        seq = int(request.headers["X-Dmp-Batch"])
        self.order.append(seq)
        for line in body.splitlines():
            self.apply(orjson.loads(line))
        if seq == self.hang_at_batch:
            self.hanging.set()
            await self.release.wait()  # applied, but the sender never hears back
        return web.Response(status=204)

    def apply(self, line: dict[str, Any]) -> None:
        user = str(line["user_id"])
        have = self.state.setdefault(user, set())
        for seg in line["add"]:
            if seg in have:
                self.violations.append(f"{user}: {seg} added twice")
            have.add(seg)
        for seg in line["remove"]:
            if seg not in have:
                self.violations.append(f"{user}: {seg} removed but not there")
            have.discard(seg)


@contextlib.asynccontextmanager
async def serving(rec: Receiver) -> AsyncIterator[str]:
    """``rec`` served on a free local port: its /segments URL."""
    app = web.Application()
    app.router.add_post("/segments", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/segments"
    finally:
        rec.release.set()
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    async with serving(rec) as url:
        yield rec, url


def exporter(
    client: aioredis.Redis,
    settings: Settings,
    rules: CompiledRules,
    profile: PartnerProfile,
    session: aiohttp.ClientSession,
    metrics: DestinationMetrics,
) -> Exporter:
    assert profile.destination is not None
    sink = (
        HttpSink(profile.destination, session)
        if profile.destination.kind == "http"
        else FileSink(profile.destination)
    )
    return Exporter(
        client,
        profile,
        rules,
        sink,
        metrics,
        prefix=settings.redis.key_prefix,
        state_prefix="dest",
        topic=settings.kafka.topic,
    )


async def produce_users(
    producer: AIOKafkaProducer, topic: str, stay: int, expire: int
) -> dict[str, set[str]]:
    """Users that stay in intent + geo, and users whose intent lapses a few seconds from now."""
    events = []
    truth: dict[str, set[str]] = {}
    for i in range(stay):
        uid = f"stay-{i}"
        events += [new_car_view(uid, 2), new_car_view(uid, 1)]
        truth[uid] = {INTENT, GEO}
    lapse = 14 - 3 / DAY  # the 14-day intent window closes 3 s from now
    for i in range(expire):
        uid = f"lapse-{i}"
        events += [new_car_view(uid, lapse), new_car_view(uid, lapse)]
        truth[uid] = {GEO}
    # Two users at a time: many small change entries, so batches end at many entry bounds.
    for i in range(0, len(events), 4):
        await produce(producer, topic, events[i : i + 4])
    return truth


async def test_export_survives_a_crash_mid_run_without_loss_or_duplicates(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    receiver: tuple[Receiver, str],
) -> None:
    rec, url = receiver
    profile = gamma(
        f"{{kind: http, url: '{url}', batch_size: 4, interval_seconds: 0.05, retry_max_seconds: 0.2}}"
    )
    await start_ingest()
    truth = await produce_users(producer, settings.kafka.topic, stay=20, expire=8)
    registry = CollectorRegistry()
    metrics = DestinationMetrics.create(registry)
    rec.hang_at_batch = 3
    rec.fail_next = 2  # the first batch is refused twice: retried with backoff
    async with aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        first = asyncio.create_task(
            exporter(redis_client, settings, rules, profile, session, metrics).run(stop)
        )
        await asyncio.wait_for(rec.hanging.wait(), 20)
        # Crash: batch 3 reached the receiver, but the exporter dies before it hears back.
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
        assert int((await redis_client.hgetall(keys.pending))[b"seq"]) == 3
        rec.release.set()

        stop = asyncio.Event()
        second = asyncio.create_task(
            exporter(redis_client, settings, rules, profile, session, metrics).run(stop)
        )
        try:
            await wait_until(lambda: rec.state == truth, 30, "the receiver to match the truth")
        finally:
            stop.set()
            await asyncio.wait_for(second, 10)
    assert rec.violations == []
    assert rec.duplicates == ["gamma-dsp-3"]  # the resend of the batch in flight, dropped
    assert rec.order == list(range(1, len(rec.order) + 1))  # no batch number skipped
    assert await redis_client.exists(keys.pending) == 0
    sample = registry.get_sample_value
    assert sample("dmp_destination_send_failures_total", {"destination": "gamma-dsp"}) == 2
    assert sample("dmp_destination_batches_total", {"destination": "gamma-dsp"}) == len(rec.order)
    assert sample("dmp_destination_users_total", {"destination": "gamma-dsp"}) == sum(
        len(body.splitlines()) for body in rec.bodies.values()
    )
    removed = [
        line
        for body in rec.bodies.values()
        for line in map(orjson.loads, body.splitlines())
        if line["remove"]
    ]
    assert {line["user_id"] for line in removed} == {f"lapse-{i}" for i in range(8)}


async def test_graceful_restart_and_file_sink_with_partner_ids(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    out = tmp_path / "exports"
    profile = gamma(
        f"{{kind: file, path: '{out}', batch_size: 3, interval_seconds: 0.05, user_id: partner}}"
    )
    store = MatchTableStore(
        redis_client, prefix=settings.redis.key_prefix, ttl_days=30, stream_maxlen=1000
    )
    for i in range(6):
        await store.record("gamma-dsp", f"G{i}", f"stay-{i}")
    await start_ingest()
    await produce_users(producer, settings.kafka.topic, stay=10, expire=0)
    registry = CollectorRegistry()
    metrics = DestinationMetrics.create(registry)

    def lines() -> list[dict[str, Any]]:
        return [
            orjson.loads(line)
            for path in sorted(out.glob("*.jsonl"))
            for line in path.read_bytes().splitlines()
        ]

    def state() -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for line in lines():
            have = result.setdefault(str(line["user_id"]), set())
            have |= set(line["add"])
            have -= set(line["remove"])
        return result

    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # run, stop cleanly part way, run again
            stop = asyncio.Event()
            task = asyncio.create_task(
                exporter(redis_client, settings, rules, profile, session, metrics).run(stop)
            )
            await wait_until(lambda: len(list(out.glob("*.jsonl"))) >= 1, 20, "a file")
            stop.set()
            await asyncio.wait_for(task, 10)
        stop = asyncio.Event()
        task = asyncio.create_task(
            exporter(redis_client, settings, rules, profile, session, metrics).run(stop)
        )
        want = {f"G{i}": {INTENT, GEO} for i in range(6)}
        try:
            await wait_until(lambda: state() == want, 20, "all synced users exported")
            await asyncio.sleep(0.3)  # nothing more may arrive
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    names = sorted(p.name for p in out.glob("*"))
    assert names == [f"gamma-dsp-{i:012d}.jsonl" for i in range(1, len(names) + 1)]
    seen = [(line["user_id"], seg) for line in lines() for seg in line["add"]]
    assert len(seen) == len(set(seen))  # no add twice
    assert state() == want  # users never synced with gamma (stay-6..9) are left out
    skipped = registry.get_sample_value(
        "dmp_destination_skipped_users_total", {"destination": "gamma-dsp", "reason": "no_match"}
    )
    assert skipped is not None
    assert skipped >= 4


async def test_composite_grants_follow_whole_memberships(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    receiver: tuple[Receiver, str],
) -> None:
    """acme is granted the composite new_car_socal: it comes and goes with its parts."""
    rec, url = receiver
    destination = f"    destination: {{kind: http, url: '{url}', interval_seconds: 0.05}}\n"
    profile = parse_partner_bytes(
        partner_yaml(destination=destination).encode(), "p.yaml"
    ).profiles["acme-dsp"]
    await start_ingest()
    truth = await produce_users(producer, settings.kafka.topic, stay=6, expire=4)
    both = {"acme-new-vehicles", "acme-socal-dealers"}
    want = {uid: (both if uid.startswith("stay") else set()) for uid in truth}
    async with aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        task = asyncio.create_task(
            exporter(
                redis_client, settings, rules, profile, session, DestinationMetrics.create()
            ).run(stop)
        )
        try:
            await wait_until(lambda: rec.state == want, 30, "composite adds and removals")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert rec.violations == []


async def test_service_follows_the_partner_file(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    out = tmp_path / "exports"
    path = tmp_path / "partners.yaml"
    write_partners(path, gamma_yaml(f"{{kind: file, path: '{out}', interval_seconds: 0.05}}"))
    registry = CollectorRegistry()
    s, partners = following(settings, path, registry)
    await start_ingest()
    await produce_users(producer, settings.kafka.topic, stay=2, expire=0)
    async with aiohttp.ClientSession() as session:
        service = DestinationService(
            s, rules, redis_client, partners, DestinationMetrics.create(registry), session
        )
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            await wait_until(lambda: any(out.glob("*.jsonl")), 20, "an export file")
            assert list(service.running) == ["gamma-dsp"]
            write_partners(path, partner_yaml())  # gamma and its destination removed
            await wait_until(lambda: not service.running, 10, "the exporter to stop")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_a_paused_segment_reaches_no_partner_until_a_version_makes_it_active(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    receiver: tuple[Receiver, str],
    tmp_path: Path,
) -> None:
    """geo_socal paused by the applied version (the file has it active): ingest builds its
    bitmaps (decision 0005), but neither gamma (granted it plainly) nor acme (granted the
    composite intent AND geo) is sent it; once a version activates it, later changes go out."""
    rec, url = receiver
    out = tmp_path / "exports"
    text = EXAMPLE_RULES.read_text()
    paused = text.replace("  - id: geo_socal\n", "  - id: geo_socal\n    status: paused\n", 1)
    assert paused != text
    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    await versions.apply(paused, "geo paused")
    path = write_partners(
        tmp_path / "partners.yaml",
        gamma_yaml(
            f"{{kind: file, path: '{out}', interval_seconds: 0.05}}",
            base=partner_yaml(
                destination=f"    destination: {{kind: http, url: '{url}', interval_seconds: 0.05}}\n"
            ),
        ),
    )
    s, partners = following(settings, path)
    await start_ingest()
    await produce_users(producer, settings.kafka.topic, stay=6, expire=0)

    def gamma_state() -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for p in sorted(out.glob("*.jsonl")):
            for line in map(orjson.loads, p.read_bytes().splitlines()):
                have = result.setdefault(str(line["user_id"]), set())
                have |= set(line["add"])
                have -= set(line["remove"])
        return result

    def sent() -> set[str]:
        """Every partner segment id gamma or acme was ever sent, added or removed."""
        bodies = [p.read_bytes() for p in out.glob("*.jsonl")] + list(rec.bodies.values())
        return {
            seg
            for body in bodies
            for line in map(orjson.loads, body.splitlines())
            for seg in line["add"] + line["remove"]
        }

    async with aiohttp.ClientSession() as session:
        service = DestinationService(
            s, rules, redis_client, partners, DestinationMetrics.create(), session
        )
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            intent_only = {f"stay-{i}": {INTENT} for i in range(6)}
            await wait_until(lambda: gamma_state() == intent_only, 30, "gamma's intent adds")
            acme = {f"stay-{i}": {"acme-new-vehicles"} for i in range(6)}
            await wait_until(lambda: rec.state == acme, 30, "acme's intent adds")
            # The geo bitmaps are there: only the exporter keeps them from the partners.
            keys = [k async for k in redis_client.scan_iter(match="*:bm:geo_socal:*")]
            assert [k for k in keys if k.decode().startswith(settings.redis.key_prefix)]
            await asyncio.sleep(0.5)  # nothing more may arrive
            assert sent() == {INTENT, "acme-new-vehicles"}

            await versions.apply(text, "geo active")
            await asyncio.sleep(0.5)  # the service polls versions every 0.05 s
            events = []
            for i in range(3):
                events += [new_car_view(f"late-{i}", 1), new_car_view(f"late-{i}", 0)]
            await produce(producer, settings.kafka.topic, events)
            late = {f"late-{i}": {INTENT, GEO} for i in range(3)}
            await wait_until(
                lambda: late.items() <= gamma_state().items(), 30, "gamma's adds once live"
            )
            both = {"acme-new-vehicles", "acme-socal-dealers"}
            await wait_until(
                lambda: all(rec.state.get(f"late-{i}") == both for i in range(3)),
                30,
                "acme's composite once its parts are live",
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert rec.violations == []


def _command_env(settings: Settings, partners: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DMP_REDIS_URL": settings.redis.url,
        "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "DMP_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DMP_KAFKA_TOPIC": settings.kafka.topic,
        "DMP_RULES_PATH": str(settings.rules_path),
        "DMP_PARTNERS_PATH": str(partners),
        "DMP_PARTNER_RELOAD_POLL_SECONDS": "0.1",
        "DMP_LOG_FORMAT": "text",
    }


async def test_dmp_destinations_command_exports_and_stops_on_sigterm(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    tmp_path: Path,
) -> None:
    out = tmp_path / "exports"
    path = write_partners(
        tmp_path / "partners.yaml",
        gamma_yaml(f"{{kind: file, path: '{out}', interval_seconds: 0.05}}"),
    )
    await start_ingest()
    await produce_users(producer, settings.kafka.topic, stay=2, expire=0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dmp.cli",
        "destinations",
        env=_command_env(settings, path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(lambda: any(out.glob("*.jsonl")), 30, "the command's first export")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, stderr.decode()
    lines = [
        orjson.loads(line) for p in out.glob("*.jsonl") for line in p.read_bytes().splitlines()
    ]
    assert {line["user_id"] for line in lines} <= {"stay-0", "stay-1"}


async def test_dmp_destinations_refuses_a_bad_partner_file(
    settings: Settings, tmp_path: Path
) -> None:
    path = write_partners(
        tmp_path / "partners.yaml", partner_yaml().replace("segtax: 600", "segtax: 3")
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dmp.cli",
        "destinations",
        env=_command_env(settings, path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert f"{path}:" in stderr.decode()
    assert "partners[0].segtax: must be 4 or >= 500, got 3" in stderr.decode()
