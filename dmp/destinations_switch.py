"""A destination's switch from one live set of segments to another, at a cut of the streams.

A segment built while paused (by ingest, or a backfill) has members when a rule version
makes it live, and their joins are in the change streams already, hidden. Sending them
late as changes would be wrong (joins and leaves of a segment the partner never had,
some long gone), and waiting for each member's next change leaves the partner short of
what lookups answer. So per partition one transaction reads the last change-stream entry
id (the *cut*) and the bitmaps the partner's lines depend on: the memberships as of that
entry, since every ingest commit writes its bitmaps and its entry together
(dmp/partition_store.py). The destination then exports the entries up to the cut under
the old live set, sends the difference at the cut (members of a segment gone live as
adds, of a segment paused as removes), and exports the entries after the cut under the
new set. Each member is sent once: before the cut it was hidden, after it only its
changes go out.

The work is bounded. Per partition, its cut and its affected members' cookie-id hashes
(12 bytes each with their positions, in sorted numpy arrays); then one scan of the topic's
cookie key names names the members of all those partitions at once (a SCAN walks the whole
keyspace whatever its ``MATCH``, so a scan per partition cost partitions x keys), and their
lines are stored as they are made in transactions of at most ``SAVE_LINES`` lines. Past
``NAME_MEMBERS`` affected members held, the partitions cut so far are named by a scan of
their own before the next ones are cut, so memory stays bounded. The switch becomes visible (the ``switch`` hash: live sets, cuts,
how many chunks) in one last transaction; until then nothing of it is sent. A crash before
that leaves numbered chunks nobody reads and a ``switch:building`` count: the next attempt
deletes them and starts over from new cuts (nothing of the switch was sent and the cursors
have not moved, so new cuts do as well as the old ones). Once stored, each of its batches
commits like any other (dmp/destinations.py), so a crash resumes it and nothing is sent
twice.

Ingest takes no part: a cut is a few GETs in one MULTI per partition, and naming members
(bitmaps hold positions) reads cookie key names here, in the destinations process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import redis.asyncio as aioredis
from pyroaring import BitMap
from redis.asyncio.client import Pipeline

from bidder_adapter.profiles import PartnerProfile
from dmp.destinations_keys import DestinationKeys
from dmp.destinations_views import Change, PartnerView, plan_switch, switch_change
from dmp.ids import chunk_of, uid_hash
from dmp.keys import PartitionKeys, TopicCookies, partitions_key
from dmp.redis_client import scan_batches
from dmp.redis_types import as_bytes, as_str
from segment_rules import RuleSet

log = logging.getLogger(__name__)
IDS_SLICE = 65536  # positions per read of the id hashes (512 KB)
SCAN_COUNT = 1000  # key names per SCAN page; the loop yields to the event loop after each
LIVE_FIELD = "#live"  # in the destination's cursor hash: the live set it exports under
# Lines per transaction that stores a switch (and at most per chunk, i.e. per switch batch).
# Redis runs a MULTI/EXEC as one command: ingest's commits and every other client wait until
# it is written. 2,000 lines are ~100-200 KB of JSON, a millisecond or two of Redis; the
# whole switch of a 10M-member segment in one MULTI would be ~600 MB.
SAVE_LINES = 2000
# Affected members whose hashes are held for one scan of the key names (12 bytes each in
# the sorted arrays: ~120 MB at the limit, plus one partition's over it and the sort's
# temporaries of one partition while its arrays are built). Below it, one scan names all
# partitions; a larger switch takes one scan per ~NAME_MEMBERS members.
NAME_MEMBERS = 10_000_000
DELETE_KEYS = 1000  # chunk keys per DEL when an unfinished switch is cleared
U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class Cut:
    stream: str  # the partition's change stream
    entry: str  # its last entry id at the cut; "0-0" when it had none
    bitmaps: dict[str, BitMap]  # segment -> local positions of its members at the cut


async def read_cut(client: aioredis.Redis, keys: PartitionKeys, segments: Collection[str]) -> Cut:
    """The partition's last change entry and the segments' bitmaps, read atomically.

    One MULTI over one partition's keys (one hash tag, so one cluster slot): a GET per
    bitmap chunk (65,536 positions) of each segment read.
    """
    size = int(await client.get(keys.next_local) or 0)
    while True:
        chunks = chunk_of(size - 1) + 1 if size else 0
        names = [(s, c) for s in sorted(segments) for c in range(chunks)]
        async with client.pipeline(transaction=True) as pipe:
            pipe.get(keys.next_local)
            pipe.xrevrange(keys.changes, count=1)
            for segment_id, chunk in names:
                pipe.get(keys.bitmap(segment_id, chunk))
            replies: list[Any] = await pipe.execute()
        now = int(replies[0] or 0)
        if now and chunk_of(now - 1) >= chunks:
            size = now  # cookies were numbered into a new bitmap chunk meanwhile: read it too
            continue
        entry = as_str(replies[1][0][0]) if replies[1] else "0-0"
        bitmaps = {s: BitMap() for s in segments}
        for (segment_id, _), raw in zip(names, replies[2:], strict=True):
            if raw:
                bitmaps[segment_id] |= BitMap.deserialize(as_bytes(raw))
        return Cut(keys.changes, entry, bitmaps)


async def id_index(
    client: aioredis.Redis, keys: PartitionKeys, positions: BitMap
) -> tuple[U64, U32]:
    """The positions' cookie-id hashes (ingest's ``ids`` key), sorted, and their positions.

    Positions whose hash is 0 (an erased cookie's blanked hash, or none written) are left
    out: they cannot be named.
    """
    wanted: U32 = np.array(positions.to_array(), dtype=np.uint32)
    hashes: U64 = np.zeros(len(wanted), dtype=np.uint64)
    slices = wanted // IDS_SLICE
    bounds = [0, *(np.flatnonzero(np.diff(slices)) + 1).tolist(), len(wanted)]
    for first, end in itertools.pairwise(bounds):
        if first == end:
            continue
        start = int(slices[first]) * IDS_SLICE
        raw = as_bytes(await client.getrange(keys.ids, start * 8, (start + IDS_SLICE) * 8 - 1))
        values = np.frombuffer(raw, dtype=">u8", count=len(raw) // 8)
        at = wanted[first:end].astype(np.int64) - start
        inside = at < len(values)
        hashes[first:end][inside] = values[at[inside]]
    known = hashes != 0
    hashes, wanted = hashes[known], wanted[known]
    order = np.argsort(hashes, kind="stable")
    return hashes[order], wanted[order]


class _Naming:
    """One partition's affected positions waiting to be named: its cut's bitmaps, their
    cookie-id hashes (sorted) and positions, and the positions named so far."""

    def __init__(self, cut: Cut, hashes: U64, positions: U32) -> None:
        self.bitmaps = list(cut.bitmaps.items())
        self.hashes = hashes
        self.positions = positions
        self.named = BitMap()


async def name_partitions(
    client: aioredis.Redis,
    prefix: str,
    topic: str,
    group: Mapping[int, _Naming],
    views: tuple[PartnerView, PartnerView],
    writer: SwitchWriter,
) -> int:
    """Name the affected positions of the ``group``'s partitions and hand their lines to
    ``writer``; how many were named.

    Nothing maps a position to its id (docs/partners.md, "Where the user ids come from"),
    but each cookie's state key holds its id and ``ids`` holds the id's hash per position:
    one scan of the topic's cookie key names (not the states), for all the partitions of
    the group at once, matches them up. A SCAN walks every key of the database (of each
    master on a cluster) whatever its ``MATCH``: one per partition cost partitions x keys.
    """
    old, new = views
    cookies = TopicCookies(prefix, topic)
    head, end = cookies.head, cookies.end
    # By the partition number as the key spells it: "1" is not "10" (nor "01", nor "1}x").
    by_tag = {str(partition): part for partition, part in group.items()}
    async for page in scan_batches(client, cookies.pattern, SCAN_COUNT):
        uids: dict[str, list[str]] = {}
        for key in page:
            name = as_str(key)
            # The first "}:c:" after the head closes the tag: a partition number has none.
            tag, sep, uid = name[len(head) :].partition(end)
            if sep and tag in by_tag and name.startswith(head):
                uids.setdefault(tag, []).append(uid)
        for tag, names in uids.items():
            part = by_tag[tag]
            found = np.fromiter((uid_hash(u) for u in names), dtype=np.uint64, count=len(names))
            lows = np.searchsorted(part.hashes, found, side="left")
            highs = np.searchsorted(part.hashes, found, side="right")
            for i in np.flatnonzero(highs > lows).tolist():
                # One id at two positions (its state expired once): both count. A position
                # named already is a key SCAN returned twice.
                at = [p for p in part.positions[lows[i] : highs[i]].tolist() if p not in part.named]
                if not at:
                    continue
                part.named.update(at)
                members = frozenset(s for s, bm in part.bitmaps if any(p in bm for p in at))
                change = switch_change(old, new, names[i], members)
                if change is not None:
                    await writer.add(change)
        await asyncio.sleep(0)  # a page of keys at a time: other exporters, /metrics
    return sum(len(part.named) for part in group.values())


@dataclass(frozen=True)
class Switch:
    old: frozenset[str]
    new: frozenset[str]
    cuts: dict[str, str]  # change stream -> the last entry exported under ``old``
    chunks: int  # stored batches of partner changes
    next: int  # the next one to send


@dataclass(frozen=True)
class SwitchStep:
    """What a batch of a switch commits with it: its chunk sent, or the switch finished."""

    chunk: int | None
    last: bool
    new: frozenset[str]

    def encode(self) -> bytes:
        return orjson.dumps({"chunk": self.chunk, "last": self.last, "new": sorted(self.new)})

    @classmethod
    def decode(cls, raw: bytes) -> SwitchStep:
        doc = orjson.loads(raw)
        return cls(doc["chunk"], doc["last"], frozenset(doc["new"]))


class SwitchStore:
    """A destination's switch in its own keys (one hash tag with its cursor)."""

    def __init__(self, client: aioredis.Redis, keys: DestinationKeys) -> None:
        self.client = client
        self.keys = keys

    async def load(self) -> Switch | None:
        raw: Any = await self.client.hgetall(self.keys.switch)
        if not raw:
            return None
        return Switch(
            old=frozenset(orjson.loads(raw[b"old"])),
            new=frozenset(orjson.loads(raw[b"new"])),
            cuts=orjson.loads(raw[b"cuts"]),
            chunks=int(raw[b"chunks"]),
            next=int(raw[b"next"]),
        )

    async def clear_unfinished(self) -> int:
        """Delete the chunks of a switch whose storing was cut short; how many there were."""
        raw = await self.client.get(self.keys.switch_building)
        if raw is None:
            return 0
        written = int(raw)
        for first in range(0, written, DELETE_KEYS):
            stop = min(written, first + DELETE_KEYS)
            await self.client.delete(*[self.keys.switch_chunk(n) for n in range(first, stop)])
        await self.client.delete(self.keys.switch_building)  # last: a crash before redoes it
        log.warning(
            "%s: a switch of live segments was not stored whole (crash?): its %d chunks are "
            "deleted; it starts over from new cuts",
            self.keys.switch,
            written,
        )
        return written

    async def save(
        self,
        old: frozenset[str],
        new: frozenset[str],
        cuts: Mapping[str, str],
        changes: Iterable[Change],
        batch_size: int,
    ) -> Switch:
        """Store a switch whose lines are all known (bounded transactions: SwitchWriter)."""
        writer = await SwitchWriter.begin(self, batch_size)
        for change in changes:
            await writer.add(change)
        return await writer.finish(old, new, cuts)

    async def chunk(self, n: int) -> list[Change]:
        key = self.keys.switch_chunk(n)
        raw = await self.client.get(key)
        if raw is None:
            # Only a commit deletes a chunk, and only one already sent: someone else did.
            raise LookupError(
                f"{key} is missing (deleted or evicted by Redis?): the switch of live segments "
                f"cannot send its lines. Deleting {self.keys.switch} and its numbered keys "
                "starts it again from a new cut; lines of chunks already sent go out again."
            )
        return [(str(uid), list(adds), list(removes)) for uid, adds, removes in orjson.loads(raw)]

    def commit(self, pipe: Pipeline, step: SwitchStep) -> None:
        """Queue the step into the batch's commit transaction."""
        if step.chunk is not None:
            pipe.delete(self.keys.switch_chunk(step.chunk))
            pipe.hset(self.keys.switch, "next", step.chunk + 1)
        if step.last:
            pipe.hset(self.keys.cursor, LIVE_FIELD, orjson.dumps(sorted(step.new)))
            pipe.delete(self.keys.switch)


class SwitchWriter:
    """A switch's lines stored as they are made, the switch itself last.

    Whole chunks (a batch each, ``min(batch_size, SAVE_LINES)`` lines) go out in
    transactions of at most ``SAVE_LINES`` lines, each also setting ``switch:building`` to
    the chunks stored so far; ``finish`` writes the ``switch`` hash (which makes it
    visible) and drops that count, in one transaction.
    """

    def __init__(self, store: SwitchStore, batch_size: int) -> None:
        self.store = store
        self.chunk_lines = max(1, min(batch_size, SAVE_LINES))
        self.save_lines = max(1, SAVE_LINES // self.chunk_lines) * self.chunk_lines
        self.chunks = 0  # stored so far
        self.lines = 0  # handed over so far
        self._buffer: list[Change] = []

    @classmethod
    async def begin(cls, store: SwitchStore, batch_size: int) -> SwitchWriter:
        """A writer for a new switch, once what an unfinished one left is cleared."""
        await store.clear_unfinished()
        return cls(store, batch_size)

    async def add(self, change: Change) -> None:
        self._buffer.append(change)
        self.lines += 1
        if len(self._buffer) >= self.save_lines:
            await self._flush()

    async def _flush(self) -> None:
        lines, self._buffer = self._buffer, []
        keys = self.store.keys
        n = self.chunks
        async with self.store.client.pipeline(transaction=True) as pipe:
            for first in range(0, len(lines), self.chunk_lines):
                body = orjson.dumps(lines[first : first + self.chunk_lines])
                pipe.set(keys.switch_chunk(n), body)
                n += 1
            pipe.set(keys.switch_building, n)
            await pipe.execute()
        self.chunks = n
        await asyncio.sleep(0)

    async def finish(
        self, old: frozenset[str], new: frozenset[str], cuts: Mapping[str, str]
    ) -> Switch:
        """Store the last lines, then the switch: one transaction, there whole or not."""
        if self._buffer:
            await self._flush()
        keys = self.store.keys
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.switch,
                mapping={
                    "old": orjson.dumps(sorted(old)),
                    "new": orjson.dumps(sorted(new)),
                    "cuts": orjson.dumps(dict(cuts)),
                    "chunks": self.chunks,
                    "next": 0,
                },
            )
            pipe.delete(keys.switch_building)
            await pipe.execute()
        return Switch(old, new, dict(cuts), self.chunks, 0)


async def start_switch(
    client: aioredis.Redis,
    store: SwitchStore,
    *,
    prefix: str,
    topic: str,
    ruleset: RuleSet,
    profile: PartnerProfile,
    old: frozenset[str],
    new: frozenset[str],
    batch_size: int,
) -> tuple[Switch | None, int]:
    """Cut each partition's stream, work out and store its partner lines; then the switch.

    Each partition's cut is read in its own MULTI and its affected members' hashes then;
    the partitions are named together, by one scan of the topic's cookie keys, once the
    affected members held reach ``NAME_MEMBERS`` (or all partitions are cut). Held at a
    time: the cuts and hash arrays of the partitions waiting for that scan, and up to
    ``SAVE_LINES`` lines. Returns (None, 0) when no segment the partner depends on
    changed; else the switch and how many affected positions had no cookie id left
    (erased since, say).
    """
    plan = plan_switch(ruleset, profile, old, new)
    if plan is None:
        return None, 0
    views = PartnerView.of(ruleset, profile, old), PartnerView.of(ruleset, profile, new)
    writer = await SwitchWriter.begin(store, batch_size)
    raw: Any = await client.smembers(partitions_key(prefix, topic))
    cuts: dict[str, str] = {}
    affected_count = named_count = waiting = scans = 0
    group: dict[int, _Naming] = {}
    for partition in sorted(int(p) for p in raw):
        keys = PartitionKeys(prefix, topic, partition)
        cut = await read_cut(client, keys, plan.read)
        cuts[cut.stream] = cut.entry
        affected = BitMap()
        for segment_id in plan.affected:
            affected |= cut.bitmaps.get(segment_id, BitMap())
        affected_count += len(affected)
        if affected:
            hashes, positions = await id_index(client, keys, affected)
            if len(hashes):
                group[partition] = _Naming(cut, hashes, positions)
                waiting += len(hashes)
        del cut, affected
        if waiting >= NAME_MEMBERS:  # the budget is reached: name these before cutting more
            named_count += await name_partitions(client, prefix, topic, group, views, writer)
            scans += 1
            group, waiting = {}, 0
        await asyncio.sleep(0)
    if group:
        named_count += await name_partitions(client, prefix, topic, group, views, writer)
        scans += 1
    switch = await writer.finish(old, new, cuts)
    log.info(
        "destination %s: switch stored (live now: %s; no longer live: %s); %d cookies at "
        "the cut, %d partner lines in %d chunks, %d scan(s) of the key names",
        profile.partner_id,
        ", ".join(sorted(new - old)) or "none",
        ", ".join(sorted(old - new)) or "none",
        affected_count,
        writer.lines,
        switch.chunks,
        scans,
    )
    return switch, affected_count - named_count
