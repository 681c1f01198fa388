"""One partition's slice of the Redis store, owned by exactly one ingest consumer at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from pyroaring import BitMap
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from dmp.cookie_state import CookieState
from dmp.ids import CHUNK_BITS, position
from dmp.keys import PartitionKeys, partitions_key
from dmp.partition_batch import BatchPlan
from dmp.redis_types import as_bytes, as_str

log = logging.getLogger(__name__)


class Fenced(Exception):
    """Another consumer wrote this partition since we loaded it: we no longer own it."""


def refused(tag: str, exc: WatchError) -> Exception:
    """Why a watched transaction was refused. redis-py also raises WatchError when the
    connection fails while a key is watched ("A TimeoutError occurred while watching..."):
    that is a Redis failure, retried with backoff (whether EXEC landed is unknown, so the
    partition is re-read either way), not another writer."""
    failure = exc.__cause__ or exc.__context__
    if isinstance(failure, RedisConnectionError | RedisTimeoutError):
        return RedisConnectionError(f"{tag}: {exc}")
    return Fenced(f"{tag}: written by another consumer")


# One command for a whole batch's cookie states (redis-py's per-command cost dominated ingest
# when each state was its own SET); all keys share the partition's hash tag, so one slot.
SET_STATES = """
for i = 1, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""
# Bitmap chunks: an empty value deletes the key (an empty bitmap is no key at all).
SET_CHUNKS = """
for i = 1, #KEYS do
    if ARGV[i] == '' then
        redis.call('DEL', KEYS[i])
    else
        redis.call('SET', KEYS[i], ARGV[i])
    end
end
return #KEYS
"""


class PartitionStore:
    """Reads and atomically writes one partition's state; caches what it alone writes.

    The consumer that owns a partition is its only writer, so its cached cookie states and
    bitmap chunks are the truth as long as every commit succeeds; any failed commit drops
    both caches, since the batch's plan already changed the cached states in place.

    A cookie the cache did not hold is cached as the bytes just written (~230 B with 1,000
    segments); one it held, as the ``CookieState`` object (~1,670 B). Most cookies are
    Zipf's tail, seen once, and cost little memory that way; the ones seen again are
    decoded once and then reused as objects (docs/decisions/0020).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        keys: PartitionKeys,
        *,
        state_ttl: int,
        stream_maxlen: int,
        max_cached_states: int = 500_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.state_ttl = state_ttl
        self.stream_maxlen = stream_maxlen
        # Past this many the cache is emptied whole and refilled from Redis (0: no cache):
        # cheaper per batch than tracking recency for an LRU.
        self.max_cached_states = max_cached_states
        self.next_offset: int | None = None
        self.next_local = 0
        self._chunks: dict[tuple[str, int], BitMap] = {}
        self._states: dict[str, CookieState | bytes] = {}

    async def load(self) -> None:
        offset, next_local = await self.client.mget([self.keys.offset, self.keys.next_local])
        self.next_offset = int(offset) if offset is not None else None
        self.next_local = int(next_local) if next_local is not None else 0
        self._chunks.clear()
        self._states.clear()
        await self.client.sadd(
            partitions_key(self.keys.prefix, self.keys.topic), str(self.keys.partition)
        )

    async def fetch_states(self, uids: Iterable[str]) -> dict[str, CookieState | None]:
        found: dict[str, CookieState | None] = {}
        missing = []
        for uid in uids:
            state = self._states.get(uid)
            if state is None:
                missing.append(uid)
            elif isinstance(state, bytes):
                found[uid] = CookieState.decode(state)
            else:
                found[uid] = state
        if missing:
            raws = await self.client.mget([self.keys.cookie(u) for u in missing])
            for uid, raw in zip(missing, raws, strict=True):
                found[uid] = CookieState.decode(as_bytes(raw)) if raw is not None else None
        return found

    async def due_uids(self, now: float, limit: int) -> list[str]:
        raw = await self.client.zrangebyscore(self.keys.due, "-inf", now, start=0, num=limit)
        return [as_str(r) for r in raw]

    async def commit(
        self,
        plan: BatchPlan,
        next_offset: int | None,
        produced_at: float,
        also: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Write the plan, the new offset and a change-stream entry in one transaction.

        ``also`` queues more commands into that transaction (a backfill chunk's bookkeeping).
        """
        try:
            encoded = {uid: state.encode() for uid, state in plan.states.items()}
            await self._commit(plan, encoded, next_offset, produced_at, also)
        except BaseException:
            self._chunks.clear()
            self._states.clear()
            raise
        cache = self._states
        if len(cache) + len(plan.states) > self.max_cached_states:
            cache.clear()
        if len(plan.states) <= self.max_cached_states:
            for uid, state in plan.states.items():
                cache[uid] = state if uid in cache else encoded[uid]
        for uid in plan.forgotten:
            cache.pop(uid, None)

    async def mark_rules_from(self, version: int) -> None:
        """Record, once, the offset from which this partition applies rule ``version``.

        Fenced like a batch: only the owner's position is the truth. A backfill reads the
        history before this offset; everything from it on was evaluated live by ``version``.
        """
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.offset)
            stored = await pipe.get(self.keys.offset)
            if (int(stored) if stored is not None else None) != self.next_offset:
                raise Fenced(f"{self.keys.tag}: offset moved to {stored!r}")
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() untyped
            # No offset yet: the partition is consumed from its start, all of it by ``version``.
            pipe.hsetnx(self.keys.rules_from, str(version), self.next_offset or 0)
            try:
                await pipe.execute()
            except WatchError as exc:
                raise refused(self.keys.tag, exc) from exc

    async def _commit(
        self,
        plan: BatchPlan,
        encoded: dict[str, bytes],
        next_offset: int | None,
        produced_at: float,
        also: Callable[[Pipeline], None] | None,
    ) -> None:
        dirty = await self._dirty_chunks(plan)
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.offset)
            stored = await pipe.get(self.keys.offset)
            if (int(stored) if stored is not None else None) != self.next_offset:
                self._chunks.clear()  # our cached copies may be stale
                raise Fenced(f"{self.keys.tag}: offset moved to {stored!r}")
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() untyped
            if encoded:
                # Every state is kept until its TTL, even an empty one: forgetting a cookie
                # when its history empties would make numbering depend on when a batch ran.
                pipe.eval(
                    SET_STATES,
                    len(encoded),
                    *[self.keys.cookie(u) for u in encoded],
                    self.state_ttl,
                    *encoded.values(),
                )
            if dirty:
                # Every chunk in one command, like the states (redis-py's cluster pipeline
                # refuses MSET): a batch with 1,000 segments dirties ~170 chunks, so one
                # command for redis-py to pack and parse instead of ~170.
                pipe.eval(
                    SET_CHUNKS,
                    len(dirty),
                    *[self.keys.bitmap(s, c) for s, c in dirty],
                    *[b.serialize() if b else b"" for b in dirty.values()],
                )
            if plan.new_ids:
                pipe.append(self.keys.ids, b"".join(h.to_bytes(8, "big") for _, h in plan.new_ids))
                pipe.set(self.keys.next_local, plan.next_local)
            due_add = {uid: t for uid, t in plan.due.items() if t is not None}
            due_remove = [uid for uid, t in plan.due.items() if t is None]
            if due_add:
                pipe.zadd(self.keys.due, due_add)
            if due_remove:
                pipe.zrem(self.keys.due, *due_remove)
            if plan.erased:
                pipe.srem(self.keys.privacy_pending, *plan.erased)
            if plan.forgotten:
                pipe.delete(*[self.keys.cookie(u) for u in plan.forgotten])
            for local in plan.forgotten.values():
                pipe.setrange(self.keys.ids, local * 8, bytes(8))  # the erased id's hash
            if next_offset is not None:
                pipe.set(self.keys.offset, next_offset)
            if also is not None:
                also(pipe)
            if plan.change_count or plan.new_ids:
                pipe.xadd(
                    self.keys.changes,
                    {"d": self._change_entry(plan, produced_at)},
                    maxlen=self.stream_maxlen,
                    approximate=True,
                )
            try:
                await pipe.execute()
            except WatchError as exc:
                self._chunks.clear()
                raise refused(self.keys.tag, exc) from exc
        if next_offset is not None:
            self.next_offset = next_offset
        self.next_local = plan.next_local

    async def _dirty_chunks(self, plan: BatchPlan) -> dict[tuple[str, int], BitMap]:
        """The batch's changed bitmap chunks, changed in the cache itself: a failed commit
        drops the whole cache (``commit``), so it never runs ahead of Redis. Chunks not
        cached yet are read in one MGET, not one GET each (~170 a batch with 1,000
        segments at first)."""
        edits: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for changes, side in ((plan.added, 0), (plan.removed, 1)):
            for segment_id, locals_ in changes.items():
                for local in locals_:
                    key = (segment_id, local >> CHUNK_BITS)  # chunk_of, inline: per change
                    edit = edits.get(key)
                    if edit is None:
                        edit = edits[key] = ([], [])
                    edit[side].append(local)
        missing = [key for key in edits if key not in self._chunks]
        if missing:
            # One partition's keys: one hash tag, one slot on a cluster.
            raws = await self.client.mget([self.keys.bitmap(s, c) for s, c in missing])
            for key, raw in zip(missing, raws, strict=True):
                self._chunks[key] = BitMap.deserialize(as_bytes(raw)) if raw else BitMap()
        dirty: dict[tuple[str, int], BitMap] = {}
        for key, (added, removed) in edits.items():
            bitmap = dirty[key] = self._chunks[key]
            bitmap.update(added)
            if removed:
                bitmap.difference_update(BitMap(removed))
        return dirty

    def _change_entry(self, plan: BatchPlan, produced_at: float) -> bytes:
        p = self.keys.partition
        changed = {loc for ls in (*plan.added.values(), *plan.removed.values()) for loc in ls}
        doc: dict[str, Any] = {
            "a": {s: [position(p, loc) for loc in ls] for s, ls in plan.added.items()},
            "r": {s: [position(p, loc) for loc in ls] for s, ls in plan.removed.items()},
            "n": [[position(p, loc), h] for loc, h in plan.new_ids],
            # Cookie ids of the positions above, so exports (dmp.destinations) can name users.
            "u": [
                [position(p, st.local), uid]
                for uid, st in plan.states.items()
                if st.local in changed
            ],
            "t": produced_at,
            "w": time.time(),
        }
        return orjson.dumps(doc)
