"""Audience arithmetic on the store: populations, overlaps and samples, as ad ops plan with.

Composite segments are computed by bitmap algebra over their parts, partition by partition
(positions of different partitions never meet, so the partition results simply add up).

Paused segments (built for a backfill, docs/decisions/0005-backfill.md): asked for by name,
a paused segment answers what it holds so far, so ad ops can follow a backfill; callers show
`status()` beside the figure. Inside a composite a paused part counts as empty, as lookups
treat it, so an active composite's figures are the audience partners really get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pyroaring import BitMap

from dmp.cookie_state import CookieState
from dmp.keys import PartitionKeys, partitions_key
from dmp.redis_client import scan_batches
from dmp.redis_types import as_bytes, as_str
from segment_rules import CompiledRules
from segment_rules.graph import evaluate_composite
from segment_rules.model import All, AnyOf, Composite, Not, SegmentRef

SCAN_COUNT = 1000


@dataclass(frozen=True)
class Overlap:
    a: str
    b: str
    both: int
    a_total: int
    b_total: int

    @property
    def percent_of_a(self) -> float:
        return 100.0 * self.both / self.a_total if self.a_total else 0.0

    @property
    def percent_of_b(self) -> float:
        return 100.0 * self.both / self.b_total if self.b_total else 0.0


class Audience:
    def __init__(
        self, client: aioredis.Redis, prefix: str, topic: str, rules: CompiledRules
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self.rules = rules
        self._segments = {s.id: s for s in rules.ruleset.segments}
        self._active_base = frozenset(
            s.id for s in rules.ruleset.base_segments if s.status == "active"
        )

    def status(self, segment_id: str) -> str:
        """'active' or 'paused': a paused segment's figures are not what lookups answer."""
        self._check(segment_id)
        return self._segments[segment_id].status

    def _check(self, segment_id: str) -> None:
        if segment_id not in self._segments:
            known = ", ".join(sorted(self._segments))
            raise KeyError(f"unknown segment '{segment_id}'; known: {known}")

    async def partitions(self) -> list[PartitionKeys]:
        raw = await self.client.smembers(partitions_key(self.prefix, self.topic))
        return [PartitionKeys(self.prefix, self.topic, int(p)) for p in sorted(int(x) for x in raw)]

    async def members(self, segment_id: str, keys: PartitionKeys) -> BitMap:
        """Local positions of ``segment_id``'s members in one partition."""
        self._check(segment_id)
        seg = self._segments[segment_id]
        if seg.of is not None:
            return await self._evaluate(seg.of, keys)
        result = BitMap()
        pattern = f"{keys.tag}:bm:{segment_id}:*"
        async for batch in scan_batches(self.client, pattern, SCAN_COUNT):
            for raw in await self.client.mget(batch):
                if raw is not None:
                    result |= BitMap.deserialize(as_bytes(raw))
        return result

    async def _evaluate(self, expr: Composite, keys: PartitionKeys) -> BitMap:
        if isinstance(expr, SegmentRef):
            if self._segments[expr.segment_id].status != "active":
                return BitMap()  # lookups hold nobody in a paused part
            return await self.members(expr.segment_id, keys)
        if isinstance(expr, Not):
            universe = BitMap(range(int(await self.client.get(keys.next_local) or 0)))
            return universe - await self._evaluate(expr.part, keys)
        parts = [await self._evaluate(p, keys) for p in expr.parts]
        result = parts[0]
        for part in parts[1:]:
            result = result & part if isinstance(expr, All) else result | part
        assert isinstance(expr, All | AnyOf)
        return result

    async def estimate(self, segment_id: str) -> int:
        return sum([len(await self.members(segment_id, k)) for k in await self.partitions()])

    async def overlap(self, segment_ids: list[str]) -> list[Overlap]:
        for s in segment_ids:
            self._check(s)
        totals = dict.fromkeys(segment_ids, 0)
        both: dict[tuple[str, str], int] = {}
        for keys in await self.partitions():
            bitmaps = {s: await self.members(s, keys) for s in segment_ids}
            for s in segment_ids:
                totals[s] += len(bitmaps[s])
            for i, a in enumerate(segment_ids):
                for b in segment_ids[i + 1 :]:
                    both[a, b] = both.get((a, b), 0) + bitmaps[a].intersection_cardinality(
                        bitmaps[b]
                    )
        return [Overlap(a, b, n, totals[a], totals[b]) for (a, b), n in both.items()]

    async def sample(self, segment_id: str, count: int) -> list[str]:
        """A few member cookie ids (read from cookie states, which hold the ids)."""
        self._check(segment_id)
        seg = self._segments[segment_id]
        found: list[str] = []
        if count <= 0:
            return found
        for keys in await self.partitions():
            prefix = f"{keys.tag}:c:"
            async for batch in scan_batches(self.client, prefix + "*", SCAN_COUNT):
                raws: Any = await self.client.mget(batch)
                for key, raw in zip(batch, raws, strict=True):
                    if raw is None:
                        continue
                    state = CookieState.decode(as_bytes(raw))
                    if self._holds(seg.id, seg.of, state.members):
                        found.append(as_str(key)[len(prefix) :])
                        if len(found) == count:
                            return found
        return found

    def _holds(self, segment_id: str, of: Composite | None, members: frozenset[str]) -> bool:
        """`members` (stored, paused ones too) holds the segment, by the rules of `members()`."""
        if of is None:
            return segment_id in members
        # with_composites would read a paused part as held; lookups read it as not held.
        live = set(self.rules.with_composites(members & self._active_base))
        return segment_id in live or evaluate_composite(of, live)
