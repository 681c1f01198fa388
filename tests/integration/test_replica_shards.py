"""Two lookup replicas owning id shards (0/2 and 1/2) answer, through the sharded bidder
client, every cookie exactly as one full replica does: real Kafka, Redis, `dmp ingest` and
three `dmp lookup` processes (docs/scaling.md, Replica sharding)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bidder_adapter.client import ClientConfig, ClientMetrics, DmpClient
from bidder_adapter.sharded_client import ShardedClientConfig, ShardedDmpClient
from dmp.config import Settings
from dmp.demo_events import produce_demo
from dmp.keys import PartitionKeys
from dmp.shards import partition_of, shard_of
from dmp.topics import create_topics
from tests.bidder_adapter.partner_yaml import ACME_KEY, BETA_KEY, partner_yaml, write_partners
from tests.conftest import REPO, delete_topics

PARTITIONS = 4
COOKIES = 600
UNKNOWN = [f"nobody-{n}" for n in range(40)]  # never seen: [] from their shard, 421 elsewhere


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """One `dmp` process with its stderr in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    started: float = field(default_factory=time.monotonic)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))


class Services:
    def __init__(self, settings: Settings, folder: Path) -> None:
        self.folder = folder
        self.running: list[Service] = []
        self.env = {
            **os.environ,
            "DMP_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
            "DMP_KAFKA_TOPIC": settings.kafka.topic,
            "DMP_KAFKA_DEAD_LETTER_TOPIC": settings.kafka.dead_letter_topic,
            "DMP_KAFKA_GROUP_ID": settings.kafka.group_id,
            "DMP_KAFKA_PARTITIONS": str(settings.kafka.partitions),
            "DMP_REDIS_URL": settings.redis.url,
            "DMP_REDIS_CLUSTER": "1" if settings.redis.cluster else "0",
            "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
            "DMP_RULES_PATH": str(settings.rules_path),
            "DMP_PARTNERS_PATH": str(write_partners(folder / "partners.yaml", partner_yaml())),
            "DMP_LOG_FORMAT": "text",
            "DMP_LOOKUP_FOLLOW_BLOCK_MS": "50",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def start(self, name: str, command: str, **env: str) -> Service:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            # Real processes are the point; Popen returns at once.
            proc = subprocess.Popen(
                [sys.executable, "-m", "dmp.cli", command],
                env={**self.env, **env},
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        service = Service(name, proc, log)
        self.running.append(service)
        return service

    def lookup(self, name: str, shard: str, snapshot_interval: float) -> Service:
        port = _free_port()
        service = self.start(
            name,
            "lookup",
            DMP_LOOKUP_PORT=str(port),
            DMP_LOOKUP_SHARD=shard,
            DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS=str(snapshot_interval),
        )
        service.url = f"http://127.0.0.1:{port}"
        return service

    async def stop(self, service: Service) -> None:
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(service.proc.wait, 30)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                await asyncio.to_thread(service.proc.wait, 10)

    async def stop_all(self) -> None:
        for service in reversed(self.running):
            await self.stop(service)


@pytest.fixture
async def sharded_settings(settings: Settings) -> AsyncIterator[Settings]:
    """The test's topic pair, but with four partitions: two per shard."""
    s = replace(
        settings,
        kafka=replace(
            settings.kafka,
            topic=f"{settings.kafka.topic}-4",
            dead_letter_topic=f"{settings.kafka.topic}-4.dlq",
            partitions=PARTITIONS,
        ),
    )
    await create_topics(s.kafka)
    yield s
    await delete_topics(s)


@pytest.fixture
async def services(sharded_settings: Settings, tmp_path: Path) -> AsyncIterator[Services]:
    running = Services(sharded_settings, tmp_path)
    try:
        yield running
    finally:
        await running.stop_all()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, dict[str, str]]:
    async with http.get(url) as response:
        body = await response.json(content_type=None)
        return response.status, body, dict(response.headers)


async def _wait_ready(http: aiohttp.ClientSession, service: Service, timeout: float) -> float:
    """Seconds from the process start to /readyz 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert service.proc.poll() is None, service.log.read_text()[-3000:]
        try:
            status, _, _ = await _get(http, f"{service.url}/readyz")
            if status == 200:
                return time.monotonic() - service.started
        except aiohttp.ClientError:
            pass  # not listening yet: poll again until the deadline
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service.name} not ready after {timeout}s")


async def _gauge(http: aiohttp.ClientSession, service: Service, name: str) -> float | None:
    async with http.get(f"{service.url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def _wait_gauge(
    http: aiohttp.ClientSession, service: Service, name: str, want: float, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await _gauge(http, service, name)
        if seen == want:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{service.name}: {name} is {seen}, waited for {want}")


def _uids() -> Iterator[str]:
    return (f"demo-{n:05d}" for n in range(COOKIES))  # dmp.demo_events' cookie ids


@dataclass
class Stack:
    """`dmp ingest`, a full replica and shards 0/2 and 1/2, before the demo stream."""

    ingest: Service
    full: Service
    shards: list[Service]
    uids: list[str]
    owner: dict[str, int]  # every demo and unknown cookie -> its shard
    split: list[int]  # demo cookies per shard


def _start(services: Services) -> Stack:
    ingest = services.start("ingest", "ingest")
    full = services.lookup("full", "", snapshot_interval=0)
    shards = [services.lookup(f"shard{n}", f"{n}/2", snapshot_interval=1) for n in range(2)]
    uids = list(_uids())
    owner = {uid: shard_of(uid, PARTITIONS, 2) for uid in uids + UNKNOWN}
    split = [sum(1 for uid in uids if owner[uid] == n) for n in range(2)]
    assert min(split) > COOKIES // 3  # the cookies really are spread over both shards
    assert {partition_of(uid, PARTITIONS) for uid in uids} == set(range(PARTITIONS))
    return Stack(ingest, full, shards, uids, owner, split)


async def _sync_buyeruids(
    http: aiohttp.ClientSession, full: Service, shards: list[Service], uids: list[str]
) -> None:
    """ID syncs through the full replica: acme-dsp's buyeruid bu-<uid> is <uid>; waits until
    every replica's match table holds them."""
    for uid in uids:
        async with http.get(
            f"{full.url}/v1/sync/acme-dsp/setuid?uid=bu-{uid}", cookies={"dmp_uid": uid}
        ) as response:
            assert response.status == 200, await response.text()
    for service in (full, *shards):
        await _wait_gauge(http, service, "dmp_match_table_entries", len(uids), 30)


async def _fill(http: aiohttp.ClientSession, stack: Stack, settings: Settings) -> None:
    """The demo stream in, and every replica holding what it should."""
    sent = await produce_demo(settings.kafka.bootstrap, settings.kafka.topic, COOKIES, 7)
    assert sent > COOKIES
    await _wait_gauge(http, stack.full, "dmp_replica_cookies", COOKIES, 60)
    for n, shard in enumerate(stack.shards):
        await _wait_gauge(http, shard, "dmp_replica_cookies", stack.split[n], 30)


async def test_two_shards_answer_every_cookie_as_one_full_replica(
    sharded_settings: Settings, services: Services, redis_client: aioredis.Redis
) -> None:
    settings = sharded_settings
    stack = _start(services)
    ingest, full, shards = stack.ingest, stack.full, stack.shards
    uids, owner, split = stack.uids, stack.owner, stack.split

    async with aiohttp.ClientSession() as http:
        for service in (full, *shards):
            await _wait_ready(http, service, 60)
        # A shard says which shard it is, in /readyz and in its metrics.
        _, ready, _ = await _get(http, f"{shards[0].url}/readyz")
        assert ready == {"status": "ready", "shard": "0/2", "partitions": [0, 2]}
        _, ready, _ = await _get(http, f"{full.url}/readyz")
        assert ready == {"status": "ready"}
        async with http.get(f"{shards[1].url}/metrics") as response:
            assert 'dmp_replica_shard_info{partitions="1,3",shard="1/2"} 1.0' in (
                await response.text()
            )

        # Every cookie reaches the full replica; each shard holds exactly its own.
        await _fill(http, stack, settings)
        memberships = [await _gauge(http, s, "dmp_replica_memberships") for s in (full, *shards)]
        assert memberships[0] == (memberships[1] or 0) + (memberships[2] or 0) > 0

        # The owning shard answers /v1/users exactly as the full replica; another shard
        # refuses with 421 and names the owner.
        for uid in uids + UNKNOWN:
            want = await _get(http, f"{full.url}/v1/users/{uid}/segments")
            got = await _get(http, f"{shards[owner[uid]].url}/v1/users/{uid}/segments")
            assert got[:2] == want[:2] == (200, want[1])
            other = shards[1 - owner[uid]]
            status, body, headers = await _get(http, f"{other.url}/v1/users/{uid}/segments")
            assert status == 421, (uid, body)
            assert body["shard"] == owner[uid]
            assert body["error"].startswith(f"this cookie belongs to shard {owner[uid]}/2")
            assert headers["X-DMP-Shard"] == f"{owner[uid]}/2"
        answers = [await _get(http, f"{full.url}/v1/users/{uid}/segments") for uid in uids]
        assert sum(1 for _, body, _ in answers if body["segments"]) > COOKIES // 2

        registry = CollectorRegistry()
        for key in (ACME_KEY, BETA_KEY):
            config = ShardedClientConfig(
                shard_urls=tuple(s.url for s in shards), partitions=PARTITIONS, api_key=key
            )
            metrics = ClientMetrics.create(registry if key == ACME_KEY else None)
            async with (
                DmpClient(ClientConfig(full.url, key, default_tmax_ms=2000)) as single,
                ShardedDmpClient(replace(config, client=ClientConfig("", key, default_tmax_ms=2000)), metrics) as sharded,
            ):  # fmt: skip
                expected = {uid: await single.segments(uid) for uid in uids + UNKNOWN}
                assert sum(1 for ids in expected.values() if ids) > COOKIES // 4
                for uid in uids + UNKNOWN:
                    assert await sharded.segments(uid) == expected[uid], uid
                # A batch is split by shard, asked in parallel and merged in the order asked.
                assert await sharded.segments_batch(uids + UNKNOWN) == expected
                assert await single.segments_batch(uids + UNKNOWN) == expected
                for uid in uids[:60]:
                    request = {"id": "r", "tmax": 2000, "user": {"id": uid}}
                    assert await sharded.enrich(request) == await single.enrich(request)
        assert registry.get_sample_value("dmp_client_calls_total", {"outcome": "misdirected"}) == 0

        # A client that routes wrongly (it believes in 3 partitions) is redirected by the
        # 421 once and still gets every answer right.
        wrong = ShardedClientConfig(
            shard_urls=tuple(s.url for s in shards),
            partitions=3,
            api_key=ACME_KEY,
            client=ClientConfig("", ACME_KEY, default_tmax_ms=2000),
        )
        registry = CollectorRegistry()
        async with (
            DmpClient(ClientConfig(full.url, ACME_KEY, default_tmax_ms=2000)) as single,
            ShardedDmpClient(wrong, ClientMetrics.create(registry)) as lost,
        ):
            for uid in uids[:100]:
                assert await lost.segments(uid) == await single.segments(uid), uid
        redirected = registry.get_sample_value("dmp_client_calls_total", {"outcome": "misdirected"})
        assert redirected is not None
        assert redirected > 10

        # Snapshots stay per partition: the two shards wrote all four between them, and a
        # restarted shard loads only its own partitions, from them.
        async def snapshots() -> list[int]:
            return [
                p
                for p in range(PARTITIONS)
                if await redis_client.exists(
                    PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).snapshot
                )
            ]

        deadline = time.monotonic() + 20
        while await snapshots() != list(range(PARTITIONS)):
            assert time.monotonic() < deadline, "shards wrote no snapshot of every partition"
            await asyncio.sleep(0.2)
        await services.stop(shards[1])
        again = services.lookup("shard1-again", "1/2", snapshot_interval=0)
        await _wait_ready(http, again, 60)
        log = again.log.read_text()
        loaded = sorted(int(p) for p in re.findall(r"partition (\d+) loaded from snapshot", log))
        assert loaded == [1, 3], log[-3000:]
        assert "loaded from bitmaps" not in log
        await _wait_gauge(http, again, "dmp_replica_cookies", split[1], 30)
        for uid in uids:
            if owner[uid] == 1:
                want = await _get(http, f"{full.url}/v1/users/{uid}/segments")
                got = await _get(http, f"{again.url}/v1/users/{uid}/segments")
                assert got[:2] == want[:2]
    assert ingest.proc.poll() is None, ingest.log.read_text()[-3000:]


# What dmp.demo_events makes of cookie n (by n % 3), and what each test partner sees of it
# (tests/bidder_adapter/partner_yaml.py: acme intent and the composite, beta geo only).
KINDS = ("all", "intent", "geo")
SEEN_BY = {ACME_KEY: {"all", "intent"}, BETA_KEY: {"all", "geo"}}
OURS = "dmp.example"  # beta-ssp's eids source


def _kind(uid: str) -> str:
    return "unknown" if uid in UNKNOWN else KINDS[int(uid.removeprefix("demo-")) % 3]


def _eids(*uids: str) -> list[dict[str, Any]]:
    return [{"source": OURS, "uids": [{"id": uid} for uid in uids]}]


def _picks(stack: Stack) -> list[list[str]]:
    """Per shard: two cookies of each kind, and one never seen."""
    picks: list[list[str]] = [[], []]
    for kind in KINDS:
        for shard in range(2):
            mine = (u for u in stack.uids if stack.owner[u] == shard and _kind(u) == kind)
            picks[shard] += [next(mine), next(mine)]
    for shard in range(2):
        picks[shard].append(next(u for u in UNKNOWN if stack.owner[u] == shard))
    return picks


def _cases(picks: list[list[str]]) -> Iterator[tuple[str, dict[str, Any], str | None, str, str]]:
    """(partner key, request, uid parameter, id read first, id read second) with the two
    ids in different shards, in every place each partner reads ids from."""
    for a_shard in range(2):
        for a in picks[a_shard]:
            for b in picks[1 - a_shard]:
                user_a = {"tmax": 2000, "user": {"id": a}}
                # beta-ssp reads user.id and `uid` (cookie), then the eids of dmp.example.
                yield BETA_KEY, {"tmax": 2000, "user": {"id": a, "eids": _eids(b)}}, None, a, b
                yield BETA_KEY, {"tmax": 2000, "user": {"ext": {"eids": _eids(a, b)}}}, None, a, b
                yield BETA_KEY, user_a, b, a, b
                yield BETA_KEY, {"tmax": 2000, "user": {"eids": _eids(b)}}, a, a, b
                # acme-dsp reads buyeruid (our match table) first, then the cookie.
                yield ACME_KEY, user_a, b, a, b
                bid = {"tmax": 2000, "user": {"buyeruid": f"bu-{a}", "id": b}}
                yield ACME_KEY, bid, None, a, b


async def test_enrich_with_ids_in_two_shards_equals_one_full_replica(
    sharded_settings: Settings, services: Services
) -> None:
    """A bid request whose ids live in different shards gets, through the sharded client,
    the answer of one replica holding every cookie: the first id the partner reads that is
    in any segment decides, whichever shard holds it."""
    stack = _start(services)
    full, shards = stack.full, stack.shards
    async with aiohttp.ClientSession() as http:
        for service in (full, *shards):
            await _wait_ready(http, service, 60)
        await _fill(http, stack, sharded_settings)
        picks = _picks(stack)
        # The kinds are what the demo stream made (checked, not assumed).
        held = {
            "all": {"auto_new_car_intent", "geo_socal", "new_car_socal"},
            "intent": {"auto_new_car_intent"},
            "geo": {"geo_socal"},
            "unknown": set(),
        }
        for uid in picks[0] + picks[1]:
            _, body, _ = await _get(http, f"{full.url}/v1/users/{uid}/segments")
            assert set(body["segments"]) == held[_kind(uid)], (uid, body)
        # acme-dsp's buyeruid bu-<cookie> is that cookie in our match table, everywhere.
        await _sync_buyeruids(http, full, shards, picks[0] + picks[1])

        registry = CollectorRegistry()
        metrics = ClientMetrics.create(registry)
        clients: dict[str, tuple[DmpClient, ShardedDmpClient]] = {}
        for key in (ACME_KEY, BETA_KEY):
            config = ClientConfig("", key, default_tmax_ms=2000)
            clients[key] = (
                DmpClient(replace(config, base_url=full.url)),
                ShardedDmpClient(
                    ShardedClientConfig(tuple(s.url for s in shards), PARTITIONS, key, config),
                    metrics,
                ),
            )
        answered = second_decides = blocked = 0
        try:
            for n, (key, request, param, first, second) in enumerate(_cases(picks)):
                single, sharded = clients[key]
                want = await single.enrich(request, uid=param)
                # Every third request as bytes, as a bidder holding the raw body sends it.
                asked = orjson.dumps(request) if n % 3 == 0 else request
                got = await sharded.enrich(asked, uid=param)
                assert got == want, (key[:4], request, param, _kind(first), _kind(second))
                answered += bool(want)
                # What routing by the first id alone could not answer: the second id's data...
                second_decides += bool(want) and _kind(first) == "unknown"
                # ...or nothing, because the first id is in segments this partner cannot see.
                blocked += not want and _kind(first) not in ("unknown", *SEEN_BY[key])
            # Below the minimum tmax nothing is added, whatever the ids.
            request = {"tmax": 5, "user": {"id": picks[0][0], "eids": _eids(picks[1][0])}}
            assert await clients[BETA_KEY][1].enrich(request) == {}
        finally:
            for single, sharded in clients.values():
                await single.close()
                await sharded.close()
        # The cases really reached what routing by the first id alone got wrong.
        assert answered > 100, answered
        assert second_decides > 10, second_decides
        assert blocked > 10, blocked
        # The 421s asked for on purpose are answers, not routing errors.
        assert registry.get_sample_value("dmp_client_calls_total", {"outcome": "misdirected"}) == 0
        empty = registry.get_sample_value("dmp_client_calls_total", {"outcome": "empty"})
        assert empty is not None
        assert empty > 100
    assert stack.ingest.proc.poll() is None, stack.ingest.log.read_text()[-3000:]
