"""Server-to-server export of a partner's segment membership changes (one Exporter each).

Reads every partition's change stream from a cursor kept in Redis, turns entries into one
line per user in the partner's terms (granted segments only, their segment ids, our cookie
id or their user id through the match table), and hands batches to a sink.

Exactly once, across restarts: a batch is first written whole to Redis as *pending* (its
number, its bytes and the stream positions it ends at); then it is sent; then, in one
transaction, the cursor moves to those positions and the pending batch is dropped. A
restart finds a pending batch and sends the same bytes under the same number again before
reading anything new, so nothing is skipped; receivers dedupe on the batch number
(`Idempotency-Key`; the file sink's name), which is how a send whose answer was lost in a
crash is not applied twice.

Only live (active) segments are exported. Ingest also materialises paused ones (built for a
backfill, docs/decisions/0005-backfill.md) and their changes are in the same streams; they
are dropped here, and composites are derived from live parts only, as lookups do. Which
segments are live is the destination's own state, kept with its cursor: when the applied
rule version changes it (`set_rules`), the exporter switches at a cut of every stream
(dmp/destinations_switch.py): entries up to the cut under the old set, then the members of
each segment gone live (adds) or paused (removes) as of the cut, then entries after it
under the new set. A segment going live thus reaches the partner whole, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bidder_adapter.profiles import PartnerProfile
from dmp.cookie_state import CookieState
from dmp.destinations_keys import DestinationKeys
from dmp.destinations_switch import LIVE_FIELD, Switch, SwitchStep, SwitchStore, start_switch
from dmp.destinations_views import Change, PartnerView, live_segments
from dmp.ids import LOCAL_BITS
from dmp.keys import PartitionKeys, partitions_key
from dmp.match_table import MatchKeys
from dmp.privacy import PrivacyStore
from dmp.redis_types import as_bytes, as_str
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
READ_COUNT = 100
SEQ_FIELD = "#seq"


@dataclass(frozen=True)
class Batch:
    seq: int
    body: bytes  # one JSON object per line, one line per user
    users: int
    cursors: Mapping[str, str]  # stream key -> last entry id this batch covers
    step: SwitchStep | None = None  # a batch of a switch of live sets: what it completes


class Sink(Protocol):
    async def send(self, partner_id: str, batch: Batch) -> None:
        """Deliver or raise; called again with the same batch until it returns."""
        ...


@dataclass(frozen=True)
class DestinationMetrics:
    batches: Counter
    users: Counter
    failures: Counter
    skipped: Counter
    gaps: Counter
    send_seconds: Histogram
    last_success: Gauge
    pending: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> DestinationMetrics:
        r = registry or CollectorRegistry()
        label = ["destination"]
        return cls(
            batches=Counter(
                "dmp_destination_batches_total", "Batches delivered.", label, registry=r
            ),
            users=Counter(
                "dmp_destination_users_total", "User lines delivered.", label, registry=r
            ),
            failures=Counter(
                "dmp_destination_send_failures_total",
                "Failed delivery attempts (each is retried with backoff).",
                label,
                registry=r,
            ),
            skipped=Counter(
                "dmp_destination_skipped_users_total",
                "Users left out: no_match (never synced with the partner), unnamed (no id).",
                [*label, "reason"],
                registry=r,
            ),
            gaps=Counter(
                "dmp_destination_stream_gaps_total",
                "Change streams trimmed past the cursor: changes lost to this destination.",
                label,
                registry=r,
            ),
            send_seconds=Histogram(
                "dmp_destination_send_duration_seconds", "One delivery attempt.", label, registry=r
            ),
            last_success=Gauge(
                "dmp_destination_last_success_timestamp_seconds",
                "When a batch was last delivered (or the destination found nothing to send).",
                label,
                registry=r,
            ),
            pending=Gauge(
                "dmp_destination_pending_batches",
                "1 while a batch waits for delivery (retrying).",
                label,
                registry=r,
            ),
        )


@dataclass
class _UserOps:
    """Net changes of one cookie over a batch: segment -> (first op, last op), True = add."""

    partition: int
    ops: dict[str, tuple[bool, bool]] = field(default_factory=dict)

    def record(self, segment_id: str, add: bool) -> None:
        first = self.ops.get(segment_id, (add, add))[0]
        self.ops[segment_id] = (first, add)

    def net(self) -> tuple[set[str], set[str]]:
        # add..remove: not a member before nor after; remove..add: a member throughout.
        added = {s for s, (first, last) in self.ops.items() if last and first}
        removed = {s for s, (first, last) in self.ops.items() if not last and not first}
        return added, removed


class Exporter:
    def __init__(
        self,
        client: aioredis.Redis,
        profile: PartnerProfile,
        rules: CompiledRules,
        sink: Sink,
        metrics: DestinationMetrics,
        *,
        prefix: str,
        state_prefix: str,
        topic: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if profile.destination is None:
            raise ValueError(f"partner {profile.partner_id} has no destination")
        self.client = client
        self.profile = profile
        self.config = profile.destination
        self.sink = sink
        self.metrics = metrics
        self.prefix = prefix
        self.topic = topic
        self.clock = clock
        self.keys = DestinationKeys(prefix, state_prefix, profile.partner_id)
        self.switches = SwitchStore(client, self.keys)
        self.label = profile.partner_id
        self._rules = rules
        self._view: PartnerView | None = None  # the last one built, reused while it holds

    def set_rules(self, rules: CompiledRules) -> None:
        """Export under a new rule version: its live set is switched to before the next batch."""
        self._rules = rules

    async def run(self, stop: asyncio.Event) -> None:
        """Export until `stop`: drain what is there in batches, then wait the interval."""
        await self._resend_pending(stop)
        # A switch whose storing a crash cut short is invisible, and redone if still due;
        # its chunks are deleted here in case it is not (the rule version changed back).
        await self.switches.clear_unfinished()
        while not stop.is_set():
            batch = await self.next_batch()
            if batch is None:
                self.metrics.last_success.labels(self.label).set(self.clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.interval_seconds)
                continue
            if batch.users:
                await self._write_pending(batch)
                if not await self._deliver(batch, stop):
                    return  # stopped while retrying: the pending batch waits for next time
            await self._commit(batch)

    async def _resend_pending(self, stop: asyncio.Event) -> None:
        raw: Any = await self.client.hgetall(self.keys.pending)
        if not raw:
            return
        step = raw.get(b"step")
        batch = Batch(
            seq=int(raw[b"seq"]),
            body=as_bytes(raw[b"body"]),
            users=int(raw[b"users"]),
            cursors=orjson.loads(raw[b"cursors"]),
            step=SwitchStep.decode(as_bytes(step)) if step else None,
        )
        log.info("destination %s: resending pending batch %d", self.label, batch.seq)
        if await self._deliver(batch, stop):
            await self._commit(batch)

    async def next_batch(self) -> Batch | None:
        """The next batch (maybe without users), or None when no entry is left to read."""
        rules = self._rules  # one version for the whole batch
        stored: Any = await self.client.hgetall(self.keys.cursor)
        fields = {as_str(k): as_str(v) for k, v in stored.items()}
        seq = int(fields.pop(SEQ_FIELD, 0))
        wanted = live_segments(rules)
        live_raw = fields.pop(LIVE_FIELD, None)
        if live_raw is None:
            # First run (or state from before live sets were kept): start under the version
            # in force, as a new destination starts at the oldest entry still kept.
            await self.client.hset(self.keys.cursor, LIVE_FIELD, orjson.dumps(sorted(wanted)))
            live = wanted
        else:
            live = frozenset(orjson.loads(live_raw))
        switch = await self.switches.load()
        if switch is None and live != wanted:
            switch, unnamed = await start_switch(
                self.client,
                self.switches,
                prefix=self.prefix,
                topic=self.topic,
                ruleset=rules.ruleset,
                profile=self.profile,
                old=live,
                new=wanted,
                batch_size=self.config.batch_size,
            )
            if unnamed:
                self.metrics.skipped.labels(self.label, "unnamed").inc(unnamed)
            if switch is None:  # no segment this partner depends on changed
                await self.client.hset(self.keys.cursor, LIVE_FIELD, orjson.dumps(sorted(wanted)))
                live = wanted
        cursors = fields  # what is left: change stream -> last exported entry id
        if switch is None:
            return await self._read_changes(cursors, seq, self._view_of(rules, live), None)
        # Up to the cut under the old live set; then the difference at the cut, once.
        old = self._view_of(rules, switch.old)
        batch = await self._read_changes(cursors, seq, old, switch.cuts)
        return batch if batch is not None else await self._switch_batch(switch, seq)

    def _view_of(self, rules: CompiledRules, live: frozenset[str]) -> PartnerView:
        view = self._view
        if view is None or view.ruleset is not rules.ruleset or view.live != live:
            view = self._view = PartnerView.of(rules.ruleset, self.profile, live)
        return view

    async def _read_changes(
        self,
        cursors: Mapping[str, str],
        seq: int,
        view: PartnerView,
        until: Mapping[str, str] | None,
    ) -> Batch | None:
        """A batch of change entries after the cursors; with ``until``, only the streams in
        it and only up to the entry it names."""
        raw_parts: Any = await self.client.smembers(partitions_key(self.prefix, self.topic))
        streams = [
            PartitionKeys(self.prefix, self.topic, int(p))
            for p in sorted(int(x) for x in raw_parts)
        ]
        if until is not None:
            streams = [keys for keys in streams if keys.changes in until]
        users: dict[str, _UserOps] = {}
        ends: dict[str, str] = {}
        unnamed = 0
        open_streams = list(streams)
        while open_streams and len(users) < self.config.batch_size:
            for keys in list(open_streams):
                stream = keys.changes
                if stream not in ends and stream in cursors:
                    await self._check_gap(stream, cursors[stream])
                start = ends.get(stream) or cursors.get(stream, "0-0")
                last = "+" if until is None else until[stream]
                entries: Any = await self.client.xrange(stream, f"({start}", last, count=READ_COUNT)
                if len(entries) < READ_COUNT:
                    open_streams.remove(keys)
                for entry_id, fields in entries:
                    unnamed += _apply_entry(users, keys.partition, orjson.loads(fields[b"d"]))
                    ends[stream] = as_str(entry_id)
                    if len(users) >= self.config.batch_size:
                        break
                if len(users) >= self.config.batch_size:
                    break
        if not ends:
            return None
        if unnamed:
            self.metrics.skipped.labels(self.label, "unnamed").inc(unnamed)
        lines = await self._finish(await self._changes(users, view))
        return Batch(
            seq=seq + 1 if lines else seq,
            body=_body(lines),
            users=len(lines),
            cursors=ends,
        )

    async def _switch_batch(self, switch: Switch, seq: int) -> Batch:
        """The next stored chunk of the switch's partner lines; the last one finishes it."""
        if switch.next >= switch.chunks:  # nothing to send: only the live set changes
            return Batch(seq, b"", 0, {}, SwitchStep(None, True, switch.new))
        changes = await self.switches.chunk(switch.next)
        lines = await self._finish(changes)
        last = switch.next + 1 >= switch.chunks
        return Batch(
            seq=seq + 1 if lines else seq,
            body=_body(lines),
            users=len(lines),
            cursors={},
            step=SwitchStep(switch.next, last, switch.new),
        )

    async def _check_gap(self, stream: str, cursor: str) -> None:
        try:
            info: Any = await self.client.xinfo_stream(stream)
        except aioredis.ResponseError:
            return  # the stream does not exist (yet)
        deleted = as_str(info.get("max-deleted-entry-id", "0-0"))
        if _entry_id(deleted) > _entry_id(cursor):
            self.metrics.gaps.labels(self.label).inc()
            log.error(
                "destination %s: %s was trimmed past its cursor %s (to %s): changes lost",
                self.label,
                stream,
                cursor,
                deleted,
            )

    async def _changes(self, users: Mapping[str, _UserOps], view: PartnerView) -> list[Change]:
        """Per user with a net change the partner sees: its partner segment ids in and out."""
        uids = sorted(users)
        current: dict[str, frozenset[str]] = {}
        if view.whole_membership and uids:
            current = await self._members(uids, users)
        changes: list[Change] = []
        for uid in uids:
            added, removed = users[uid].net()
            added &= view.bases
            removed &= view.bases
            if view.whole_membership:
                # Paused parts are left out before composites are derived: a composite
                # over a paused segment reads it as not held, like a lookup (AnswerPlan).
                now = current.get(uid, frozenset()) & view.bases
                before = view.partner_ids((now - added) | removed)
                after = view.partner_ids(now)
                adds, removes = sorted(after - before), sorted(before - after)
            else:
                adds = sorted(self.profile.mapped(added))
                removes = sorted(self.profile.mapped(removed))
            if adds or removes:
                changes.append((uid, adds, removes))
        return changes

    async def _finish(self, changes: Sequence[Change]) -> list[dict[str, object]]:
        """Lines in the partner's terms: no add for a suppressed cookie, their user ids."""
        # Opted-out and erased cookies: their removals go out, never an add (dmp/privacy.py).
        uids = [uid for uid, _, _ in changes]
        blocked = await PrivacyStore(self.client, self.prefix, self.topic).suppressed_among(uids)
        kept = [
            (uid, [] if uid in blocked else adds, removes)
            for uid, adds, removes in changes
            if removes or uid not in blocked
        ]
        ids = [uid for uid, _, _ in kept]
        if self.config.user_id == "partner" and ids:
            theirs = await self._partner_ids(ids)
            missing = sum(1 for t in theirs if t is None)
            if missing:
                self.metrics.skipped.labels(self.label, "no_match").inc(missing)
            ids = [t or "" for t in theirs]
        return [
            {"user_id": user_id, "add": adds, "remove": removes}
            for user_id, (_, adds, removes) in zip(ids, kept, strict=True)
            if user_id
        ]

    async def _members(
        self, uids: Sequence[str], users: Mapping[str, _UserOps]
    ) -> dict[str, frozenset[str]]:
        # One MGET per partition: a cluster refuses one over several hash tags (slots).
        by_partition: dict[int, list[str]] = {}
        for uid in uids:
            by_partition.setdefault(users[uid].partition, []).append(uid)
        members: dict[str, frozenset[str]] = {}
        for partition, group in by_partition.items():
            keys = PartitionKeys(self.prefix, self.topic, partition)
            raws = await self.client.mget([keys.cookie(u) for u in group])
            for uid, raw in zip(group, raws, strict=True):
                if raw is not None:
                    members[uid] = CookieState.decode(as_bytes(raw)).members
        return members

    async def _partner_ids(self, cookie_ids: Sequence[str]) -> list[str | None]:
        keys = MatchKeys(self.prefix, self.profile.partner_id)
        raws = await self.client.mget([keys.reverse(c) for c in cookie_ids])
        return [None if raw is None else as_str(raw) for raw in raws]

    async def _write_pending(self, batch: Batch) -> None:
        mapping: dict[str, bytes | int] = {
            "seq": batch.seq,
            "body": batch.body,
            "users": batch.users,
            "cursors": orjson.dumps(batch.cursors),
        }
        if batch.step is not None:
            mapping["step"] = batch.step.encode()
        await self.client.hset(self.keys.pending, mapping=mapping)  # type: ignore[arg-type]  # bytes values are fine
        self.metrics.pending.labels(self.label).set(1)

    async def _deliver(self, batch: Batch, stop: asyncio.Event) -> bool:
        """Send until it works (True) or `stop` is set while waiting to retry (False)."""
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self.sink.send(self.profile.partner_id, batch)
            except Exception as exc:
                self.metrics.failures.labels(self.label).inc()
                delay = min(self.config.retry_max_seconds, 0.2 * 2**attempt)
                delay *= 0.5 + random.random() / 2  # jitter: many destinations, one outage
                attempt += 1
                log.warning(
                    "destination %s: batch %d failed (%s); retry %d in %.2fs",
                    self.label,
                    batch.seq,
                    exc,
                    attempt,
                    delay,
                )
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    return False
                except TimeoutError:
                    continue
            finally:
                self.metrics.send_seconds.labels(self.label).observe(time.perf_counter() - started)
            self.metrics.batches.labels(self.label).inc()
            self.metrics.users.labels(self.label).inc(batch.users)
            self.metrics.last_success.labels(self.label).set(self.clock())
            return True

    async def _commit(self, batch: Batch) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            state: dict[bytes | bytearray | memoryview | str | int | float, Any] = {
                SEQ_FIELD: batch.seq
            }
            state.update(batch.cursors.items())
            pipe.hset(self.keys.cursor, mapping=state)
            if batch.step is not None:
                self.switches.commit(pipe, batch.step)
            pipe.delete(self.keys.pending)
            await pipe.execute()
        self.metrics.pending.labels(self.label).set(0)
        if batch.step is not None and batch.step.last:
            log.info("destination %s: switch of live segments done", self.label)


def _body(lines: Sequence[Mapping[str, object]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _apply_entry(users: dict[str, _UserOps], partition: int, doc: Mapping[str, Any]) -> int:
    """Fold one change-stream entry into per-cookie ops; returns positions with no cookie id."""
    names = {int(pos): str(uid) for pos, uid in doc.get("u", [])}
    unnamed = 0
    for key, add in (("a", True), ("r", False)):
        for segment_id, positions in doc.get(key, {}).items():
            for pos in positions:
                uid = names.get(int(pos))
                if uid is None:
                    unnamed += 1
                    continue
                ops = users.get(uid)
                if ops is None:
                    ops = users[uid] = _UserOps(int(pos) >> LOCAL_BITS)
                ops.record(segment_id, add)
    return unnamed


def _entry_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)
