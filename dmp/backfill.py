"""``dmp rules backfill SEGMENT --days D``: build a paused segment from Kafka's history.

The command never writes cookie states or bitmaps: each partition's ingest owner does
(dmp/backfill_merge.py). The command

1. finds what to fill (dmp/backfill_job.py) and waits until every partition's owner has
   marked the offset from which it evaluates the segment live ("live-from");
2. reads each partition from ``now - D days`` up to that offset with its own group-less
   consumer, keeps the events that feed the segment, and stages them, all of one
   partition in one transaction (so an interrupted run leaves whole stages or none);
3. waits until every owner has merged its stage, then applies the live rule text with the
   segment set active: lookups switch to it in one step, with its members all there.

Run again after an interruption: partitions staged or merged for the same job are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from dmp.auth_transport import kafka_security_options
from dmp.backfill_job import BackfillError, Job, activate, plan_job
from dmp.backfill_merge import Manifest, decode_jobs, job_segment, trait_mark
from dmp.backfill_plan import segment_program
from dmp.config import Settings
from dmp.events import BadEvent, decode_event
from dmp.keys import PartitionKeys
from dmp.progress import Progress
from dmp.redis_types import as_bytes
from dmp.rule_versions import RuleVersion, RuleVersions
from segment_rules import CompiledRules, parse_rules

log = logging.getLogger(__name__)
DAY = 86400.0
CHUNK_EVENTS = 2000  # events per merge transaction: a chunk costs the owner about a batch
POLL_INTERVAL = 0.2
STALL_SECONDS = 30.0  # Kafka silent this long while offsets remain: give up, say where


@dataclass
class Report:
    job: str
    partitions: int
    read: int = 0
    staged: int = 0
    rejected: int = 0
    skipped_partitions: int = 0
    read_seconds: float = 0.0
    oldest_available: float | None = None  # event time of the oldest record Kafka still has
    activated: RuleVersion | None = None

    @property
    def read_rate(self) -> float:
        return self.read / self.read_seconds if self.read_seconds > 0 else 0.0


class Backfill:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        out: TextIO,
        clock: Callable[[], float] = time.time,
        *,
        chunk_events: int = CHUNK_EVENTS,
    ) -> None:
        if chunk_events < 1:
            raise ValueError(f"chunk_events must be 1 or more, got {chunk_events}")
        self.settings = settings
        self.client = client
        self.out = out
        self.clock = clock
        self.chunk_events = chunk_events
        self.versions = RuleVersions(client, settings.redis.key_prefix)

    def _keys(self, tp: TopicPartition) -> PartitionKeys:
        return PartitionKeys(self.settings.redis.key_prefix, tp.topic, tp.partition)

    def say(self, message: str) -> None:
        self.out.write(f"{message}\n")
        self.out.flush()

    async def run(
        self, segment: str, days: float, *, wait: float = 60.0, merge_timeout: float = 600.0
    ) -> Report:
        job = plan_job(await self.versions.list(), await self.versions.active_number(), segment)
        tps = await self._partitions()
        job = await self._without_filled(job, tps)
        for note in job.notes:
            self.say(f"note: {note}")
        if not job.targets:
            self.say(f"{segment}: no trait of it needs history; activating")
        k = self.settings.kafka
        consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=k.fetch_max_bytes,
            max_partition_fetch_bytes=k.fetch_max_bytes,
            **kafka_security_options(k),
        )
        await consumer.start()
        try:
            report = Report(job.name, len(tps))
            live_from = await self._live_from(tps, job, wait)
            todo = await self._unstaged(tps, job)
            report.skipped_partitions = len(tps) - len(todo)
            if todo and job.targets:
                await self._check_days(job, days, [tp for tp in tps if tp not in todo])
                await self._read_all(consumer, job, days, live_from, tps, todo, report)
        finally:
            await consumer.stop()
        await self._wait_merged(tps, job, merge_timeout)
        report.activated = await self._activate(job)
        return report

    async def _partitions(self) -> list[TopicPartition]:
        k = self.settings.kafka
        admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap, **kafka_security_options(k))
        await admin.start()
        try:
            described: list[dict[str, Any]] = await admin.describe_topics([k.topic])
        finally:
            await admin.close()
        parts = [p["partition"] for d in described if not d["error_code"] for p in d["partitions"]]
        if not parts:
            raise BackfillError(f"Kafka has no topic '{k.topic}': no history to read")
        return [TopicPartition(k.topic, p) for p in sorted(parts)]

    async def _without_filled(self, job: Job, tps: Sequence[TopicPartition]) -> Job:
        """Drop targets another segment's backfill already filled (a shared new trait)."""
        targets, notes = [], list(job.notes)
        for tid in job.targets:
            mark = trait_mark(tid, job.start_version)
            found = [await self.client.hget(self._keys(tp).backfilled, mark) for tp in tps]
            others = [orjson.loads(m) for m in found if m is not None]
            others = [o for o in others if o["job"] != job.name]  # ours: a resumed run
            if not others:
                targets.append(tid)
            elif len(others) < len(tps):
                raise BackfillError(
                    f"trait {tid} of '{job.segment}' is half backfilled by {others[0]['job']}: "
                    "run that backfill again to finish it first (or abandon it: "
                    f"`dmp rules backfill {job_segment(others[0]['job'])} --abandon`)"
                )
            else:
                notes.append(
                    f"trait {tid} was backfilled by {others[0]['job']} "
                    f"({others[0]['days']:g} days): not read again"
                )
        return replace(job, targets=tuple(targets), notes=tuple(notes))

    async def _live_from(
        self, tps: Sequence[TopicPartition], job: Job, wait: float
    ) -> dict[TopicPartition, int]:
        """Per partition, the earliest offset evaluated live by a version of the job's run."""
        chain = [str(n) for n in range(job.start_version, job.live.number + 1)]
        deadline = time.monotonic() + wait
        waiting = False
        while True:
            found: dict[TopicPartition, int] = {}
            for tp in tps:
                marks = await self.client.hmget(self._keys(tp).rules_from, chain)
                offsets = [int(m) for m in marks if m is not None]
                if offsets:
                    found[tp] = min(offsets)
            missing = [tp.partition for tp in tps if tp not in found]
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise BackfillError(
                    f"ingest has not applied rule version {job.live.number} on partitions "
                    f"{missing} after {wait:g}s: is `dmp ingest` running for topic "
                    f"'{tps[0].topic}'? Nothing was changed."
                )
            if not waiting:  # once: say why nothing seems to happen
                self.say(
                    f"waiting up to {wait:g}s for ingest to apply rule version "
                    f"{job.live.number} on partitions {missing}"
                )
                waiting = True
            await asyncio.sleep(POLL_INTERVAL)

    async def _unstaged(self, tps: Sequence[TopicPartition], job: Job) -> list[TopicPartition]:
        todo = []
        for tp in tps:
            keys = self._keys(tp)
            if await self.client.hexists(keys.backfilled, job.name):
                continue
            if await self.client.hexists(keys.backfill_stages, job.name):
                continue
            todo.append(tp)
        if len(todo) < len(tps):
            self.say(f"resuming {job.name}: {len(tps) - len(todo)} partitions already staged")
        return todo

    async def _check_days(self, job: Job, days: float, done: Sequence[TopicPartition]) -> None:
        """Refuse to resume over another period than the partitions staged or merged before:
        the segment would be built from 8 days of history on some partitions, 30 on others."""
        earlier: dict[float, list[int]] = {}
        mark = trait_mark(job.targets[0], job.start_version)  # a target: ours, if marked
        for tp in done:
            keys = self._keys(tp)
            stage = await self.client.hget(keys.backfill_stages, job.name)
            if stage is not None:
                was = Manifest.decode(as_bytes(stage)).days
            else:
                filled = await self.client.hget(keys.backfilled, mark)
                was = float(orjson.loads(filled)["days"]) if filled is not None else 0.0
            if was > 0:  # 0: not recorded (a stage written before manifests kept it)
                earlier.setdefault(was, []).append(tp.partition)
        other = {d: parts for d, parts in earlier.items() if d != days}
        if other:
            before = "; ".join(f"--days {d:g} on partitions {p}" for d, p in sorted(other.items()))
            again = f"--days {next(iter(other)):g}" if len(other) == 1 else "those --days"
            raise BackfillError(
                f"{job.name} was started with {before}: resumed with --days {days:g}, the other "
                f"partitions would read another period. Run it again with {again}, or "
                f"`dmp rules backfill {job.segment} --abandon` to start over. Nothing was changed."
            )

    async def _read_all(
        self,
        consumer: AIOKafkaConsumer,
        job: Job,
        days: float,
        live_from: dict[TopicPartition, int],
        tps: Sequence[TopicPartition],
        todo: Sequence[TopicPartition],
        report: Report,
    ) -> None:
        now = self.clock()
        since_ms = int((now - days * DAY) * 1000)
        beginning = await consumer.beginning_offsets(todo)
        found = await consumer.offsets_for_times({tp: since_ms for tp in todo})
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp in todo:
            end = live_from[tp]
            hit = found.get(tp)
            start = end if hit is None else max(hit.offset, beginning[tp])
            ranges[tp] = (min(start, end), end)
        total = sum(end - start for start, end in ranges.values())
        self.say(
            f"{job.segment}: reading {total:,} events from {len(todo)} partitions "
            f"(the last {days:g} days, up to where ingest took over)"
        )
        ruleset = parse_rules(job.live.text, f"rules v{job.live.number}")
        program = segment_program(ruleset, ruleset.segment(job.segment))
        progress = Progress("backfill events", total, self.out)
        started = time.perf_counter()
        for tp in todo:
            start, end = ranges[tp]
            events, first = await self._read(
                consumer, tp, start, end, program, now - job.keep_for, progress, report
            )
            # The log's start was inside the period asked for: that is all Kafka kept.
            if (
                start == beginning[tp]
                and first is not None
                and (report.oldest_available is None or first < report.oldest_available)
            ):
                report.oldest_available = first
            await self._stage(tp, job, events, days, [t.partition for t in tps])
            report.staged += len(events)
        report.read_seconds = time.perf_counter() - started
        progress.finish()

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        start: int,
        end: int,
        program: CompiledRules,
        horizon: float,
        progress: Progress,
        report: Report,
    ) -> tuple[list[dict[str, Any]], float | None]:
        """The partition's events in [start, end) that feed the segment and are recent
        enough, and the Kafka time of the first record read."""
        ing = self.settings.ingest
        kept: list[dict[str, Any]] = []
        first: float | None = None
        if start >= end:
            return kept, first
        consumer.assign([tp])
        consumer.seek(tp, start)
        position = start
        quiet_since = time.monotonic()
        while position < end:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
            records = batch.get(tp, [])
            if not records:
                if time.monotonic() - quiet_since > STALL_SECONDS:
                    raise BackfillError(
                        f"Kafka returned nothing for partition {tp.partition} at offset "
                        f"{position} (reading up to {end}) for {STALL_SECONDS:g}s"
                    )
                continue
            quiet_since = time.monotonic()
            now = self.clock()
            if first is None:
                first = records[0].timestamp / 1000.0
            for rec in records:
                if rec.offset >= end:
                    break
                report.read += 1
                try:
                    event = decode_event(
                        rec.value,
                        rec.key,
                        max_bytes=ing.max_event_bytes,
                        now=now,
                        max_future=ing.max_future_seconds,
                    )
                except BadEvent:
                    report.rejected += 1  # ingest dead-lettered it when it first came
                    continue
                if event["ts"] > horizon and program.matching_traits(event):
                    kept.append(event)
            done = min(records[-1].offset + 1, end)
            progress.advance(done - position)
            position = done
        return kept, first

    async def _stage(
        self,
        tp: TopicPartition,
        job: Job,
        events: list[dict[str, Any]],
        days: float,
        partitions: list[int],
    ) -> None:
        """All of one partition's history in one transaction: whole, or not at all."""
        keys = self._keys(tp)
        size = self.chunk_events
        chunks = [events[i : i + size] for i in range(0, len(events), size)]
        if not chunks:
            chunks = [[]]  # an empty stage still tells the owner to mark the job merged
        manifest = Manifest(
            job.name,
            job.segment,
            len(chunks),
            0,
            list(job.targets),
            len(events),
            days,
            partitions=partitions,
        )
        async with self.client.pipeline(transaction=True) as pipe:
            for n, chunk in enumerate(chunks):
                pipe.set(keys.backfill_chunk(job.name, n), orjson.dumps(chunk))
            pipe.hset(keys.backfill_stages, job.name, manifest.encode())
            await pipe.execute()

    async def _wait_merged(self, tps: Sequence[TopicPartition], job: Job, limit: float) -> None:
        if not job.targets:
            return
        progress = Progress("partitions merged", len(tps), self.out, every=10.0)
        merged: set[TopicPartition] = set()
        deadline = time.monotonic() + limit
        while len(merged) < len(tps):
            for tp in tps:
                if tp in merged:
                    continue
                keys = self._keys(tp)
                if await self.client.hexists(keys.backfilled, job.name):
                    merged.add(tp)
                    progress.advance(1)
                    continue
                stages = decode_jobs(await self.client.hgetall(keys.backfill_stages))
                stage = stages.get(job.name)
                if stage is not None and stage.error:
                    raise BackfillError(
                        f"partition {tp.partition} refused the backfill: {stage.error}. "
                        f"Running it again cannot finish it: `dmp rules backfill "
                        f"{job.segment} --abandon` drops the job (what merged stays, "
                        f"'{job.segment}' stays paused), then start it over"
                    )
            if len(merged) < len(tps):
                if time.monotonic() > deadline:
                    waiting = sorted(tp.partition for tp in tps if tp not in merged)
                    raise BackfillError(
                        f"partitions {waiting} have not merged their history after "
                        f"{limit:g}s: is `dmp ingest` running? '{job.segment}' stays paused; "
                        "run the command again to finish"
                    )
                await asyncio.sleep(POLL_INTERVAL)
        progress.finish()

    async def _activate(self, job: Job) -> RuleVersion:
        live = await self.versions.active()
        if live is None or live.number != job.live.number:
            raise BackfillError(
                f"the live rule version changed during the backfill (now "
                f"{live.number if live else None}, was {job.live.number}); '{job.segment}' "
                "is merged but still paused: run the command again to activate it"
            )
        ruleset = parse_rules(live.text, f"rules v{live.number}")
        text = activate(live.text, ruleset, job.segment)
        return await self.versions.apply(text, f"backfill {job.segment} (from v{live.number})")
