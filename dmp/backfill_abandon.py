"""``dmp rules backfill SEGMENT --abandon``: drop an unfinished backfill's bookkeeping.

A job left staged or half merged blocks ``dmp rules apply`` of its segment (a stage its
partition's owner refused stays for good, and re-running cannot clear it). Abandoning
removes, per partition and in one transaction there (the keys share the partition's hash
tag), everything the job wrote: its stage manifest and the chunks not merged yet, its
"merged" marker and the per-trait marks that record the period it filled. What the owners
already merged into cookie states and bitmaps stays as it is; the segment stays paused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from dmp.backfill_merge import decode_jobs
from dmp.backfill_status import Unfinished, unfinished_backfills
from dmp.keys import PartitionKeys
from dmp.redis_types import as_str


@dataclass
class Removed:
    """What one partition held for the abandoned jobs, all deleted."""

    partition: int
    stages: list[str] = field(default_factory=list)  # "job (n of m chunks merged[, refused])"
    chunks: int = 0  # staged chunks not merged yet
    merged: list[str] = field(default_factory=list)  # jobs this partition had merged
    marks: list[str] = field(default_factory=list)  # per-trait period records
    chunks_merged: int = 0  # chunks of its abandoned stages the owner had merged already

    @property
    def had_merged(self) -> bool:
        """Whether some of the abandoned history is in this partition's cookie states."""
        return bool(self.merged) or self.chunks_merged > 0

    @property
    def empty(self) -> bool:
        return not (self.stages or self.chunks or self.merged or self.marks)

    def describe(self) -> str:
        parts = []
        if self.stages:
            parts.append(f"stage {', '.join(self.stages)}")
        if self.chunks:
            parts.append(f"{self.chunks} unmerged chunk{'s' if self.chunks != 1 else ''}")
        if self.merged:
            parts.append(f"merged marker {', '.join(self.merged)}")
        if self.marks:
            parts.append(f"trait marks {', '.join(self.marks)}")
        return f"partition {self.partition}: removed {'; '.join(parts)}"


async def abandon(
    client: aioredis.Redis, prefix: str, topic: str, segment: str
) -> tuple[list[Unfinished], list[Removed]]:
    """Remove every unfinished backfill job of ``segment``; the jobs and, per partition,
    what was removed (nothing to abandon: two empty lists)."""
    jobs = [u for u in await unfinished_backfills(client, prefix, topic) if u.segment == segment]
    if not jobs:
        return [], []
    names = {u.job for u in jobs}
    partitions = sorted({p for u in jobs for p in (*u.partitions, *u.merged, *u.staged)})
    removed = []
    for partition in partitions:
        done = await _abandon_partition(client, PartitionKeys(prefix, topic, partition), names)
        if not done.empty:
            removed.append(done)
    return jobs, removed


async def _abandon_partition(
    client: aioredis.Redis, keys: PartitionKeys, names: set[str]
) -> Removed:
    removed = Removed(keys.partition)
    stages = {
        name: m
        for name, m in decode_jobs(await client.hgetall(keys.backfill_stages)).items()
        if name in names
    }
    done: Any = await client.hgetall(keys.backfilled)
    merged, marks = [], []
    for raw_name, value in done.items():
        name = as_str(raw_name)
        if name in names:
            merged.append(name)
        elif name.startswith("trait:") and orjson.loads(value).get("job") in names:
            marks.append(name)  # another job's mark of a shared trait is left alone
    if not (stages or merged or marks):
        return removed
    chunk_keys = [
        keys.backfill_chunk(name, n) for name, m in stages.items() for n in range(m.chunks)
    ]
    async with client.pipeline(transaction=True) as pipe:
        if stages:
            pipe.hdel(keys.backfill_stages, *stages)
        if chunk_keys:
            pipe.delete(*chunk_keys)
        if merged or marks:
            pipe.hdel(keys.backfilled, *merged, *marks)
        results = await pipe.execute()
    if chunk_keys:
        removed.chunks = int(results[1 if stages else 0])
    removed.chunks_merged = sum(m.next for m in stages.values())
    for name, m in sorted(stages.items()):
        refused = f", refused: {m.error}" if m.error else ""
        removed.stages.append(f"{name} ({m.next} of {m.chunks} chunks merged{refused})")
    removed.merged = sorted(merged)
    removed.marks = sorted(marks)
    return removed
