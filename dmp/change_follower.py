"""Keeps a Replica equal to Redis: load each partition, then tail its change stream.

A partition loads from its snapshot (the user-major index a replica wrote earlier, with
the stream id it was at) when the stream still holds every entry after that id; otherwise
from the segment bitmaps. Entries are absolute adds/removes, so replaying one that the
loaded state already holds is harmless. A replica whose cursor was trimmed away (it fell
too far behind) reloads that partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from pyroaring import BitMap, BitMap64
from redis.exceptions import ResponseError

from dmp.ids import LOCAL_BITS
from dmp.keys import PartitionKeys, partitions_key
from dmp.metrics import LookupMetrics
from dmp.redis_client import REDIS_FAILURES, read_streams, scan_batches
from dmp.redis_types import as_bytes, as_str
from dmp.replica import PartitionIndex, Replica

log = logging.getLogger(__name__)
READ_COUNT = 1000
SCAN_BATCH = 1000
SIZE_INTERVAL = 5.0  # seconds between cookie and membership counts (cheap: kept counters)
# Seconds between two bitmap size readings, one partition a turn. A reading walks every
# container of the partition's index on the event loop (~12-15 ms at 2.5M cookies): every
# 5 s that was a stall in the p99.9 of every rate, and the gauge moves slowly anyway.
BITMAP_SIZE_INTERVAL = 60.0
GAP_CHECK_INTERVAL = 1.0
StreamId = tuple[int, int]


def parse_stream_id(raw: bytes | str) -> StreamId:
    ms, _, seq = as_str(raw).partition("-")
    return int(ms), int(seq or 0)


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
        snapshot_interval: float = 0.0,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.on_loaded = on_loaded  # run once the first load is done, before ready
        self.replica = replica
        self.metrics = metrics
        self.prefix = prefix
        self.topic = topic
        self.block_ms = block_ms
        self.snapshot_interval = snapshot_interval
        self.cursors: dict[str, bytes] = {}  # stream key -> last applied entry id
        self.seqs: dict[str, int] = {}  # stream key -> entries consumed up to the cursor
        self._keys: dict[str, PartitionKeys] = {}  # stream key -> its partition's keys
        self.ready = asyncio.Event()
        self.healthy = True
        self.reloads = 0
        self.overlapped_loads = 0
        self.sources: dict[int, str] = {}  # partition -> "snapshot" or "bitmaps", last load
        self._populations_dirty = True
        self._caught_up_at = time.monotonic()
        self._sized_at = 0.0
        self._bitmap_sized_at = 0.0
        self._size_turn = 0
        self._bitmap_sizes: dict[int, int] = {}  # partition -> index bytes, last reading
        self._gaps_checked_at = time.monotonic()
        self._snapshot_at = time.monotonic()
        shard = replica.shard
        self.metrics.shard.labels(
            "all" if shard is None else shard.label,
            "all" if shard is None else ",".join(map(str, shard.owned_partitions)),
        ).set(1)

    # -- loading -------------------------------------------------------------------------
    async def load_snapshot(self) -> None:
        """Load every known partition; the replica is ready afterwards."""
        started = time.monotonic()
        for partition in await self._partitions():
            await self.load_partition(PartitionKeys(self.prefix, self.topic, partition))
        self._update_gauges(force=True)
        if self.on_loaded is not None:
            self.on_loaded()
        self.ready.set()
        self.metrics.ready.set(1)
        log.info(
            "replica loaded in %.1fs: %d cookies, %d memberships",
            time.monotonic() - started,
            self.replica.cookie_count,
            self.replica.membership_count,
        )

    async def load_partition(self, keys: PartitionKeys) -> None:
        view, cursor, seq, source = await self._read_snapshot(keys)
        if view is None:
            # The stream position first: later entries are replayed on top of the bitmaps.
            cursor, seq, _ = await self._stream_position(keys)
            view = await self._read_bitmaps(keys)
            source = "bitmaps"
            newest: Any = await self.client.xrevrange(keys.changes, count=1)
            if newest and parse_stream_id(newest[0][0]) > parse_stream_id(cursor):
                # Commits landed during the scan: their entries will be replayed on top.
                self.overlapped_loads += 1
        ids = await self.client.get(keys.ids)
        if ids:
            hashes = np.frombuffer(as_bytes(ids), dtype=">u8").astype(np.uint64)
            base = np.uint64(keys.partition << LOCAL_BITS)
            positions = base + np.arange(len(hashes), dtype=np.uint64)
            self.replica.ids.extend(hashes, positions)
        self.replica.replace_partition(keys.partition, view)
        self.cursors[keys.changes] = cursor
        self.seqs[keys.changes] = seq
        self._keys[keys.changes] = keys
        self.sources[keys.partition] = source
        log.info(
            "partition %d loaded from %s: %d memberships", keys.partition, source, len(view.index)
        )

    async def _read_snapshot(
        self, keys: PartitionKeys
    ) -> tuple[PartitionIndex | None, bytes, int, str]:
        fields: Any = await self.client.hmget(
            keys.snapshot, ["cursor", "seq", "slots", "index", "populations"]
        )
        if any(f is None for f in fields):
            return None, b"0-0", 0, "none"
        cursor, seq = as_bytes(fields[0]), int(fields[1])
        if await self._trimmed_after(keys, seq):
            log.info("partition %d: snapshot older than the stream's history", keys.partition)
            return None, b"0-0", 0, "none"
        slot_names: list[str] = orjson.loads(fields[2])
        view = PartitionIndex(
            index=BitMap64.deserialize(as_bytes(fields[3])),
            slot_names=slot_names,
            slots={name: n for n, name in enumerate(slot_names)},
            populations=orjson.loads(fields[4]),
        )
        return view, cursor, seq, "snapshot"

    async def _read_bitmaps(self, keys: PartitionKeys) -> PartitionIndex:
        """The partition's index from its segment bitmaps, one chunk of cookies at a time in
        order: the user-major bitmap is then appended to, not inserted into (a 10M-cookie
        store's load: 173 s before, 31.5 s with docs/decisions/0013, 20 s with 0014)."""
        # Key -> segment per chunk: SCAN may return a key twice, which must count once.
        by_chunk: dict[int, dict[Any, str]] = {}
        async for batch in scan_batches(self.client, keys.bitmap_pattern, SCAN_BATCH):
            for key in batch:
                segment_id, chunk = keys.parse_bitmap_key(as_str(key))
                by_chunk.setdefault(chunk, {})[key] = segment_id
        view = PartitionIndex()
        for chunk in sorted(by_chunk):
            segments = by_chunk[chunk]
            chunk_keys = list(segments)
            members = []
            for at in range(0, len(chunk_keys), SCAN_BATCH):
                batch = chunk_keys[at : at + SCAN_BATCH]
                # One partition's keys: one hash tag, one slot on a cluster.
                values = await self.client.mget(batch)
                for key, raw in zip(batch, values, strict=True):
                    if raw is not None:
                        locals_ = BitMap.deserialize(as_bytes(raw)).to_array()  # array('I')
                        members.append((segments[key], np.frombuffer(locals_, dtype=np.uint32)))
            view.add_chunk(members)
        view.finish_load()
        return view

    async def _stream_position(self, keys: PartitionKeys) -> tuple[bytes, int, int]:
        """(last entry id, entries ever added, entries removed from the head), read atomically."""
        try:
            info: Any = await self.client.xinfo_stream(keys.changes)
        except ResponseError:
            return b"0-0", 0, 0  # no stream yet
        added = int(info["entries-added"])
        return as_bytes(info["last-generated-id"]), added, added - int(info["length"])

    async def _trimmed_after(self, keys: PartitionKeys, seq: int) -> bool:
        """True when entries after the first ``seq`` were trimmed away (a gap we cannot read).

        ``XTRIM`` does not move ``max-deleted-entry-id``, so count: the head has lost
        ``entries-added - length`` entries; more than we had consumed means a gap.
        """
        _, _, removed = await self._stream_position(keys)
        return removed > seq

    # -- following -----------------------------------------------------------------------
    async def follow(self, stop: asyncio.Event) -> None:
        """Tail the change streams until ``stop``; survive Redis outages with backoff."""
        backoff = 0.1
        known_partitions_checked = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - known_partitions_checked > 1.0:
                    await self._discover_partitions()
                    known_partitions_checked = time.monotonic()
                if time.monotonic() - self._gaps_checked_at > GAP_CHECK_INTERVAL:
                    await self._reload_trimmed()
                    self._gaps_checked_at = time.monotonic()
                if (
                    self.snapshot_interval
                    and time.monotonic() - self._snapshot_at > self.snapshot_interval
                ):
                    await self.write_snapshots()
                    self._snapshot_at = time.monotonic()
                if not self.cursors:
                    # Nothing written yet: Redis answered, and there is nothing to catch up on.
                    self._mark_healthy(caught_up=True)
                    await asyncio.sleep(self.block_ms / 1000)
                    continue
                await self._read_once()
                if self.replica.ids.merge_due:
                    await self.replica.ids.merge()  # new cookie ids, off the event loop
                backoff = 0.1
            except REDIS_FAILURES as exc:
                self.healthy = False
                self.metrics.redis_connected.set(0)
                self.metrics.change_stream_lag.set(time.monotonic() - self._caught_up_at)
                self.metrics.follow_errors.inc()
                log.warning("change stream unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read_once(self) -> None:
        reply = await read_streams(self.client, self.cursors, READ_COUNT, self.block_ms)
        behind = False
        for stream, entries in reply:
            key = as_str(stream)
            behind = behind or len(entries) >= READ_COUNT
            for entry_id, fields in entries:
                self._apply(fields[b"d"])
                self.cursors[key] = entry_id
                self.seqs[key] += 1
        self._mark_healthy(caught_up=not behind)

    def _mark_healthy(self, *, caught_up: bool) -> None:
        if caught_up:
            self._caught_up_at = time.monotonic()
        self.healthy = True
        self.metrics.redis_connected.set(1)
        self._update_gauges()
        if caught_up:
            self.metrics.change_stream_lag.set(0)

    async def _partitions(self) -> list[int]:
        """The partitions with state that this replica holds: all, or its shard's."""
        raw = await self.client.smembers(partitions_key(self.prefix, self.topic))
        known = sorted(int(p) for p in raw)
        shard = self.replica.shard
        if shard is None:
            return known
        beyond = [p for p in known if p >= shard.partitions]
        if beyond:
            # Clients route with DMP_KAFKA_PARTITIONS: with more partitions in the topic they
            # would send some cookies to the wrong shard, so say it loudly.
            log.error(
                "partitions %s exist but DMP_KAFKA_PARTITIONS is %d: shard routing is wrong",
                beyond,
                shard.partitions,
            )
        return [p for p in known if shard.owns_partition(p)]

    async def _discover_partitions(self) -> None:
        for partition in await self._partitions():
            keys = PartitionKeys(self.prefix, self.topic, partition)
            if keys.changes not in self.cursors:
                await self.load_partition(keys)

    async def _reload_trimmed(self) -> None:
        for stream in list(self.cursors):
            if await self._trimmed_after(self._keys[stream], self.seqs[stream]):
                log.warning("%s: fell behind the trimmed change stream; reloading", stream)
                self.reloads += 1
                await self.load_partition(self._keys[stream])

    def _apply(self, payload: bytes) -> None:
        doc = orjson.loads(payload)
        self.replica.add_ids((pos, h) for pos, h in doc["n"])
        for segment_id, positions in doc["a"].items():
            self.replica.add(segment_id, positions)
        for segment_id, positions in doc["r"].items():
            self.replica.remove(segment_id, positions)
        self._populations_dirty = True
        self.metrics.changes_applied.inc()
        self.metrics.freshness_seconds.observe(max(0.0, time.time() - doc["t"]))

    # -- snapshots -----------------------------------------------------------------------
    async def write_snapshots(self) -> int:
        """Write each partition's index with the stream id it reflects; one writer at a time."""
        written = 0
        for stream, keys in list(self._keys.items()):
            locked = await self.client.set(keys.snapshot_lock, b"1", nx=True, ex=60)
            if not locked:
                continue  # another replica is writing this partition
            try:
                view = self.replica.partitions.get(keys.partition)
                if view is None:
                    continue
                # No await between reading the cursor and serialising: they are consistent.
                mapping = {
                    "cursor": self.cursors[stream],
                    "seq": str(self.seqs[stream]),
                    "slots": orjson.dumps(view.slot_names),
                    "index": view.index.serialize(),
                    "populations": orjson.dumps(view.populations),
                    "written_at": str(time.time()),
                }
                await self.client.hset(keys.snapshot, mapping=mapping)  # type: ignore[arg-type]  # bytes values are fine
                written += 1
            finally:
                await self.client.delete(keys.snapshot_lock)
        return written

    # -- gauges --------------------------------------------------------------------------
    def _update_gauges(self, *, force: bool = False) -> None:
        self.metrics.change_stream_lag.set(time.monotonic() - self._caught_up_at)
        if self._populations_dirty or force:
            self._populations_dirty = False
            populations = self.replica.populations()
            for segment_id in self.replica.rules.base_segment_ids:
                self.metrics.segment_members.set(segment_id, populations.get(segment_id, 0))
        if not force and time.monotonic() - self._sized_at < SIZE_INTERVAL:
            return
        self._sized_at = time.monotonic()
        self.metrics.cookies.set(self.replica.cookie_count)
        self.metrics.memberships.set(self.replica.membership_count)
        if not force and time.monotonic() - self._bitmap_sized_at < BITMAP_SIZE_INTERVAL:
            return
        self._bitmap_sized_at = time.monotonic()
        # One partition a turn (all of them when forced): sizing walks every container, and
        # all partitions at once stalled lookups ~50 ms at 10M cookies.
        partitions = sorted(self.replica.partitions)
        if force:
            self._bitmap_sizes = {p: self.replica.bitmap_bytes(p) for p in partitions}
        elif partitions:
            turn = partitions[self._size_turn % len(partitions)]
            self._size_turn += 1
            self._bitmap_sizes[turn] = self.replica.bitmap_bytes(turn)
        self.metrics.bitmap_bytes.set(sum(self._bitmap_sizes.get(p, 0) for p in partitions))
