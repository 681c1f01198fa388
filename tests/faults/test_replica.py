"""Lookup replicas: restarted, or frozen while the change stream moved on and was trimmed
past them; either way their answers converge to a fresh replica's. Public behaviour only:
`dmp lookup` processes answering HTTP, as a load balancer sees them."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from dmp.config import Settings
from dmp.keys import PartitionKeys
from tests.faults.conftest import scaled
from tests.faults.support import (
    Process,
    free_port,
    produce,
    service_env,
    started,
    stream_events,
    wait_applied,
    wait_for,
)

EVENTS = scaled("DMP_FAULTS_REPLICA_EVENTS", 20_000)
COOKIES = 3000
SAMPLE = 400


async def stream_counts(client: aioredis.Redis, s: Settings) -> dict[int, tuple[int, int]]:
    """Per partition: (entries ever added to the change stream, entries trimmed away)."""
    out = {}
    for p in range(s.kafka.partitions):
        info: Any = await client.xinfo_stream(
            PartitionKeys(s.redis.key_prefix, s.kafka.topic, p).changes
        )
        added = int(info["entries-added"])
        out[p] = (added, added - int(info["length"]))
    return out


class Lookup:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.port = free_port()
        s = replace(settings, lookup=replace(settings.lookup, port=self.port))
        self.proc = Process("lookup", service_env(s), log)
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.base + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def answers(self, session: aiohttp.ClientSession, uids: list[str]) -> dict[str, Any]:
        out = {}
        for uid in uids:
            async with session.get(f"{self.base}/v1/users/{uid}/segments") as response:
                assert response.status == 200
                out[uid] = (await response.json())["segments"]
        return out


async def test_frozen_replica_behind_a_trimmed_stream_converges(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Small batches and a short stream: a replica that sleeps falls off the stream's end.
    s = replace(
        settings,
        kafka=replace(settings.kafka, max_batch=10),
        redis=replace(settings.redis, change_stream_maxlen=100),
        lookup=replace(settings.lookup, snapshot_interval_seconds=0),
    )
    now = time.time()
    first = list(stream_events(EVENTS // 2, COOKIES, seed=51, now=now))
    second = list(stream_events(EVENTS // 2, COOKIES, seed=52, now=now))
    uids = sorted({e["uid"] for e in first + second})[:SAMPLE]
    ingest = Process("ingest", service_env(s), tmp_path / "ingest.log")
    old = Lookup(s, tmp_path / "old.log")
    fresh: Lookup | None = None
    async with aiohttp.ClientSession() as session:
        try:
            await started(ingest)
            await produce(s.kafka.bootstrap, s.kafka.topic, first)
            await wait_applied(redis_client, s, len(first))
            await wait_for(lambda: old.ready(session), 30, "replica ready")
            before = await old.answers(session, uids)

            seen = await stream_counts(redis_client, s)
            old.proc.signal(signal.SIGSTOP)  # frozen: follows nothing
            await produce(s.kafka.bootstrap, s.kafka.topic, second)
            await wait_applied(redis_client, s, len(first) + len(second))
            after = await stream_counts(redis_client, s)
            # Per partition, more entries were trimmed away than the replica had ever read.
            assert all(after[p][1] > seen[p][0] for p in after), (seen, after)
            lost = sum(trimmed for _, trimmed in after.values())
            old.proc.signal(signal.SIGCONT)

            fresh = Lookup(s, tmp_path / "fresh.log")
            await wait_for(lambda: fresh is not None and fresh.ready(session), 30, "fresh ready")
            truth = await fresh.answers(session, uids)
            assert truth != before  # the second wave changed memberships

            async def converged() -> bool:
                assert fresh is not None
                return await old.answers(session, uids) == truth

            await wait_for(converged, 30, "the frozen replica to converge")
            assert "reloading" in old.proc.output()

            # Restarted: starts from Redis and answers the same.
            old.proc.signal(signal.SIGTERM)
            assert await old.proc.wait(30) == 0
            restarted = Lookup(s, tmp_path / "restarted.log")
            try:
                await wait_for(lambda: restarted.ready(session), 30, "restarted ready")
                assert await restarted.answers(session, uids) == truth
            finally:
                restarted.proc.signal(signal.SIGTERM)
                await restarted.proc.wait(30)
        finally:
            for proc in (ingest, old.proc, *([fresh.proc] if fresh else [])):
                if proc.alive:
                    proc.signal(signal.SIGCONT)
                    await proc.kill()
    print(f"\nreplica frozen while {lost} stream entries were trimmed: converged")
