"""Keeps a Replica equal to Redis: load a snapshot, then tail each partition's change stream."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from pyroaring import BitMap
from redis.exceptions import RedisError

from dmp.ids import position
from dmp.keys import PartitionKeys, partitions_key
from dmp.metrics import LookupMetrics
from dmp.redis_types import as_bytes, as_opt_bytes, as_str
from dmp.replica import Replica

log = logging.getLogger(__name__)
READ_COUNT = 1000
SCAN_BATCH = 1000


class ChangeFollower:
    def __init__(
        self,
        client: aioredis.Redis,
        replica: Replica,
        metrics: LookupMetrics,
        *,
        prefix: str,
        topic: str,
        block_ms: int,
    ) -> None:
        self.client = client
        self.replica = replica
        self.metrics = metrics
        self.prefix = prefix
        self.topic = topic
        self.block_ms = block_ms
        self.cursors: dict[str, bytes] = {}  # stream key -> last applied entry id
        self.ready = asyncio.Event()
        self.healthy = True

    async def load_snapshot(self) -> None:
        raw = await self.client.smembers(partitions_key(self.prefix, self.topic))
        for partition in sorted(int(p) for p in raw):
            await self._load_partition(PartitionKeys(self.prefix, self.topic, partition))
        self._update_gauges()
        self.ready.set()
        self.metrics.ready.set(1)
        log.info(
            "replica loaded: %d cookies, %d memberships",
            len(self.replica.positions),
            self.replica.membership_count,
        )

    async def _load_partition(self, keys: PartitionKeys) -> None:
        # Read the stream position first: changes after it are replayed on top of the
        # snapshot, and replaying an absolute add/remove in order is harmless.
        last: Any = await self.client.xrevrange(keys.changes, count=1)
        self.cursors[keys.changes] = as_bytes(last[0][0]) if last else b"0-0"
        ids = as_opt_bytes(await self.client.get(keys.ids)) or b""
        self.replica.add_ids(
            (position(keys.partition, i), int.from_bytes(ids[i * 8 : i * 8 + 8], "big"))
            for i in range(len(ids) // 8)
        )
        async for batch in self._scan(keys.bitmap_pattern):
            values = await self.client.mget(batch)
            for key, raw in zip(batch, values, strict=True):
                if raw is None:
                    continue
                segment_id, _ = keys.parse_bitmap_key(key.decode())
                locals_ = BitMap.deserialize(as_bytes(raw))
                self.replica.add(segment_id, (position(keys.partition, loc) for loc in locals_))

    async def _scan(self, pattern: str) -> Any:
        cursor = 0
        while True:
            cursor, batch = await self.client.scan(cursor, match=pattern, count=SCAN_BATCH)
            if batch:
                yield batch
            if cursor == 0:
                return

    async def follow(self, stop: asyncio.Event) -> None:
        """Tail the change streams until ``stop``; survive Redis outages with backoff."""
        backoff = 0.1
        known_partitions_checked = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - known_partitions_checked > 1.0:
                    await self._discover_partitions()
                    known_partitions_checked = time.monotonic()
                if not self.cursors:
                    await asyncio.sleep(self.block_ms / 1000)
                    continue
                streams: dict[Any, Any] = dict(self.cursors)
                reply: Any = await self.client.xread(streams, count=READ_COUNT, block=self.block_ms)
                for stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self._apply(fields[b"d"])
                        self.cursors[as_str(stream)] = entry_id
                self._update_gauges()
                self.healthy = True
                backoff = 0.1
            except RedisError as exc:
                self.healthy = False
                self.metrics.follow_errors.inc()
                log.warning("change stream unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _discover_partitions(self) -> None:
        raw = await self.client.smembers(partitions_key(self.prefix, self.topic))
        for partition in sorted(int(p) for p in raw):
            keys = PartitionKeys(self.prefix, self.topic, partition)
            if keys.changes not in self.cursors:
                await self._load_partition(keys)

    def _apply(self, payload: bytes) -> None:
        doc = orjson.loads(payload)
        self.replica.add_ids((pos, h) for pos, h in doc["n"])
        for segment_id, positions in doc["a"].items():
            self.replica.add(segment_id, positions)
        for segment_id, positions in doc["r"].items():
            self.replica.remove(segment_id, positions)
        self.metrics.changes_applied.inc()
        self.metrics.freshness_seconds.observe(max(0.0, time.time() - doc["t"]))

    def _update_gauges(self) -> None:
        self.metrics.cookies.set(len(self.replica.positions))
        self.metrics.memberships.set(self.replica.membership_count)
