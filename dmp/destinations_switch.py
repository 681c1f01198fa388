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

The switch (live sets, cuts, the partner lines) is written to the destination's keys in
one transaction before anything of it is sent, and each of its batches commits like any
other (dmp/destinations.py), so a crash resumes it and nothing is sent twice.

Ingest takes no part: a cut is a few GETs in one MULTI per partition, and naming members
(bitmaps hold positions) reads cookie key names here, in the destinations process.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from pyroaring import BitMap
from redis.asyncio.client import Pipeline

from bidder_adapter.profiles import PartnerProfile
from dmp.destinations_keys import DestinationKeys
from dmp.destinations_views import Change, PartnerView, plan_switch, switch_changes
from dmp.ids import chunk_of, uid_hash
from dmp.keys import PartitionKeys, partitions_key
from dmp.redis_types import as_bytes, as_str
from segment_rules import RuleSet

log = logging.getLogger(__name__)
IDS_SLICE = 65536  # positions per read of the id hashes (512 KB)
SCAN_COUNT = 1000
LIVE_FIELD = "#live"  # in the destination's cursor hash: the live set it exports under


@dataclass(frozen=True)
class Cut:
    stream: str  # the partition's change stream
    entry: str  # its last entry id at the cut; "0-0" when it had none
    bitmaps: dict[str, BitMap]  # segment -> local positions of its members at the cut


async def read_cut(client: aioredis.Redis, keys: PartitionKeys, segments: Collection[str]) -> Cut:
    """The partition's last change entry and the segments' bitmaps, read atomically."""
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


async def _hashes(
    client: aioredis.Redis, keys: PartitionKeys, positions: Iterable[int]
) -> dict[int, list[int]]:
    """Cookie-id hash -> the wanted local positions that hold it (ingest's ``ids`` key)."""
    found: dict[int, list[int]] = {}
    for slice_no, group in itertools.groupby(sorted(positions), key=lambda n: n // IDS_SLICE):
        start = slice_no * IDS_SLICE
        raw = as_bytes(await client.getrange(keys.ids, start * 8, (start + IDS_SLICE) * 8 - 1))
        for local in group:
            at = (local - start) * 8
            value = int.from_bytes(raw[at : at + 8], "big") if len(raw) >= at + 8 else 0
            if value:  # 0: an erased cookie's blanked hash
                found.setdefault(value, []).append(local)
    return found


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def name_positions(
    client: aioredis.Redis, prefix: str, topic: str, wanted: Mapping[int, Collection[int]]
) -> dict[tuple[int, int], str]:
    """(partition, local position) -> cookie id, for the wanted positions that have one.

    Nothing maps a position to its id (docs/partners.md, "Where the user ids come from"),
    but each cookie's state key holds its id and ``ids`` holds the id's hash per position:
    one scan of the key names (not the states) matches them up.
    """
    by_partition = {
        p: await _hashes(client, PartitionKeys(prefix, topic, p), positions)
        for p, positions in wanted.items()
        if positions
    }
    head = f"{prefix}:{{{topic}:"
    names: dict[tuple[int, int], str] = {}
    if not by_partition:
        return names
    pattern = f"{_glob_escape(head)}*}}:c:*"
    async for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        partition, sep, uid = as_str(key)[len(head) :].partition("}:c:")
        hashes = by_partition.get(int(partition)) if sep and partition.isdigit() else None
        if hashes is None:
            continue
        for local in hashes.get(uid_hash(uid), ()):
            names[int(partition), local] = uid
    return names


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

    async def save(
        self,
        old: frozenset[str],
        new: frozenset[str],
        cuts: Mapping[str, str],
        changes: list[Change],
        batch_size: int,
    ) -> Switch:
        """Store the whole switch in one transaction: there whole, or not at all."""
        chunks = [changes[i : i + batch_size] for i in range(0, len(changes), batch_size)]
        async with self.client.pipeline(transaction=True) as pipe:
            for n, chunk in enumerate(chunks):
                pipe.set(self.keys.switch_chunk(n), orjson.dumps(chunk))
            pipe.hset(
                self.keys.switch,
                mapping={
                    "old": orjson.dumps(sorted(old)),
                    "new": orjson.dumps(sorted(new)),
                    "cuts": orjson.dumps(dict(cuts)),
                    "chunks": len(chunks),
                    "next": 0,
                },
            )
            await pipe.execute()
        return Switch(old, new, dict(cuts), len(chunks), 0)

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
    """Cut every partition's stream, work out the partner's changes, store the switch.

    Returns (None, 0) when no segment the partner depends on changed; else the switch and
    how many affected positions had no cookie id left (erased since, say).
    """
    plan = plan_switch(ruleset, profile, old, new)
    if plan is None:
        return None, 0
    raw: Any = await client.smembers(partitions_key(prefix, topic))
    cuts: dict[str, str] = {}
    held: dict[tuple[int, int], frozenset[str]] = {}
    for partition in sorted(int(p) for p in raw):
        cut = await read_cut(client, PartitionKeys(prefix, topic, partition), plan.read)
        cuts[cut.stream] = cut.entry
        affected = BitMap()
        for segment_id in plan.affected:
            affected |= cut.bitmaps.get(segment_id, BitMap())
        for local in affected:
            held[partition, local] = frozenset(s for s, bm in cut.bitmaps.items() if local in bm)
    wanted: dict[int, list[int]] = {}
    for partition, local in held:
        wanted.setdefault(partition, []).append(local)
    names = await name_positions(client, prefix, topic, wanted)
    members: dict[str, frozenset[str]] = {}
    for position, segments in held.items():
        uid = names.get(position)
        if uid is not None:  # one id at two positions (its state expired once): both count
            members[uid] = members.get(uid, frozenset()) | segments
    changes = switch_changes(
        PartnerView.of(ruleset, profile, old), PartnerView.of(ruleset, profile, new), members
    )
    switch = await store.save(old, new, cuts, changes, batch_size)
    log.info(
        "destination %s: switch stored (live now: %s; no longer live: %s); %d cookies at "
        "the cut, %d partner lines",
        profile.partner_id,
        ", ".join(sorted(new - old)) or "none",
        ", ".join(sorted(old - new)) or "none",
        len(held),
        len(changes),
    )
    return switch, len(held) - len(names)
