"""Opt-out and erasure on the real stack: lookups, partner views, stored data, exports, replays."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaProducer
from pyroaring import BitMap
from pytest_aiohttp import AiohttpClient

from bidder_adapter.partner_file import load_partner_file
from bidder_adapter.profiles import hash_api_key
from dmp.config import Settings
from dmp.destinations import DestinationMetrics, Exporter
from dmp.destinations_sinks import FileSink
from dmp.ids import LOCAL_BITS
from dmp.keys import PartitionKeys
from dmp.lookup import FOLLOWER, create_lookup_app
from dmp.match_table import MatchKeys, MatchTableStore
from dmp.privacy_routes import PRIVACY_FOLLOWER
from dmp.redis_types import as_bytes
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, ADMIN_KEY, partner_yaml
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce, segments_of
from tests.integration.tcf_encoder import encode_gpp, encode_tc_string
from tests.integration.test_restart import stored_offsets, wait_until_offsets

ALL = ["auto_new_car_intent", "geo_socal", "new_car_socal"]
Client = TestClient[Any, Any]


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def with_admin(settings: Settings, tmp_path: Path) -> Settings:
    partners = tmp_path / "partners.yaml"
    partners.write_text(partner_yaml())
    return replace(
        settings,
        partners_path=partners,
        partner=replace(settings.partner, admin_key_sha256=hash_api_key(ADMIN_KEY)),
    )


async def lookup(aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules) -> Client:
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_until(
        lambda: app[FOLLOWER].ready.is_set() and app[PRIVACY_FOLLOWER].ready.is_set(),
        10,
        "lookup ready",
    )
    return client


async def intender(
    producer: AIOKafkaProducer, settings: Settings, uid: str, views: int = 2
) -> None:
    await produce(producer, settings.kafka.topic, [new_car_view(uid, d + 1) for d in range(views)])


async def applied(client: aioredis.Redis, settings: Settings) -> int:
    return sum((await stored_offsets(client, settings)).values())


async def stored_traces(client: aioredis.Redis, settings: Settings, uid: str) -> list[str]:
    """Every place Redis still holds the cookie: its state, a bitmap bit, a pending mark."""
    found = []
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        if await client.exists(keys.cookie(uid)):
            found.append(keys.cookie(uid))
        if await client.sismember(keys.privacy_pending, uid):
            found.append(keys.privacy_pending)
    return found


async def bitmap_positions(client: aioredis.Redis, settings: Settings) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        async for key in client.scan_iter(match=keys.bitmap_pattern):
            segment, _ = keys.parse_bitmap_key(key.decode())
            raw = await client.get(key)
            bits = BitMap.deserialize(as_bytes(raw)) if raw else BitMap()
            out.setdefault(segment, set()).update(p << LOCAL_BITS | b for b in bits)
    return out


async def post_uid(client: Client, path: str, uid: str) -> dict[str, Any]:
    response = await client.post(path, data=orjson.dumps({"uid": uid}), headers=admin())
    assert response.status == 200, await response.text()
    doc: dict[str, Any] = await response.json()
    return doc


async def partner_view(client: Client, uid: str) -> list[object]:
    response = await client.get(f"/v1/partner/users/{uid}/segments", headers=admin(ACME_KEY))
    assert response.status == 200
    data: list[object] = (await response.json())["data"]
    return data


async def test_opt_out_takes_effect_at_once_and_for_good(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    s = with_admin(settings, tmp_path)
    await start_ingest(s)
    await intender(producer, s, "opt-me")
    await intender(producer, s, "keep-me")
    await wait_until_offsets(redis_client, s, 4)
    client = await lookup(aiohttp_client, s, rules)
    await wait_until_segments(client, "opt-me", ALL)
    assert await partner_view(client, "opt-me") != []
    positions = await position_of(client, s, redis_client, "opt-me")

    refused = await client.post("/v1/privacy/opt-out", data=b'{"uid":"opt-me"}')
    assert refused.status == 401
    doc = await post_uid(client, "/v1/privacy/opt-out", "opt-me")
    opted_at = time.time()
    # The report says what was stored: segments and the counters behind them.
    assert doc["status"] == "opted_out"
    assert doc["removed"][0]["segments"] == sorted(ALL)
    assert sorted(doc["removed"][0]["counters"].values()) == [1, 2]
    # The very next lookup: no segment, for us and for every partner.
    assert await segments_of(client, "opt-me") == []
    assert await partner_view(client, "opt-me") == []
    assert await segments_of(client, "keep-me") == ALL

    # Ingest removes what it stored: no state, no bitmap bit, no pending mark.
    await wait_until_async(lambda: no_traces(redis_client, s, "opt-me"), "erasure by ingest")
    bitmaps = await bitmap_positions(redis_client, s)
    assert all(positions.isdisjoint(bits) for bits in bitmaps.values())

    # Later events never add it back; nor does a replay of the old ones.
    await intender(producer, s, "opt-me", views=3)
    await wait_until_offsets(redis_client, s, 7)
    await asyncio.sleep(0.3)
    assert await segments_of(client, "opt-me") == []
    assert await stored_traces(redis_client, s, "opt-me") == []
    # Exports read the change stream: since the opt-out it only ever removed the cookie.
    assert await added_since(redis_client, s, positions, opted_at) == set()

    # A replica started now (a restart) knows the opt-out from Redis.
    fresh = await lookup(aiohttp_client, s, rules)
    assert await segments_of(fresh, "opt-me") == []
    assert await segments_of(fresh, "keep-me") == ALL


async def test_cli_opt_out_reaches_running_replicas(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    s = with_admin(settings, tmp_path)
    await start_ingest(s)
    await intender(producer, s, "cli-user")
    await wait_until_offsets(redis_client, s, 2)
    client = await lookup(aiohttp_client, s, rules)
    await wait_until_segments(client, "cli-user", ALL)
    env = {
        "DMP_REDIS_URL": s.redis.url,
        "DMP_REDIS_KEY_PREFIX": s.redis.key_prefix,
        "DMP_KAFKA_TOPIC": s.kafka.topic,
        "DMP_RULES_PATH": str(s.rules_path),
        "PATH": "/usr/bin:/bin",
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dmp.cli", "privacy", "opt-out", "cli-user"],
        env=env,
        capture_output=True,
        check=True,
    )
    assert orjson.loads(done.stdout)["removed"][0]["segments"] == sorted(ALL)
    await wait_until_segments(client, "cli-user", [])
    await wait_until_async(lambda: no_traces(redis_client, s, "cli-user"), "erasure by ingest")


async def test_erasure_is_not_undone_by_a_replay_only_by_new_consent(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    s = with_admin(settings, tmp_path)
    ingest = await start_ingest(s)
    long_ago = time.time() - 3600
    old_consent = encode_tc_string(purposes=[1, 3, 4], last_updated=long_ago)
    old = [
        {**new_car_view(uid, d + 1), "gdpr": 1, "consent": old_consent}
        for uid in ("erase-me", "api-consent")
        for d in range(2)
    ]
    await produce(producer, s.kafka.topic, old)
    await wait_until_offsets(redis_client, s, len(old))
    client = await lookup(aiohttp_client, s, rules)
    await wait_until_segments(client, "erase-me", ALL)
    matches = MatchTableStore(
        redis_client, prefix=s.redis.key_prefix, ttl_days=30, stream_maxlen=100
    )
    await matches.record("acme-dsp", "acme-user-77", "erase-me")
    match_keys = MatchKeys(s.redis.key_prefix, "acme-dsp")
    assert (
        await redis_client.exists(
            match_keys.forward("acme-user-77"), match_keys.reverse("erase-me")
        )
        == 2
    )

    for uid in ("erase-me", "api-consent"):
        report = await post_uid(client, "/v1/privacy/erase", uid)
        assert report["match_table_entries_removed"] == (["acme-dsp"] if uid == "erase-me" else [])
        assert report["status"] == "erased"
        assert report["removed"][0]["segments"] == sorted(ALL)
        assert sum(report["removed"][0]["counters"].values()) == 3
        await wait_until_async(lambda u=uid: no_traces(redis_client, s, u), "erasure")
        assert await segments_of(client, uid) == []
    assert (
        await redis_client.exists(
            match_keys.forward("acme-user-77"), match_keys.reverse("erase-me")
        )
        == 0
    )
    status = await client.get("/v1/privacy/users/erase-me", headers=admin())
    assert (await status.json())["stored"] == []

    # A replay of the old events (old consent) does not bring the cookies back.
    done = await applied(redis_client, s)
    await produce(producer, s.kafka.topic, old)
    await wait_until_offsets(redis_client, s, done + len(old))
    assert await stored_traces(redis_client, s, "erase-me") == []
    assert await segments_of(client, "erase-me") == []
    assert ingest.service.privacy.suppressed._value.get() >= len(old)

    # New consent, given after the erasure, in an event: segmented again from that event on.
    fresh = encode_tc_string(purposes=[1, 3, 4], last_updated=time.time() + 1)
    again = [{**new_car_view("erase-me", 0.5), "gdpr": 1, "consent": fresh}]
    # Recorded through the admin API: the next events count again.
    assert (await post_uid(client, "/v1/privacy/consent", "api-consent"))["lifted"] is True
    again += [new_car_view("api-consent", 0.5)]
    done = await applied(redis_client, s)
    await produce(producer, s.kafka.topic, again)
    await wait_until_offsets(redis_client, s, done + len(again))
    # One new view each: SoCal geo again, not yet the two views of intent.
    await wait_until_segments(client, "erase-me", ["geo_socal"])
    await wait_until_segments(client, "api-consent", ["geo_socal"])
    assert ingest.service.privacy.lifted._value.get() == 1


async def test_refused_events_are_counted_not_used(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    s = replace(settings, privacy=replace(settings.privacy, vendor_id=755))
    ingest = await start_ingest(s)
    ok = encode_tc_string(purposes=[1, 2, 3, 4], vendors=[755])
    cases: dict[str, dict[str, Any]] = {
        "tcf-ok": {"gdpr": 1, "consent": ok},
        "gpp-ok": {"gdpr": 1, "gpp": gpp_with(ok)},
        "no-gdpr": {},
        "gdpr-0": {"gdpr": 0},
        "gdpr-no-string": {"gdpr": 1},
        "purposes-missing": {"gdpr": 1, "consent": encode_tc_string(purposes=[1], vendors=[755])},
        "vendor-missing": {"gdpr": 1, "consent": encode_tc_string(purposes=[1, 3, 4])},
        "garbage": {"consent": "not a tc string!"},
        "gpp-us-only": {"gpp": encode_gpp({7: "BVVVVVVVVWA.YA"})},  # no TCF section, no GDPR
        "gpp-garbage": {"gpp": "DBABA~xyz"},
    }
    events = [
        {**new_car_view(uid, d + 1), **extra} for uid, extra in cases.items() for d in range(2)
    ]
    await produce(producer, s.kafka.topic, events)
    await wait_until_offsets(redis_client, s, len(events))
    client = await lookup(aiohttp_client, s, rules)
    await wait_until_segments(client, "tcf-ok", ALL)
    for uid in ("gpp-ok", "no-gdpr", "gdpr-0", "gpp-us-only"):
        assert await segments_of(client, uid) == ALL, uid
    for uid in ("gdpr-no-string", "purposes-missing", "vendor-missing", "garbage"):
        assert await segments_of(client, uid) == [], uid
    refused = ingest.service.privacy.refused
    counts = {r: refused.labels(r)._value.get() for r in ("no_consent", "purposes", "vendor")}
    assert counts == {"no_consent": 2, "purposes": 2, "vendor": 2}
    assert refused.labels("unreadable")._value.get() == 4  # garbage, gpp-garbage
    assert await segments_of(client, "gpp-garbage") == []


def gpp_with(tc: str) -> str:
    return encode_gpp({2: tc})


async def no_traces(client: aioredis.Redis, settings: Settings, uid: str) -> bool:
    return await stored_traces(client, settings, uid) == []


async def wait_until_async(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_until_segments(client: Client, uid: str, wanted: list[str]) -> None:
    deadline = time.monotonic() + 10
    while (got := await segments_of(client, uid)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{uid}: {got}, wanted {wanted}")
        await asyncio.sleep(0.05)


async def position_of(
    client: Client, settings: Settings, redis_client: aioredis.Redis, uid: str
) -> set[int]:
    from dmp.cookie_state import CookieState
    from dmp.ids import position

    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        raw = await redis_client.get(keys.cookie(uid))
        if raw is not None:
            return {position(p, CookieState.decode(as_bytes(raw)).local)}
    raise AssertionError(f"{uid} has no state")


async def added_since(
    client: aioredis.Redis, settings: Settings, positions: set[int], since: float
) -> set[int]:
    """Positions among `positions` that a change-stream entry written after `since` added."""
    added: set[int] = set()
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        entries: Any = await client.xrange(keys.changes)
        for _, fields in entries:
            doc = orjson.loads(fields[b"d"])
            if doc["w"] >= since:
                added.update(pos for ps in doc["a"].values() for pos in ps if pos in positions)
    return added


async def test_opted_out_cookie_is_in_no_export(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    out = tmp_path / "exports"
    s = with_admin(settings, tmp_path)
    assert s.partners_path is not None
    partners = s.partners_path
    partners.write_text(
        partner_yaml(destination=f"    destination: {{kind: file, path: '{out}'}}\n")
    )
    await start_ingest(s)
    await intender(producer, s, "export-out")
    await intender(producer, s, "export-in")
    await wait_until_offsets(redis_client, s, 4)
    client = await lookup(aiohttp_client, s, rules)
    await post_uid(client, "/v1/privacy/opt-out", "export-out")
    await wait_until_async(lambda: no_traces(redis_client, s, "export-out"), "erasure")
    await intender(producer, s, "export-out")  # after the opt-out: never exported
    await wait_until_offsets(redis_client, s, 6)

    profile = load_partner_file(partners).profiles["acme-dsp"]
    assert profile.destination is not None
    exporter = Exporter(
        redis_client,
        profile,
        rules,
        FileSink(profile.destination),
        DestinationMetrics.create(),
        prefix=s.redis.key_prefix,
        state_prefix="dest",
        topic=s.kafka.topic,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(exporter.run(stop))
    try:
        await wait_until(lambda: any(out.glob("*.jsonl")), 10, "an export")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    lines = [
        orjson.loads(line)
        for f in sorted(out.glob("*.jsonl"))
        for line in f.read_bytes().splitlines()
    ]
    exported = {line["user_id"]: line for line in lines}
    assert exported["export-in"]["add"] == ["acme-new-vehicles", "acme-socal-dealers"]
    assert all(not line["add"] for line in lines if line["user_id"] == "export-out")
