"""The ingest consumer: Kafka batches -> rule evaluation -> one Redis transaction per partition.

Offsets live in Redis beside the state they produced, so a restart resumes exactly where the
last committed transaction ended; Kafka's own committed offsets are informational (lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from redis.asyncio.client import Pipeline

from bidder_adapter.following import following
from dmp.auth_transport import kafka_security_options
from dmp.backfill_merge import BackfillOwner
from dmp.backfill_plan import materialise_paused
from dmp.config import Settings
from dmp.dead_letter import DeadLetters, Rejected, reason_class
from dmp.events import BadEvent, decode_event
from dmp.keys import PartitionKeys
from dmp.logs import log_context
from dmp.metrics import IngestMetrics
from dmp.partition_batch import BatchPlan, plan_batch
from dmp.partition_store import Fenced, PartitionStore
from dmp.privacy_ingest import ingest_privacy
from dmp.redis_client import REDIS_FAILURES
from dmp.rule_versions import RuleVersions, RuleWatcher
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
DUE_SWEEP_INTERVAL = 1.0
DAY = 86400
RULES_POLL_INTERVAL = 1.0
OBSERVE_INTERVAL = 1.0  # seconds between consumer lag / connection readings
# No fetch response for this long on an owned partition: the broker is out of reach.
KAFKA_STALE_MS = 15_000
# A batch that Redis (or the dead-letter producer) could not take is retried, the same
# records, after this pause, doubling up to the maximum; Kafka offsets stay where they were.
RETRY_BACKOFF_START = 0.1
RETRY_BACKOFF_MAX = 5.0
KAFKA_COMMIT_TIMEOUT = 5.0  # seconds; Kafka's offsets are informational (lag)


class IngestService:
    def __init__(
        self,
        settings: Settings,
        rules: CompiledRules,
        redis: aioredis.Redis,
        metrics: IngestMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # Paused segments are evaluated too, hidden by lookups (docs/decisions/0005-backfill.md).
        self.rules = materialise_paused(rules)
        self.redis = redis
        self.metrics = metrics
        self.clock = clock
        self.partitions: dict[TopicPartition, PartitionStore] = {}
        self._last_sweep: dict[TopicPartition, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        # Offsets applied in Redis, not yet committed to Kafka (_commit_kafka).
        self._uncommitted: dict[TopicPartition, int] = {}
        self._kafka_committed_at = time.monotonic()
        self._stop = asyncio.Event()
        # Partitions whose store must be re-read from Redis before the next write: a Redis
        # error hid whether the last transaction landed, or the assignment could not load.
        self._reload: set[TopicPartition] = set()
        # aiokafka calls the rebalance listener from its own task, concurrently with run():
        # the loop holds this lock while it works on owned partitions, and the listener takes
        # it before giving partitions up or taking new ones, so no batch straddles a
        # rebalance (a batch still in hand would land after the next owner loaded, and fence
        # it). ``_rebalancing`` cuts a Redis retry short so the listener never waits long.
        self._owned = asyncio.Lock()
        self._rebalancing = asyncio.Event()
        self.state_ttl = int(self._retention_seconds())
        self._observed_at = 0.0
        self.rule_watcher = RuleWatcher(
            RuleVersions(redis, settings.redis.key_prefix), rules, self._swap_rules
        )
        self._rules_polled_at = 0.0
        self.privacy = ingest_privacy(redis, settings, metrics.registry)
        self.backfill = BackfillOwner(redis, self.privacy)
        metrics.set_rule_set(rules.version)
        metrics.kafka_connected.set(0)

    def _swap_rules(self, rules: CompiledRules, number: int) -> None:
        """Between batches: every later batch is evaluated by the new version as a whole."""
        self.rules = materialise_paused(rules)
        self.state_ttl = int(self._retention_seconds())
        for store in self.partitions.values():
            store.state_ttl = self.state_ttl
        self.metrics.set_rule_set(rules.version)

    async def _poll_rules(self) -> None:
        if time.monotonic() - self._rules_polled_at >= RULES_POLL_INTERVAL:
            self._rules_polled_at = time.monotonic()
            try:
                await self.rule_watcher.poll()
            except REDIS_FAILURES as exc:  # the batch path has its own retries; try again later
                log.warning("rule version check failed (%s)", exc)

    async def _mark_idle(self) -> None:
        """Mark idle partitions too, or a backfill would wait for their first event.

        A batch marks its partition itself first (_process_once), so a failure here only
        delays the mark.
        """
        for tp, store in list(self.partitions.items()):
            if tp in self._reload:
                continue
            try:
                await self.backfill.mark({tp: store}, self.rule_watcher.active_number)
            except Fenced as exc:
                self._fenced(tp, exc)
            except REDIS_FAILURES as exc:
                log.warning("%s: rule version mark failed (%s); retried", tp, exc)

    def _retention_seconds(self) -> float:
        longest = max((t.keep_for for t in self.rules.traits), default=0.0)
        ttls = [s.ttl for s in self.rules.ruleset.segments if s.ttl is not None]
        return max([longest, *ttls]) + DAY

    async def run(self, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished first."""
        k = self.settings.kafka
        security = kafka_security_options(k)
        producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap, acks="all", **security)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=k.fetch_max_bytes,
            max_partition_fetch_bytes=k.fetch_max_bytes,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            **security,
        )
        self._stop = stop
        try:
            await producer.start()
        except BaseException:  # refused (credentials) or unreachable: close what was built
            await consumer.stop()
            await producer.stop()
            raise
        try:
            consumer.subscribe([k.topic], listener=_Rebalance(self, consumer))
            await consumer.start()
            self._consumer = consumer
            dead_letters = DeadLetters(producer, k.dead_letter_topic)
            if started is not None:
                started.set()
            # The suppression list, mirrored in memory while we consume (dmp/privacy_ingest.py).
            async with following(self.privacy.follower):
                while not stop.is_set():
                    batches = await consumer.getmany(
                        timeout_ms=k.poll_timeout_ms, max_records=k.max_batch
                    )
                    async with self._owned:
                        await self._poll_rules()
                        await self._mark_idle()
                        for tp, records in batches.items():
                            if self._rebalancing.is_set():
                                # The group waits (up to the session timeout): the rest is
                                # read again from the offsets Redis holds, by whoever owns it.
                                break
                            await self._process(consumer, dead_letters, tp, records)
                        if not self._rebalancing.is_set():
                            await self._commit_kafka(consumer)
                            await self._sweep_due(set(batches))
                            await self._merge_backfills()
                    await self._observe(consumer)
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):  # best effort: Redis holds the offsets
                await asyncio.wait_for(self._commit_kafka(consumer, force=True), 5.0)
            await consumer.stop()
            await producer.stop()
            self.partitions.clear()
            log.info("ingest stopped")

    async def _process(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        tp: TopicPartition,
        records: Sequence[ConsumerRecord[bytes, bytes]],
    ) -> None:
        """Apply one partition's batch; while Redis or Kafka fail, retry it with backoff.

        Nothing is committed anywhere until the Redis transaction lands, so a retry (or a stop
        while waiting) leaves the partition exactly where Redis says it is.
        """
        backoff = RETRY_BACKOFF_START
        while True:
            store = self.partitions.get(tp)
            if store is None:
                return  # revoked while fetched
            try:
                if tp in self._reload:
                    target = await self._reload_store(consumer, tp, store)
                    if target < records[0].offset or target > records[-1].offset + 1:
                        consumer.seek(tp, target)
                    if target < records[0].offset:
                        return  # Redis is behind these records: they come again from target
                await self._process_once(consumer, dead_letters, tp, store, records)
                return
            except REDIS_FAILURES as exc:
                self._reload.add(tp)
                self.metrics.redis_connected.set(0)
                log.warning("%s: Redis failed (%s); batch retried in %.1fs", tp, exc, backoff)
            except KafkaError as exc:
                log.warning("%s: Kafka failed (%s); batch retried in %.1fs", tp, exc, backoff)
            if await self._interrupted_within(backoff):
                log.info("%s: stopping or rebalancing; the batch in hand was not applied", tp)
                self._reload.add(tp)  # consumed but not applied: seek back before the next
                return
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX)

    async def _interrupted_within(self, seconds: float) -> bool:
        """Wait ``seconds`` unless a stop or a rebalance comes first; whether one came."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._rebalancing)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._stop.is_set() or self._rebalancing.is_set()

    @contextlib.asynccontextmanager
    async def rebalancing(self) -> AsyncIterator[None]:
        """Hold off run()'s work on owned partitions while the assignment changes."""
        self._rebalancing.set()
        try:
            async with self._owned:
                yield
        finally:
            self._rebalancing.clear()

    async def _reload_store(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, store: PartitionStore
    ) -> int:
        """Re-read the partition's position from Redis; the offset to consume next."""
        await store.load()
        if store.next_offset is not None:
            target = store.next_offset
        else:
            target = int((await consumer.beginning_offsets([tp]))[tp])
        # Only now: had beginning_offsets failed, the partition would have left the set with
        # nowhere to seek, and the retried batch been applied from wherever it began.
        self._reload.discard(tp)
        return target

    async def _process_once(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        tp: TopicPartition,
        store: PartitionStore,
        records: Sequence[ConsumerRecord[bytes, bytes]],
    ) -> None:
        started = time.perf_counter()
        now = self.clock()
        if store.next_offset is not None:
            records = [r for r in records if r.offset >= store.next_offset]
        if not records:
            return
        try:
            # Before the first batch under a version: a backfill reads the history before it.
            await self.backfill.mark({tp: store}, self.rule_watcher.active_number)
        except Fenced as exc:
            self._fenced(tp, exc)
            return
        batch_id = f"{tp.topic}:{tp.partition}:{records[0].offset}-{records[-1].offset}"
        with log_context(batch_id=batch_id):
            await self._process_records(consumer, dead_letters, tp, store, records, started, now)

    async def _process_records(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        tp: TopicPartition,
        store: PartitionStore,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        started: float,
        now: float,
    ) -> None:
        ing = self.settings.ingest
        self.metrics.events_consumed.inc(len(records))
        events = []
        rejected = []
        for rec in records:
            try:
                events.append(
                    decode_event(
                        rec.value,
                        rec.key,
                        max_bytes=ing.max_event_bytes,
                        now=now,
                        max_future=ing.max_future_seconds,
                    )
                )
            except BadEvent as exc:
                rejected.append(
                    Rejected(tp.topic, tp.partition, rec.offset, rec.key, rec.value, exc.reason)
                )
        if rejected:
            await dead_letters.send(rejected)
            for r in rejected:
                self.metrics.events_rejected.labels(reason_class(r.reason)).inc()
            log.warning(
                "%d of %d events dead-lettered; first at offset %d: %s",
                len(rejected),
                len(records),
                rejected[0].offset,
                rejected[0].reason,
            )
        # Consent, opt-outs and erasures (dmp/privacy_ingest.py): what may be used, what goes.
        screened = await self.privacy.screen(store.keys, events)
        events = screened.events
        due = await store.due_uids(now, ing.due_sweep_limit)
        self._last_sweep[tp] = now
        states = await store.fetch_states({e["uid"] for e in events} | set(due) | screened.erase)
        t_eval = time.perf_counter()
        plan = plan_batch(self.rules, events, due, states, store.next_local, now, screened.erase)
        self.metrics.rule_evaluation_seconds.observe(time.perf_counter() - t_eval)
        next_offset = records[-1].offset + 1
        produced_at = max(r.timestamp for r in records) / 1000.0
        if not await self._commit(tp, store, plan, next_offset, produced_at):
            return
        self.privacy.count_erased(len(plan.forgotten))
        self._uncommitted[tp] = next_offset
        self.metrics.events_applied.inc(plan.applied_events)
        self.metrics.batch_size.observe(len(records))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.produce_to_commit_seconds.observe(max(0.0, time.time() - produced_at))
        log.debug(
            "batch applied: %d events, %d rejected, %d membership changes",
            plan.applied_events,
            len(rejected),
            plan.change_count,
        )

    async def _commit(
        self,
        tp: TopicPartition,
        store: PartitionStore,
        plan: BatchPlan,
        next_offset: int | None,
        produced_at: float,
        also: Callable[[Pipeline], None] | None = None,
    ) -> bool:
        t0 = time.perf_counter()
        try:
            await store.commit(plan, next_offset, produced_at, also)
        except REDIS_FAILURES:
            self.metrics.redis_connected.set(0)
            raise
        except Fenced as exc:
            self._fenced(tp, exc)
            return False
        self.metrics.redis_transaction_seconds.observe(time.perf_counter() - t0)
        self.metrics.redis_connected.set(1)
        for seg_changes, label in ((plan.added, "added"), (plan.removed, "removed")):
            n = sum(len(v) for v in seg_changes.values())
            if n:
                self.metrics.membership_changes.labels(label).inc(n)
        return True

    def _fenced(self, tp: TopicPartition, exc: Fenced) -> None:
        """Another writer moved the partition's offset: Redis is the truth, so the next batch
        re-reads it and continues from there (dropping the partition instead left it idle
        for good while the group still gave it to us). Every write is checked against the
        offset, so two writers never both apply a record."""
        log.warning("partition %s fenced: %s; reloading it from Redis", tp, exc)
        self.metrics.fenced.inc()
        self._reload.add(tp)

    async def _commit_kafka(
        self,
        consumer: AIOKafkaConsumer,
        force: bool = False,
        only: Sequence[TopicPartition] | None = None,
    ) -> None:
        """Commit the offsets Redis holds to Kafka, at most every commit interval.

        Informational (lag, monitoring tools): a restart resumes from Redis. One request for
        all partitions instead of one round trip per batch, which under live load cost about
        9 % of ingest's time (docs/decisions/0010-freshness-measurement.md).
        """
        if not self._uncommitted:
            return
        interval = self.settings.kafka.commit_interval_ms / 1000
        if not force and time.monotonic() - self._kafka_committed_at < interval:
            return
        chosen = [tp for tp in self._uncommitted if only is None or tp in only]
        taken = {tp: self._uncommitted.pop(tp) for tp in chosen}
        # Revoked meanwhile: not ours to commit any more.
        offsets = {tp: offset for tp, offset in taken.items() if tp in self.partitions}
        if only is None:
            self._kafka_committed_at = time.monotonic()
        if not offsets:
            return
        try:
            # Bounded: aiokafka retries a retriable error for as long as it lasts, and the
            # loop holds the partitions' lock here (a rebalance would wait on it).
            await asyncio.wait_for(consumer.commit(offsets), KAFKA_COMMIT_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:  # informational: Redis holds the offsets
            log.warning("Kafka offset commit failed (%s); Redis has the offsets", exc)
            # Tried again next interval (unless a later batch's offset replaced it), so a
            # partition that goes quiet does not show stale lag for good.
            for tp, offset in offsets.items():
                self._uncommitted.setdefault(tp, offset)

    async def _sweep_due(self, busy: set[TopicPartition]) -> None:
        """Re-evaluate cookies whose windows or TTLs lapse now, with no new event for them."""
        now = self.clock()
        for tp, store in list(self.partitions.items()):
            if tp in busy or now - self._last_sweep.get(tp, 0.0) < DUE_SWEEP_INTERVAL:
                continue
            self._last_sweep[tp] = now
            try:
                if tp in self._reload and self._consumer is not None:
                    self._consumer.seek(tp, await self._reload_store(self._consumer, tp, store))
                due = await store.due_uids(now, self.settings.ingest.due_sweep_limit)
                erase = await self.privacy.store.pending(store.keys)
                if not due and not erase:
                    continue
                states = await store.fetch_states(set(due) | erase)
                plan = plan_batch(self.rules, [], due, states, store.next_local, now, erase)
                if await self._commit(tp, store, plan, None, now):
                    self.privacy.count_erased(len(plan.forgotten))
            except (*REDIS_FAILURES, KafkaError) as exc:  # swept again next interval
                if isinstance(exc, REDIS_FAILURES):
                    self._reload.add(tp)
                    self.metrics.redis_connected.set(0)
                log.warning("%s: due sweep failed (%s)", tp, exc)
                return

    async def _merge_backfills(self) -> None:
        """Merge staged backfill history (dmp/backfill_merge.py), a chunk at a time."""

        async def commit(
            tp: TopicPartition,
            store: PartitionStore,
            plan: BatchPlan,
            also: Callable[[Pipeline], None],
        ) -> bool:
            return await self._commit(tp, store, plan, None, self.clock(), also)

        live = {tp: s for tp, s in self.partitions.items() if tp not in self._reload}
        try:
            await self.backfill.merge(live, self.rules, self.clock(), commit)
        except REDIS_FAILURES as exc:  # every store may be stale now: reload before writing
            self._reload.update(live)
            self.metrics.redis_connected.set(0)
            log.warning("backfill merge failed (%s); retried", exc)

    async def _observe(self, consumer: AIOKafkaConsumer) -> None:
        """Lag per owned partition, whether fetches still reach the broker, Redis reachable."""
        if time.monotonic() - self._observed_at < OBSERVE_INTERVAL:
            return
        self._observed_at = time.monotonic()
        try:
            await asyncio.wait_for(self.redis.ping(), timeout=OBSERVE_INTERVAL)
            self.metrics.redis_connected.set(1)
        except TimeoutError:
            self.metrics.redis_connected.set(0)
        except REDIS_FAILURES:
            self.metrics.redis_connected.set(0)
        now_ms = time.time() * 1000
        reachable = bool(self.partitions)
        for tp in list(self.partitions):
            try:
                highwater = consumer.highwater(tp)
                polled = consumer.last_poll_timestamp(tp)
                if polled is None or now_ms - polled > KAFKA_STALE_MS:
                    reachable = False
                if highwater is None:
                    continue  # nothing fetched yet
                # position() waits while an offset reset is pending: never hold the loop long.
                position = await asyncio.wait_for(consumer.position(tp), OBSERVE_INTERVAL / 2)
            except (AssertionError, IllegalStateError, TimeoutError):
                continue  # revoked meanwhile (aiokafka asserts assignment) or still resetting
            self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, highwater - position))
        self.metrics.kafka_connected.set(1 if reachable else 0)

    async def _assign(self, consumer: AIOKafkaConsumer, assigned: Sequence[TopicPartition]) -> None:
        r = self.settings.redis
        from_start = []
        for tp in assigned:
            keys = PartitionKeys(r.key_prefix, tp.topic, tp.partition)
            store = PartitionStore(
                self.redis,
                keys,
                state_ttl=self.state_ttl,
                stream_maxlen=r.change_stream_maxlen,
                max_cached_states=self.settings.ingest.state_cache_size,
            )
            self.partitions[tp] = store
            self.backfill.forget(tp)
            try:
                await store.load()
            except REDIS_FAILURES as exc:
                # Where to start is known once Redis answers: _process reloads and seeks.
                log.warning("assigned %s while Redis is unreachable (%s)", tp, exc)
                self._reload.add(tp)
                continue
            if store.next_offset is not None:
                consumer.seek(tp, store.next_offset)
            else:
                # Redis is the truth: no stored offset means no state, so rebuild from the start.
                from_start.append(tp)
            log.info("assigned %s from offset %s", tp, store.next_offset or 0)
        if from_start:
            # One call for all: each call waits for an offset reset round trip.
            await consumer.seek_to_beginning(*from_start)
        self.metrics.assigned_partitions.set(len(self.partitions))

    def _revoke(self, revoked: Sequence[TopicPartition]) -> None:
        for tp in revoked:
            self.partitions.pop(tp, None)
            self._uncommitted.pop(tp, None)
            self._reload.discard(tp)
            self._last_sweep.pop(tp, None)
            self.backfill.forget(tp)
            self.metrics.forget_partition(tp.partition)
        self.metrics.assigned_partitions.set(len(self.partitions))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base class
    def __init__(self, service: IngestService, consumer: AIOKafkaConsumer) -> None:
        self.service = service
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self.service.rebalancing():  # the batch in hand lands first
            with contextlib.suppress(Exception):  # best effort: Redis holds the offsets
                # Bounded inside (KAFKA_COMMIT_TIMEOUT), as the loop's own commits are.
                await self.service._commit_kafka(self.consumer, force=True, only=revoked)
            self.service._revoke(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        async with self.service.rebalancing():  # no batch sees a store still loading
            await self.service._assign(self.consumer, assigned)
