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
SIZE_INTERVAL = 5.0  # seconds between bitmap size readings (cost grows with the index)


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
        self.populations: dict[str, int] = {}  # base segment -> members
        self._changed_populations: set[str] = set()
        # Stream key -> newest entry id that the snapshot may already contain (see _apply).
        self._replay_until: dict[str, tuple[int, int]] = {}
        self._caught_up_at = time.monotonic()
        self._sized_at = 0.0
        self._seeded = False

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
                self._count(segment_id, len(locals_))
        # Entries up to the stream's end now may be in the bitmaps just read as well.
        newest: Any = await self.client.xrevrange(keys.changes, count=1)
        if newest and as_bytes(newest[0][0]) != self.cursors[keys.changes]:
            self._replay_until[keys.changes] = _entry_id(newest[0][0])

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
                    # Nothing written yet: Redis answered, and there is nothing to catch up on.
                    self._caught_up_at = time.monotonic()
                    self.healthy = True
                    self.metrics.redis_connected.set(1)
                    self.metrics.change_stream_lag.set(0)
                    await asyncio.sleep(self.block_ms / 1000)
                    continue
                streams: dict[Any, Any] = dict(self.cursors)
                reply: Any = await self.client.xread(streams, count=READ_COUNT, block=self.block_ms)
                behind = False
                for stream, entries in reply or []:
                    key = as_str(stream)
                    behind = behind or len(entries) >= READ_COUNT
                    for entry_id, fields in entries:
                        self._apply(fields[b"d"], self._maybe_in_snapshot(key, entry_id))
                        self.cursors[key] = entry_id
                if not behind:
                    self._caught_up_at = time.monotonic()
                self._update_gauges()
                self.healthy = True
                self.metrics.redis_connected.set(1)
                backoff = 0.1
            except RedisError as exc:
                self.healthy = False
                self.metrics.redis_connected.set(0)
                self.metrics.change_stream_lag.set(time.monotonic() - self._caught_up_at)
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

    def _maybe_in_snapshot(self, stream: str, entry_id: bytes) -> bool:
        until = self._replay_until.get(stream)
        if until is None:
            return False
        if _entry_id(entry_id) <= until:
            return True
        del self._replay_until[stream]
        return False

    def _apply(self, payload: bytes, maybe_in_snapshot: bool = False) -> None:
        """Apply one entry; an entry the snapshot may hold already is counted by what it changed.

        Ingest writes only transitions, so an entry read after the snapshot changes the
        populations by the sizes of its lists; measuring the index (a few ms at 10M cookies)
        is kept for the few entries replayed over the snapshot.
        """
        doc = orjson.loads(payload)
        self.replica.add_ids((pos, h) for pos, h in doc["n"])
        for segment_id, positions in doc["a"].items():
            before = self.replica.membership_count if maybe_in_snapshot else 0
            self.replica.add(segment_id, positions)
            added = self.replica.membership_count - before if maybe_in_snapshot else len(positions)
            self._count(segment_id, added)
        for segment_id, positions in doc["r"].items():
            before = self.replica.membership_count if maybe_in_snapshot else 0
            self.replica.remove(segment_id, positions)
            gone = before - self.replica.membership_count if maybe_in_snapshot else len(positions)
            self._count(segment_id, -gone)
        self.metrics.changes_applied.inc()
        self.metrics.freshness_seconds.observe(max(0.0, time.time() - doc["t"]))

    def _count(self, segment_id: str, delta: int) -> None:
        self.populations[segment_id] = self.populations.get(segment_id, 0) + delta
        self._changed_populations.add(segment_id)

    def _update_gauges(self) -> None:
        self.metrics.cookies.set(len(self.replica.positions))
        self.metrics.memberships.set(self.replica.membership_count)
        self.metrics.change_stream_lag.set(time.monotonic() - self._caught_up_at)
        if not self._seeded:
            # Base segments nobody is in yet are reported as 0, not absent.
            self._seeded = True
            for segment_id in self.replica.rules.base_segment_ids:
                self._count(segment_id, 0)
        for segment_id in self._changed_populations:
            self.metrics.segment_members.set(segment_id, self.populations[segment_id])
        self._changed_populations.clear()
        if time.monotonic() - self._sized_at >= SIZE_INTERVAL:
            self._sized_at = time.monotonic()
            stats = self.replica.index.get_statistics()
            self.metrics.bitmap_bytes.set(
                stats["n_bytes_array_containers"]
                + stats["n_bytes_run_containers"]
                + stats["n_bytes_bitset_containers"]
            )


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    ms, _, seq = as_str(raw).partition("-")
    return int(ms), int(seq or 0)
