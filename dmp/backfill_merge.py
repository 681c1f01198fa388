"""The partition owner's side of a backfill: live-from marks and merging staged history.

Only the ingest consumer that owns a partition writes its cookie states and bitmaps, so the
backfill command stages what it read from Kafka and the owner merges it, one chunk per
transaction: the chunk's states, bitmaps and change-stream entry land together with the
chunk's deletion, so a crash before the commit leaves the chunk to merge again, and a
commit never merges it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from redis.asyncio.client import Pipeline

from dmp.backfill_plan import plan_merge
from dmp.partition_batch import BatchPlan
from dmp.partition_store import PartitionStore
from dmp.privacy_ingest import IngestPrivacy
from dmp.redis_types import as_bytes, as_str
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
MERGE_CHECK_INTERVAL = 1.0  # seconds between looks for a staged backfill, per partition

Commit = Callable[
    [TopicPartition, PartitionStore, BatchPlan, Callable[[Pipeline], None]], Awaitable[bool]
]


@dataclass
class Manifest:
    """One partition's staged backfill (``job`` is ``segment@version``)."""

    job: str
    segment: str
    chunks: int
    next: int
    targets: list[str]
    events: int
    days: float = 0.0
    merged: int = 0
    error: str = ""
    partitions: list[int] | None = None  # the topic's partitions it was staged for

    def encode(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        doc: dict[str, Any] = orjson.loads(raw)
        return cls(**doc)


class BackfillOwner:
    """Called by ingest between batches; cheap when nothing is staged (one HGETALL a second)."""

    def __init__(self, client: aioredis.Redis, privacy: IngestPrivacy) -> None:
        self.client = client
        self.privacy = privacy
        self._marked: dict[TopicPartition, int] = {}
        self._checked: dict[TopicPartition, float] = {}

    def forget(self, tp: TopicPartition) -> None:
        self._marked.pop(tp, None)
        self._checked.pop(tp, None)

    async def mark(
        self, partitions: Mapping[TopicPartition, PartitionStore], version: int | None
    ) -> None:
        """Record where each owned partition starts applying ``version`` (once per version)."""
        if version is None:
            return
        for tp, store in list(partitions.items()):
            if self._marked.get(tp) != version:
                await store.mark_rules_from(version)
                self._marked[tp] = version

    async def merge(
        self,
        partitions: Mapping[TopicPartition, PartitionStore],
        rules: CompiledRules,
        now: float,
        commit: Commit,
    ) -> None:
        """Merge at most one staged chunk per partition whose check is due."""
        for tp, store in list(partitions.items()):
            if time.monotonic() - self._checked.get(tp, 0.0) < MERGE_CHECK_INTERVAL:
                continue
            self._checked[tp] = time.monotonic()
            raw: Any = await self.client.hgetall(store.keys.backfill_stages)
            for doc in raw.values():
                manifest = Manifest.decode(as_bytes(doc))
                if manifest.error:
                    continue
                await self._merge_chunk(tp, store, rules, now, manifest, commit)
                self._checked.pop(tp, None)  # more chunks: look again at the next batch
                break

    async def _merge_chunk(
        self,
        tp: TopicPartition,
        store: PartitionStore,
        rules: CompiledRules,
        now: float,
        manifest: Manifest,
        commit: Commit,
    ) -> None:
        keys = store.keys
        known = {t.id for t in rules.traits}
        missing = [t for t in manifest.targets if t not in known]
        if missing:
            # The live rules no longer feed these traits: merging would fill nothing.
            manifest.error = f"the live rule version no longer has the traits {missing}"
            await self.client.hset(keys.backfill_stages, manifest.job, manifest.encode())
            log.warning("%s: backfill %s refused: %s", tp, manifest.job, manifest.error)
            return
        chunk_key = keys.backfill_chunk(manifest.job, manifest.next)
        raw = await self.client.get(chunk_key)
        events: list[dict[str, Any]] = orjson.loads(as_bytes(raw)) if raw is not None else []
        # Opted-out and erased cookies get nothing back from their history (docs/security.md).
        screened = await self.privacy.screen(keys, events)
        states = await store.fetch_states({e["uid"] for e in screened.events})
        plan = plan_merge(
            rules, screened.events, states, store.next_local, now, frozenset(manifest.targets)
        )
        manifest.next += 1
        manifest.merged += plan.applied_events
        last = manifest.next >= manifest.chunks

        def bookkeeping(pipe: Pipeline) -> None:
            pipe.delete(chunk_key)
            if last:
                pipe.hdel(keys.backfill_stages, manifest.job)
                summary: dict[str, Any] = {
                    "events": manifest.events,
                    "merged": manifest.merged,
                    "at": now,
                }
                if manifest.partitions is not None:
                    summary["partitions"] = manifest.partitions
                pipe.hset(keys.backfilled, manifest.job, orjson.dumps(summary))
                # Per trait too: another segment's backfill must not replay them again.
                filled = orjson.dumps({"job": manifest.job, "days": manifest.days})
                start = manifest.job.rsplit("@", 1)[1]
                for tid in manifest.targets:
                    pipe.hset(keys.backfilled, trait_mark(tid, start), filled)
            else:
                pipe.hset(keys.backfill_stages, manifest.job, manifest.encode())

        if await commit(tp, store, plan, bookkeeping):
            log.info(
                "%s: backfill %s chunk %d/%d merged (%d events, %d changes)",
                tp,
                manifest.job,
                manifest.next,
                manifest.chunks,
                plan.applied_events,
                plan.change_count,
            )


def job_name(segment: str, version: int) -> str:
    return f"{segment}@{version}"


def job_segment(job: str) -> str:
    """The segment of a job named by ``job_name``."""
    return job.rsplit("@", 1)[0]


def trait_mark(trait: str, start_version: int | str) -> str:
    """Field of ``backfilled``: the trait's history before ``start_version`` is merged."""
    return f"trait:{trait}@{start_version}"


def decode_jobs(raw: Mapping[Any, Any]) -> dict[str, Manifest]:
    return {as_str(k): Manifest.decode(as_bytes(v)) for k, v in raw.items()}
