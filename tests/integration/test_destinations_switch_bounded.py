"""A switch of live sets is stored in bounded transactions, the switch itself last; a
crash between two of them leads to a whole export, each member once, or (the version put
back before the restart) to nothing of it left in Redis. Real Redis; the members are
written by PartitionStore (as ingest commits them), four partitions (twelve where one scan
of the key names must name them all, partition 1 told apart from 10)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from pyroaring import BitMap
from redis.asyncio.client import Pipeline

from dmp import destinations_switch
from dmp.config import Settings
from dmp.destinations import DestinationMetrics, Exporter
from dmp.destinations_keys import DestinationKeys
from dmp.ids import uid_hash
from dmp.keys import PartitionKeys
from segment_rules import CompiledRules, parse_rules
from tests.integration.conftest import wait_until
from tests.integration.test_destinations_go_live import (
    ACTIVE,
    PAUSED,
    Collected,
    commit_members,
    live_set,
    wait_switch_done,
)
from tests.integration.test_partner_destinations import GEO, INTENT, gamma

PARTITIONS = 4
PER_PARTITION = 80  # 320 members of geo (paused at first) and intent
SAVE_LINES = 20  # patched in: four chunks of five lines per transaction
BATCH_SIZE = 5

Commands = list[tuple[str, str]]  # (command, key) of one executed transaction


async def populate(client: aioredis.Redis, settings: Settings) -> list[str]:
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    users: list[str] = []
    segments = ["auto_new_car_intent", "geo_socal"]
    for partition in range(PARTITIONS):
        uids = [f"p{partition}-{n}" for n in range(PER_PARTITION)]
        await commit_members(client, PartitionKeys(prefix, topic, partition), uids, segments)
        users += uids
    return users


@contextlib.contextmanager
def transactions(
    monkeypatch: pytest.MonkeyPatch,
    keys: DestinationKeys,
    crash_after: int | None = None,
) -> Iterator[list[Commands]]:
    """Every executed transaction that touches the destination's switch keys, in order;
    with ``crash_after``, the process "dies" right after that many chunk-storing ones."""
    seen: list[Commands] = []
    real: Callable[[Pipeline, bool], Awaitable[list[Any]]] = Pipeline.execute

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        commands = [(str(args[0]), str(args[1])) for args, _ in self.command_stack if len(args) > 1]
        result = await real(self, raise_on_error)
        if any(key.startswith(keys.switch) for _, key in commands):
            seen.append(commands)
            stored = [c for c in seen if ("SET", keys.switch_building) in c]
            if crash_after is not None and len(stored) == crash_after:
                raise RuntimeError("crash between two save transactions")
        return result

    monkeypatch.setattr(Pipeline, "execute", execute)
    try:
        yield seen
    finally:
        monkeypatch.setattr(Pipeline, "execute", real)


def exporter(client: aioredis.Redis, settings: Settings, rules: str, sink: Collected) -> Exporter:
    profile = gamma(
        f"{{kind: http, url: 'http://unused', batch_size: {BATCH_SIZE}, interval_seconds: 0.05}}"
    )
    return Exporter(
        client,
        profile,
        CompiledRules(parse_rules(rules)),
        sink,
        DestinationMetrics.create(),
        prefix=settings.redis.key_prefix,
        state_prefix="dest",
        topic=settings.kafka.topic,
    )


async def switch_keys(client: aioredis.Redis, keys: DestinationKeys) -> list[bytes]:
    return [k async for k in client.scan_iter(match=f"{keys.switch}*")]


async def test_a_switch_is_stored_in_several_bounded_transactions_the_switch_last(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(destinations_switch, "SAVE_LINES", SAVE_LINES)
    users = await populate(redis_client, settings)
    keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
    sink = Collected()
    first = exporter(redis_client, settings, PAUSED, sink)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    everyone = Counter(dict.fromkeys(users, 1))
    try:
        await wait_until(lambda: sink.added(INTENT) == everyone, 10, "intent adds")
        assert sink.added(GEO) == Counter()
        with transactions(monkeypatch, keys) as seen:
            first.set_rules(CompiledRules(parse_rules(ACTIVE)))
            await wait_until(lambda: sink.added(GEO) == everyone, 10, "geo adds")
            await wait_switch_done(redis_client, keys)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

    manifest = next(i for i, c in enumerate(seen) if ("HSET", keys.switch) in c)
    stored, after = seen[:manifest], seen[manifest + 1 :]
    chunks = len(users) // BATCH_SIZE
    assert len(stored) == len(users) // SAVE_LINES  # 16 transactions of 20 lines, then the switch
    for n, commands in enumerate(stored):
        per = SAVE_LINES // BATCH_SIZE
        assert commands == [
            *(("SET", keys.switch_chunk(c)) for c in range(n * per, (n + 1) * per)),
            ("SET", keys.switch_building),
        ]
    assert seen[manifest] == [("HSET", keys.switch), ("DEL", keys.switch_building)]
    assert not any(cmd == "SET" for c in after for cmd, _ in c)  # only the batches' commits
    assert len(after) == chunks
    lines = [orjson.loads(line) for b in sink.batches for line in b.body.splitlines()]
    geo_batches = [b for b in sink.batches if b.step is not None]
    assert len(geo_batches) == chunks
    assert all(b.users == BATCH_SIZE for b in geo_batches)
    assert sum(1 for line in lines if GEO in line["add"]) == len(users)
    assert [b.seq for b in sink.batches if b.users] == list(range(1, len(sink.batches) + 1))
    assert await switch_keys(redis_client, keys) == []


async def test_a_crash_between_two_save_transactions_exports_each_member_once(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first exporter stores two transactions of the switch's lines and dies: nothing
    of the switch is visible or sent. The next one clears them, switches from new cuts, and
    every member gets its add once."""
    monkeypatch.setattr(destinations_switch, "SAVE_LINES", SAVE_LINES)
    users = await populate(redis_client, settings)
    keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
    sink = Collected()
    everyone = Counter(dict.fromkeys(users, 1))
    first = exporter(redis_client, settings, PAUSED, sink)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await wait_until(lambda: sink.added(INTENT) == everyone, 10, "intent adds")
    sent_before = len(sink.batches)
    with transactions(monkeypatch, keys, crash_after=2) as seen:
        first.set_rules(CompiledRules(parse_rules(ACTIVE)))
        with pytest.raises(RuntimeError, match="crash between two save transactions"):
            await asyncio.wait_for(task, 10)
    assert len(seen) == 2
    assert not await redis_client.exists(keys.switch)  # no half switch visible
    assert int(await redis_client.get(keys.switch_building) or 0) == 2 * SAVE_LINES // BATCH_SIZE
    assert len(sink.batches) == sent_before  # nothing of it went out
    assert sink.added(GEO) == Counter()

    # More members join geo between the crash and the restart: the new cuts hold them too.
    extra = [f"late-{n}" for n in range(3)]
    await commit_members(
        redis_client,
        PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0),
        extra,
        ["geo_socal"],
        first=PER_PARTITION,
        produced_at=2.0,
    )

    stop = asyncio.Event()
    task = asyncio.create_task(exporter(redis_client, settings, ACTIVE, sink).run(stop))
    want = Counter(dict.fromkeys(users + extra, 1))
    try:
        await wait_until(lambda: sink.added(GEO) == want, 10, "every member's geo")
        await wait_switch_done(redis_client, keys)
        await asyncio.sleep(0.2)  # nothing more may arrive
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert sink.added(GEO) == want
    assert sink.added(INTENT) == everyone
    assert [b.seq for b in sink.batches if b.users] == list(range(1, len(sink.batches) + 1))
    assert await switch_keys(redis_client, keys) == []
    assert "geo_socal" in await live_set(redis_client, keys)


async def test_a_switch_cut_short_and_no_longer_due_leaves_nothing_behind(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first exporter dies storing a switch; the version is put back before the restart,
    so no switch is due and nothing would overwrite its chunks: the restart deletes them."""
    monkeypatch.setattr(destinations_switch, "SAVE_LINES", SAVE_LINES)
    users = await populate(redis_client, settings)
    keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
    sink = Collected()
    everyone = Counter(dict.fromkeys(users, 1))
    first = exporter(redis_client, settings, PAUSED, sink)
    task = asyncio.create_task(first.run(asyncio.Event()))
    await wait_until(lambda: sink.added(INTENT) == everyone, 10, "intent adds")
    with transactions(monkeypatch, keys, crash_after=2):
        first.set_rules(CompiledRules(parse_rules(ACTIVE)))
        with pytest.raises(RuntimeError, match="crash between two save transactions"):
            await asyncio.wait_for(task, 10)
    left = await switch_keys(redis_client, keys)
    assert len(left) == 2 * SAVE_LINES // BATCH_SIZE + 1  # the chunks and the count

    # A new member of intent, so the restarted exporter is seen to get past its start.
    await commit_members(
        redis_client,
        PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0),
        ["after"],
        ["auto_new_car_intent"],
        first=PER_PARTITION,
        produced_at=2.0,
    )

    stop = asyncio.Event()
    task = asyncio.create_task(exporter(redis_client, settings, PAUSED, sink).run(stop))
    try:
        await wait_until(lambda: sink.added(INTENT)["after"] == 1, 10, "the new member's add")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert await switch_keys(redis_client, keys) == []
    assert sink.added(GEO) == Counter()
    assert "geo_socal" not in await live_set(redis_client, keys)


async def test_id_index_reads_every_slice_and_leaves_out_what_cannot_be_named(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Positions over three 65,536-position slices of ``ids``: each gets its own hash;
    blanked ones (erased) and ones past what ingest wrote are left out."""
    keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, 0)
    written = 2 * destinations_switch.IDS_SLICE + 100
    hashes = [uid_hash(f"u{n}") for n in range(written)]
    blanked = {7, destinations_switch.IDS_SLICE, written - 1}
    for n in blanked:
        hashes[n] = 0
    await redis_client.set(keys.ids, b"".join(h.to_bytes(8, "big") for h in hashes))
    wanted = [*range(0, written, 997), *blanked, 65535, 65537, written, written + 5]
    got_hashes, got_positions = await destinations_switch.id_index(
        redis_client, keys, BitMap(wanted)
    )
    expected = sorted((hashes[p], p) for p in set(wanted) if p < written and hashes[p])
    assert list(zip(got_hashes.tolist(), got_positions.tolist(), strict=True)) == expected


async def twelve_partitions(
    client: aioredis.Redis, settings: Settings, per_partition: int
) -> dict[int, list[str]]:
    """Members of intent and geo in partitions 0..11; ``shared`` in both 1 and 10, then its
    key in partition 1 deleted (its state expired, say): there it cannot be named."""
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    segments = frozenset({"auto_new_car_intent", "geo_socal"})
    users: dict[int, list[str]] = {}
    for partition in range(12):
        uids = [f"q{partition}-{n}" for n in range(per_partition)]
        uids += ["shared"] if partition in (1, 10) else []
        await commit_members(client, PartitionKeys(prefix, topic, partition), uids, segments)
        users[partition] = uids
    await client.delete(PartitionKeys(prefix, topic, 1).cookie("shared"))
    # Keys the pattern lets through but that are no cookie of a partition of the topic.
    await client.set(f"{prefix}:{{{topic}:x1}}:c:q1-0", b"")
    await client.set(f"{prefix}:{{{topic}:1}}x}}:c:shared", b"")
    return users


async def switch_lines(client: aioredis.Redis, settings: Settings) -> tuple[Counter[str], int, int]:
    """geo adds per cookie id of a switch making geo live, its unnamed count and scans."""
    keys = DestinationKeys(settings.redis.key_prefix, "dest", "gamma-dsp")
    store = destinations_switch.SwitchStore(client, keys)
    scans = 0
    real = aioredis.Redis.scan_iter

    def scan_iter(self: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aioredis.Redis, "scan_iter", scan_iter)
        switch, unnamed = await destinations_switch.start_switch(
            client,
            store,
            prefix=settings.redis.key_prefix,
            topic=settings.kafka.topic,
            ruleset=CompiledRules(parse_rules(ACTIVE)).ruleset,
            profile=gamma("{kind: http, url: 'http://unused', batch_size: 5}"),
            old=frozenset({"auto_new_car_intent"}),
            new=frozenset({"auto_new_car_intent", "geo_socal"}),
            batch_size=BATCH_SIZE,
        )
    assert switch is not None
    adds: Counter[str] = Counter()
    for n in range(switch.chunks):
        for uid, added, removed in await store.chunk(n):
            assert added == [GEO]
            assert removed == []
            adds[uid] += 1
    assert len(switch.cuts) == 12
    return adds, unnamed, scans


async def test_one_scan_names_every_partition_telling_1_and_10_apart(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Twelve partitions are named by one scan of the key names; each key counts for the
    partition its hash tag names whole (partition 1's key is not partition 10's), so
    ``shared``, whose key is left only in partition 10, is named there once and
    partition 1's position of it is unnamed."""
    users = await twelve_partitions(redis_client, settings, per_partition=30)
    adds, unnamed, scans = await switch_lines(redis_client, settings)
    assert scans == 1
    assert unnamed == 1
    want = Counter(u for uids in users.values() for u in uids)
    want["shared"] = 1
    assert adds == want


async def test_past_the_member_budget_partitions_are_named_in_several_scans(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 70 members' hashes per scan, twelve partitions of 31 or 32 are named
    three at a time (the budget reached with the third): four scans, each member once."""
    monkeypatch.setattr(destinations_switch, "NAME_MEMBERS", 70)
    users = await twelve_partitions(redis_client, settings, per_partition=31)
    adds, unnamed, scans = await switch_lines(redis_client, settings)
    assert scans == 4
    assert unnamed == 1
    want = Counter(u for uids in users.values() for u in uids)
    want["shared"] = 1
    assert adds == want
