"""Backfills under way: jobs staged or merged on some partitions but not merged on all.

A segment with such a job is paused with part of its history merged (the command was
stopped, or ingest died between two merge chunks). Setting it active then would serve part
of its audience, growing as the rest merges: the half-applied segment decision 0005 rules
out. ``dmp rules backfill`` makes a segment live only once every partition has merged; a
rule version applied by hand (``dmp rules apply``, ``rollback``) asks this first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from dmp.backfill_merge import decode_jobs, job_segment
from dmp.keys import PartitionKeys, partitions_key
from dmp.redis_types import as_str


@dataclass
class Unfinished:
    job: str  # segment@start-version
    partitions: list[int]  # the partitions it was staged for (else: the topic's now)
    merged: set[int] = field(default_factory=set)
    staged: set[int] = field(default_factory=set)  # a stage waiting for its owner to merge it
    errors: list[str] = field(default_factory=list)  # stages their owners refused
    days: set[float] = field(default_factory=set)  # the --days it was started with

    @property
    def segment(self) -> str:
        return job_segment(self.job)

    @property
    def rerun(self) -> str:
        """The command that finishes it, with the period it was started with (it refuses
        another: the partitions would cover different histories)."""
        days = f"{next(iter(self.days)):g}" if len(self.days) == 1 else "D"
        return f"dmp rules backfill {self.segment} --days {days}"

    def describe(self) -> str:
        done = sorted(self.merged)
        merging = sorted(self.staged)
        unread = sorted(set(self.partitions) - self.merged - self.staged)
        parts = [f"merged on partitions {done} of {self.partitions}"]
        if merging:
            parts.append(f"still merging on {merging}")
        if unread:
            parts.append(f"not staged on {unread}")
        if self.errors:
            parts.append(f"refused: {'; '.join(self.errors)}")
        return f"backfill {self.job} is {', '.join(parts)}"


async def unfinished_backfills(client: aioredis.Redis, prefix: str, topic: str) -> list[Unfinished]:
    """Jobs not merged on every partition they were staged for (the topic's partitions now,
    for a job whose stages predate that record): partitions added to the topic later do not
    make a finished job unfinished."""
    raw: Any = await client.smembers(partitions_key(prefix, topic))
    partitions = sorted(int(p) for p in raw)
    jobs: dict[str, Unfinished] = {}
    staged_for: dict[str, set[int]] = {}

    def job(name: str) -> Unfinished:
        return jobs.setdefault(name, Unfinished(name, partitions))

    for partition in partitions:
        keys = PartitionKeys(prefix, topic, partition)
        done: Any = await client.hgetall(keys.backfilled)
        for field_name, value in done.items():
            name = as_str(field_name)
            if name.startswith("trait:"):  # per-trait marks sit beside the jobs, with days
                mark = orjson.loads(value)
                if mark.get("days"):
                    job(mark["job"]).days.add(float(mark["days"]))
            else:
                job(name).merged.add(partition)
                summary = orjson.loads(value)
                if summary.get("partitions") is not None:
                    staged_for.setdefault(name, set()).update(summary["partitions"])
        stages = decode_jobs(await client.hgetall(keys.backfill_stages))
        for name, manifest in stages.items():
            job(name).staged.add(partition)
            if manifest.days:
                job(name).days.add(manifest.days)
            if manifest.error:
                job(name).errors.append(f"partition {partition}: {manifest.error}")
            if manifest.partitions is not None:
                staged_for.setdefault(name, set()).update(manifest.partitions)
    for name, recorded in staged_for.items():
        jobs[name].partitions = sorted(recorded)
    return [j for j in jobs.values() if j.staged or not set(j.partitions) <= j.merged]


def going_live(before: Iterable[tuple[str, str]], after: Iterable[tuple[str, str]]) -> set[str]:
    """Segment ids active in ``after`` (id, status pairs) that were not active ``before``."""
    was_active = {sid for sid, status in before if status == "active"}
    return {sid for sid, status in after if status == "active" and sid not in was_active}
