"""A segment built while paused reaches every destination whole, once, when it goes live;
pausing it takes its members back. Real Kafka, Redis, ingest, `dmp rules apply` and
`dmp rules backfill` (as processes), the destinations service and HTTP receivers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from redis.crc import key_slot

from bidder_adapter.partner_file import parse_partner_bytes
from bidder_adapter.profiles import hash_api_key
from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.destinations import Batch, DestinationMetrics, Exporter
from dmp.destinations_keys import DestinationKeys
from dmp.destinations_service import DestinationService
from dmp.destinations_switch import SwitchStore
from dmp.ids import uid_hash
from dmp.keys import PartitionKeys
from dmp.partition_batch import BatchPlan
from dmp.partition_store import PartitionStore
from dmp.redis_client import connect
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules, parse_rules
from tests.bidder_adapter.partner_yaml import partner_yaml, write_partners
from tests.conftest import EXAMPLE_RULES
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce
from tests.integration.test_backfill import V2, click, dmp_cli, produce_at_event_time
from tests.integration.test_partner_destinations import (
    GEO,
    INTENT,
    Receiver,
    exporter,
    following,
    gamma,
    gamma_yaml,
    serving,
)
from tests.integration.test_redis_cluster import CLUSTER_URL_VAR

DAY = 86400.0
ACTIVE = EXAMPLE_RULES.read_text()
PAUSED = ACTIVE.replace("  - id: geo_socal\n", "  - id: geo_socal\n    status: paused\n", 1)
SOCAL = "acme-socal-dealers"
VEHICLES = "acme-new-vehicles"


def lines(rec: Receiver, batches: Iterable[bytes] | None = None) -> list[dict[str, Any]]:
    bodies = rec.bodies.values() if batches is None else batches
    return [orjson.loads(line) for body in bodies for line in body.splitlines()]


def sent(rec: Receiver, op: str, segment: str) -> Counter[str]:
    """How many times each user was sent ``op`` ('add' or 'remove') of ``segment``."""
    return Counter(str(line["user_id"]) for line in lines(rec) if segment in line[op])


def holding(rec: Receiver, segment: str) -> set[str]:
    return {user for user, segments in rec.state.items() if segment in segments}


async def geo_members(redis_client: aioredis.Redis, settings: Settings) -> set[str]:
    """Cookies whose stored state holds geo_socal (paused or not: ingest builds it)."""
    found = set()
    for p in range(settings.kafka.partitions):
        tag = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).tag
        keys = [k async for k in redis_client.scan_iter(match=f"{tag}:c:*", count=1000)]
        raws: list[Any] = await redis_client.mget(keys)
        for key, raw in zip(keys, raws, strict=True):
            if raw is not None and "geo_socal" in CookieState.decode(raw).members:
                found.add(key.decode().rsplit(":c:", 1)[1])
    return found


async def ever_added(redis_client: aioredis.Redis, settings: Settings, segment: str) -> set[str]:
    """Cookies whose join of ``segment`` is in a change stream (the entries name them)."""
    found = set()
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        entries: Any = await redis_client.xrange(keys.changes)
        for _, fields in entries:
            doc = orjson.loads(fields[b"d"])
            names = {pos: uid for pos, uid in doc.get("u", [])}
            found |= {names[pos] for pos in doc["a"].get(segment, []) if pos in names}
    return found


async def commit_members(
    client: aioredis.Redis,
    keys: PartitionKeys,
    uids: list[str],
    segments: Collection[str],
    *,
    first: int = 0,
    produced_at: float = 1.0,
) -> None:
    """Commit ``uids`` as new cookies at positions ``first``.., each joining ``segments``,
    as ingest would (its offset past them)."""
    store = PartitionStore(client, keys, state_ttl=3600, stream_maxlen=10_000)
    await store.load()
    end = first + len(uids)
    plan = BatchPlan(next_local=end)
    for local, uid in enumerate(uids, first):
        plan.states[uid] = CookieState(local, members=frozenset(segments))
        plan.new_ids.append((local, uid_hash(uid)))
    plan.added = {s: list(range(first, end)) for s in segments}
    await store.commit(plan, end, produced_at)


async def wait_switch_done(client: aioredis.Redis, keys: DestinationKeys) -> None:
    """Until the switch is gone: its last batch commits after it is sent."""
    async with asyncio.timeout(5):
        while await client.exists(keys.switch):
            await asyncio.sleep(0.02)


async def live_set(client: aioredis.Redis, keys: DestinationKeys) -> list[str]:
    """The live segments the destination exports under (its cursor's ``#live``)."""
    live: list[str] = orjson.loads(await client.hget(keys.cursor, "#live") or b"[]")
    return live


def la_views(uid: str, count: int, age_days: float = 1.0) -> list[dict[str, Any]]:
    return [new_car_view(uid, age_days - n / DAY) for n in range(count)]


async def test_a_segment_built_while_paused_reaches_each_destination_once_when_it_goes_live(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """geo_socal is paused while its audience builds (and partly lapses); `dmp rules apply`
    makes it live under live traffic: gamma (granted geo plainly) gets each member's add
    once, acme (granted the composite intent AND geo) its composite once; pausing it again
    takes both back, once."""
    topic = settings.kafka.topic
    (tmp_path / "paused.yaml").write_text(PAUSED)
    (tmp_path / "active.yaml").write_text(ACTIVE)
    code, _, err = await dmp_cli(settings, "rules", "apply", str(tmp_path / "paused.yaml"))
    assert code == 0, err
    gamma_rec, acme_rec = Receiver(), Receiver()
    async with serving(gamma_rec) as gamma_url, serving(acme_rec) as acme_url:
        path = write_partners(
            tmp_path / "partners.yaml",
            gamma_yaml(
                # Small batches: the members at the switch take several batches.
                f"{{kind: http, url: '{gamma_url}', batch_size: 3, interval_seconds: 0.05}}",
                base=partner_yaml(
                    destination=f"    destination: {{kind: http, url: '{acme_url}', "
                    "batch_size: 4, interval_seconds: 0.05}\n"
                ),
            ),
        )
        s, partners = following(settings, path)
        await start_ingest()

        both = [f"both-{i}" for i in range(7)]  # intent and geo
        geo_only = [f"geo-{i}" for i in range(5)]  # one view: geo, not intent
        gone = [f"gone-{i}" for i in range(4)]  # in geo for 6 seconds, while it is paused
        elsewhere = [f"ny-{i}" for i in range(3)]  # intent, not geo
        events = [e for u in both for e in la_views(u, 2)]
        events += [e for u in geo_only for e in la_views(u, 1)]
        events += [new_car_view(u, 30 - 6 / DAY) for u in gone]
        events += [new_car_view(u, 1, metro="501", region="NY") for u in elsewhere for _ in "ab"]
        await produce(producer, topic, events)

        async with aiohttp.ClientSession() as session:
            service = DestinationService(
                s, rules, redis_client, partners, DestinationMetrics.create(), session
            )
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            traffic: asyncio.Task[None] | None = None
            try:
                intent = set(both + elsewhere)
                await wait_until(lambda: holding(gamma_rec, INTENT) == intent, 30, "gamma's intent")
                await wait_until(lambda: holding(acme_rec, VEHICLES) == intent, 30, "acme's intent")
                # gone-* joined geo and left it while paused: their changes are in the
                # streams, and must never reach a partner.
                async with asyncio.timeout(20):
                    while await geo_members(redis_client, settings) != set(both + geo_only):
                        await asyncio.sleep(0.1)
                assert set(gone) <= await ever_added(redis_client, settings, "geo_socal")
                await asyncio.sleep(0.3)  # nothing about geo may have gone out
                assert not holding(gamma_rec, GEO)
                assert not holding(acme_rec, SOCAL)
                before = dict(gamma_rec.bodies)

                late: list[str] = []
                quiet = asyncio.Event()

                async def live_traffic() -> None:
                    """New intent + geo users all through the switch (whole users only)."""
                    while not quiet.is_set():
                        uid = f"late-{len(late)}"
                        await produce(producer, topic, la_views(uid, 2, 0.1))
                        late.append(uid)
                        await asyncio.sleep(0.05)

                traffic = asyncio.create_task(live_traffic())
                await asyncio.sleep(0.3)
                code, out, err = await dmp_cli(
                    settings, "rules", "apply", str(tmp_path / "active.yaml")
                )
                assert code == 0, err
                assert "~ geo_socal: changed status" in out
                await asyncio.sleep(1.0)  # live traffic after the switch too
                quiet.set()
                await traffic
                assert len(late) >= 10

                members = set(both + geo_only + late)
                await wait_until(lambda: holding(gamma_rec, GEO) == members, 30, "gamma's geo")
                local = set(both + late)
                await wait_until(lambda: holding(acme_rec, SOCAL) == local, 30, "acme's composite")
                await asyncio.sleep(0.3)  # nothing more may arrive

                earlier = lines(gamma_rec, before.values())
                assert not any(GEO in line["add"] + line["remove"] for line in earlier)
                assert sent(gamma_rec, "add", GEO) == Counter(dict.fromkeys(members, 1))
                assert sent(gamma_rec, "remove", GEO) == Counter()
                assert sent(acme_rec, "add", SOCAL) == Counter(dict.fromkeys(local, 1))
                assert holding(gamma_rec, INTENT) == intent | set(late)

                # Paused again: what partners hold of it is taken back, once.
                code, _, err = await dmp_cli(
                    settings, "rules", "apply", str(tmp_path / "paused.yaml")
                )
                assert code == 0, err
                await wait_until(lambda: not holding(gamma_rec, GEO), 30, "gamma's geo removed")
                await wait_until(
                    lambda: not holding(acme_rec, SOCAL), 30, "acme's composite removed"
                )
                await produce(producer, topic, la_views("after-pause", 2))
                await wait_until(
                    lambda: "after-pause" in holding(gamma_rec, INTENT),
                    30,
                    "a user after the pause",
                )
                await asyncio.sleep(0.3)
            finally:
                if traffic is not None:
                    traffic.cancel()
                stop.set()
                await asyncio.wait_for(task, 10)
    assert sent(gamma_rec, "remove", GEO) == Counter(dict.fromkeys(members, 1))
    assert sent(acme_rec, "remove", SOCAL) == Counter(dict.fromkeys(local, 1))
    assert sent(gamma_rec, "add", GEO) == Counter(dict.fromkeys(members, 1))
    assert gamma_rec.violations == []
    assert acme_rec.violations == []
    assert gamma_rec.duplicates == []
    assert gamma_rec.order == list(range(1, len(gamma_rec.order) + 1))
    assert holding(gamma_rec, INTENT) == intent | set(late) | {"after-pause"}


def clickers_partner(url: str) -> str:
    """A partner granted only the backfilled segment, under its own id for it."""
    return (
        "partners:\n"
        "  - partner_id: clk-dsp\n"
        "    kind: dsp\n"
        f"    api_key_sha256: {hash_api_key('clk-key-0005')}\n"
        "    granted_segments: [clickers]\n"
        "    segment_id_map: {clickers: clk-1}\n"
        "    output_format: ids\n"
        "    segtax: 700\n"
        "    data_provider_id: dmp.example\n"
        "    data_provider_name: Example DMP\n"
        "    max_segments: 5\n"
        "    user_id_sources: [cookie]\n"
        f"    destination: {{kind: http, url: '{url}', batch_size: 5, interval_seconds: 0.05}}\n"
    )


async def test_a_backfilled_segment_reaches_its_destination_whole_when_it_goes_live(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """`dmp rules backfill` fills clickers from Kafka's history while it is paused, then
    makes it live: the partner gets every member, history and live alike, once."""
    topic = settings.kafka.topic
    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    await versions.apply(ACTIVE, "v1.yaml")
    await start_ingest()
    history = [f"hist-{n}" for n in range(12)]
    once = [f"once-{n}" for n in range(4)]  # one click: never a member
    events = [click(u, age) for u in history for age in (5, 3)] + [click(u, 4) for u in once]
    events.sort(key=lambda e: e["ts"])
    await produce_at_event_time(producer, topic, events)
    marks = [PartitionKeys(settings.redis.key_prefix, topic, p) for p in range(2)]

    async def applied() -> int:
        raws = [await redis_client.get(k.offset) for k in marks]
        return sum(int(r) for r in raws if r is not None)

    async with asyncio.timeout(20):
        while await applied() < len(events):
            await asyncio.sleep(0.05)
    await versions.apply(V2, "v2.yaml")  # clickers (and engaged) paused
    async with asyncio.timeout(10):
        while not all([await redis_client.hexists(k.rules_from, "2") for k in marks]):
            await asyncio.sleep(0.05)
    live = [f"live-{n}" for n in range(5)]  # members from live events, while paused
    await produce_at_event_time(producer, topic, [click(u, a) for u in live for a in (0.2, 0.1)])

    rec = Receiver()
    async with serving(rec) as url:
        path = write_partners(tmp_path / "partners.yaml", clickers_partner(url))
        s, partners = following(settings, path)
        async with aiohttp.ClientSession() as session:
            service = DestinationService(
                s, rules, redis_client, partners, DestinationMetrics.create(), session
            )
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            try:
                await wait_until(lambda: bool(service.running), 10, "the exporter")
                await asyncio.sleep(1.0)  # paused: live members are built, not sent
                assert rec.bodies == {}
                code, out, err = await dmp_cli(
                    settings, "rules", "backfill", "clickers", "--days", "8"
                )
                assert code == 0, err
                assert "version 3 is live: 'clickers' active" in out
                members = set(history + live)
                await wait_until(lambda: holding(rec, "clk-1") == members, 30, "the whole audience")
                await asyncio.sleep(0.3)  # nothing more may arrive
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
    assert sent(rec, "add", "clk-1") == Counter(dict.fromkeys(members, 1))
    assert rec.violations == []
    assert rec.duplicates == []


async def test_a_switch_survives_an_exporter_crash_mid_way_without_loss_or_duplicates(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    """The members at the switch take four batches; the exporter dies after the receiver
    applied the second but before it heard back. A new exporter resends that batch (the
    receiver drops it by its key) and finishes the switch: every member once."""
    paused = CompiledRules(parse_rules(PAUSED))
    active = CompiledRules(parse_rules(ACTIVE))
    await RuleVersions(redis_client, settings.redis.key_prefix).apply(PAUSED, "paused.yaml")
    await start_ingest(r=paused)
    both = [f"both-{i}" for i in range(8)]
    await produce(producer, settings.kafka.topic, [e for u in both for e in la_views(u, 2)])
    rec = Receiver()
    metrics = DestinationMetrics.create()
    async with serving(rec) as url, aiohttp.ClientSession() as session:
        profile = gamma(f"{{kind: http, url: '{url}', batch_size: 2, interval_seconds: 0.05}}")
        assert profile.destination is not None

        first = exporter(redis_client, settings, paused, profile, session, metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await wait_until(lambda: holding(rec, INTENT) == set(both), 30, "intent adds")
        await asyncio.sleep(0.2)
        assert not holding(rec, GEO)
        rec.hang_at_batch = len(rec.order) + 2
        first.set_rules(active)  # what the service does when a version makes geo live
        await asyncio.wait_for(rec.hanging.wait(), 20)
        task.cancel()  # crash: the batch reached the receiver, the exporter never heard back
        with contextlib.suppress(asyncio.CancelledError):
            await task
        keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
        pending: Any = await redis_client.hgetall(keys.pending)
        assert int(pending[b"seq"]) == rec.hang_at_batch
        assert b"step" in pending  # a batch of the switch
        rec.release.set()

        stop = asyncio.Event()
        task = asyncio.create_task(
            exporter(redis_client, settings, active, profile, session, metrics).run(stop)
        )
        try:
            await wait_until(lambda: holding(rec, GEO) == set(both), 30, "every member's geo")
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert rec.duplicates == [f"gamma-dsp-{rec.hang_at_batch}"]
    assert rec.violations == []
    assert sent(rec, "add", GEO) == Counter(dict.fromkeys(both, 1))
    assert rec.order == list(range(1, len(rec.order) + 1))
    assert not await redis_client.exists(keys.switch, keys.pending)
    assert not [k async for k in redis_client.scan_iter(match=f"{keys.switch}:*")]
    assert "geo_socal" in await live_set(redis_client, keys)


async def test_a_destination_down_at_the_go_live_sends_each_member_once(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    """The exporter is stopped; geo members keep joining (and one leaves) while it is
    down, then geo goes live. Started again, it is behind the cut: the entries it missed
    are read as paused, then the members at the cut go out, once each."""
    paused = CompiledRules(parse_rules(PAUSED))
    active = CompiledRules(parse_rules(ACTIVE))
    await RuleVersions(redis_client, settings.redis.key_prefix).apply(PAUSED, "paused.yaml")
    await start_ingest(r=paused)
    topic = settings.kafka.topic
    early = [f"early-{i}" for i in range(4)]
    await produce(producer, topic, [e for u in early for e in la_views(u, 2)])
    rec = Receiver()
    async with serving(rec) as url, aiohttp.ClientSession() as session:
        profile = gamma(f"{{kind: http, url: '{url}', batch_size: 3, interval_seconds: 0.05}}")
        assert profile.destination is not None
        stop = asyncio.Event()
        metrics = DestinationMetrics.create()
        task = asyncio.create_task(
            exporter(redis_client, settings, paused, profile, session, metrics).run(stop)
        )
        await wait_until(lambda: holding(rec, INTENT) == set(early), 30, "intent adds")
        stop.set()
        await asyncio.wait_for(task, 10)

        # While it is down: joins (and a leave) of the paused segment, then the go-live.
        down = [f"down-{i}" for i in range(5)]
        await produce(producer, topic, [e for u in down for e in la_views(u, 2)])
        await produce(producer, topic, [new_car_view("brief", 30 - 4 / DAY)])
        want = set(early + down)
        async with asyncio.timeout(20):
            while await geo_members(redis_client, settings) != want:
                await asyncio.sleep(0.1)
        assert "brief" in await ever_added(redis_client, settings, "geo_socal")

        stop = asyncio.Event()
        task = asyncio.create_task(
            exporter(redis_client, settings, active, profile, session, metrics).run(stop)
        )
        try:
            await wait_until(lambda: holding(rec, GEO) == want, 30, "every member's geo")
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert sent(rec, "add", GEO) == Counter(dict.fromkeys(want, 1))
    assert sent(rec, "remove", GEO) == Counter()
    assert holding(rec, INTENT) == set(early + down)
    assert rec.violations == []


async def test_a_switch_chunk_gone_from_redis_says_how_to_start_the_switch_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
    store = SwitchStore(redis_client, keys)
    lines = [("u1", ["g"], []), ("u2", ["g"], []), ("u3", [], ["g"])]
    await store.save(frozenset(), frozenset({"geo"}), {"s": "1-0"}, lines, batch_size=2)
    assert await store.chunk(1) == [("u3", [], ["g"])]
    await redis_client.delete(keys.switch_chunk(0))  # evicted, say
    with pytest.raises(LookupError) as caught:
        await store.chunk(0)
    message = str(caught.value)
    assert f"{keys.switch_chunk(0)} is missing (deleted or evicted by Redis?)" in message
    assert f"Deleting {keys.switch} and its numbered keys starts it again" in message


@pytest.fixture
async def cluster_settings(settings: Settings) -> AsyncIterator[Settings]:
    """The test's prefix and topic on the 3-master Redis Cluster that deploy/test.sh starts."""
    url = os.environ.get(CLUSTER_URL_VAR, "redis://127.0.0.1:17000/0")
    s = replace(settings, redis=replace(settings.redis, url=url, cluster=True))
    yield s
    client = connect(s.redis)
    try:  # one by one: a multi-key DEL must stay in one slot
        async for key in client.scan_iter(match=f"{s.redis.key_prefix}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


class Collected:
    """A sink that keeps what it is sent."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def send(self, partner_id: str, batch: Batch) -> None:
        self.batches.append(batch)

    def added(self, segment: str) -> Counter[str]:
        found = [orjson.loads(line) for b in self.batches for line in b.body.splitlines()]
        return Counter(str(line["user_id"]) for line in found if segment in line["add"])


async def test_a_destination_exports_and_switches_on_the_redis_cluster(
    cluster_settings: Settings,
) -> None:
    """Two partitions in two slots. acme's composite grant needs each user's whole membership
    (read per partition: a cluster refuses one MGET over two slots), and geo going live is a
    switch: a MULTI per partition, a scan of every master, its lines in one slot."""
    prefix, topic = cluster_settings.redis.key_prefix, cluster_settings.kafka.topic
    client = connect(cluster_settings.redis)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        tags = [PartitionKeys(prefix, topic, p).tag.encode() for p in range(2)]
        assert key_slot(tags[0]) != key_slot(tags[1])
        users: list[str] = []
        segments = ["auto_new_car_intent", "geo_socal"]  # intent, and geo (paused at first)
        for partition in range(2):
            uids = [f"p{partition}-{n}" for n in range(3)]
            await commit_members(client, PartitionKeys(prefix, topic, partition), uids, segments)
            users += uids
        destination = (
            "    destination: {kind: http, url: 'http://unused', interval_seconds: 0.05}\n"
        )
        text = partner_yaml(destination=destination).encode()
        profile = parse_partner_bytes(text, "p.yaml").profiles["acme-dsp"]
        sink = Collected()
        exporter = Exporter(
            client,
            profile,
            CompiledRules(parse_rules(PAUSED)),
            sink,
            DestinationMetrics.create(),
            prefix=prefix,
            state_prefix="dest",
            topic=topic,
        )
        task = asyncio.create_task(exporter.run(stop))
        everyone = Counter(dict.fromkeys(users, 1))
        await wait_until(lambda: sink.added(VEHICLES) == everyone, 10, "intent adds")
        assert sink.added(SOCAL) == Counter()
        exporter.set_rules(CompiledRules(parse_rules(ACTIVE)))
        await wait_until(lambda: sink.added(SOCAL) == everyone, 10, "the composite's adds")
        state = DestinationKeys(prefix, "dest", profile.partner_id)
        await wait_switch_done(client, state)
        assert "geo_socal" in await live_set(client, state)
        assert not task.done()  # no failure (and restart) on the way
        assert sink.added(VEHICLES) == everyone
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 10)
        await client.aclose()
