"""An in-memory replica of segment memberships, indexed user-major for bid-time lookups.

Per Kafka partition, one ``BitMap64`` holds ``local << SLOT_BITS | slot`` for every
membership, so a lookup reads one short contiguous run whatever the number of segments
(docs/decisions/0002). Cookie ids are found through their 64-bit hash in sorted numpy
arrays (16 bytes a cookie, plus 0.5-1 byte of bucket starts) and a dict of cookies first
seen since the load, merged into the arrays off the event loop. A cache miss is built in C
when the extension is built (dmp/answer_build.py, docs/decisions/0012).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson
from pyroaring import BitMap, BitMap64

from dmp.answer_build import (
    AnswerBuilder,
    check_limits,
    composite_program,
    find_position,
    interleave,
    rank_table,
    reads_bitmaps,
)
from dmp.ids import LOCAL_BITS, uid_hash
from dmp.shards import Shard
from segment_rules import CompiledRules
from segment_rules.graph import topological_order
from segment_rules.model import All, Composite, Not, Segment, SegmentRef

SLOT_BITS = 12
MAX_SLOTS = 1 << SLOT_BITS
LOCAL_MASK = (1 << LOCAL_BITS) - 1
# New cookies go to a dict; past this many they are merged into the sorted arrays.
OVERLAY_MERGE_AT = 200_000
DEFAULT_CACHE_SIZE = 100_000
U64 = npt.NDArray[np.uint64]


class IdIndex:
    """uid hash -> position. When one hash has several positions, the latest one wins."""

    def __init__(self) -> None:
        self._hashes: U64 = np.empty(0, dtype=np.uint64)
        self._positions: U64 = np.empty(0, dtype=np.uint64)
        self._overlay: dict[int, int] = {}
        # Where each range of hashes starts (hash >> _shift), for the C search: one short
        # range instead of ~23 probes over 80 MB at 10M cookies (docs/decisions/0012).
        self._buckets: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self._shift = 64

    def __len__(self) -> int:
        return len(self._hashes) + len(self._overlay)

    def extend(self, hashes: U64, positions: U64) -> None:
        """Bulk add (a partition's load), in order: a later entry for a hash wins.

        Merges the overlay too. On the caller's thread: loads run before the replica is
        ready; the overlay alone is merged off the event loop (``merge``)."""
        if not len(hashes) and not self._overlay:
            return
        self._swap(_merged(self._hashes, self._positions, self._overlay, hashes, positions))
        self._overlay = {}

    def add(self, h: int, pos: int) -> None:
        """A cookie first seen since the load; ``merge`` moves these into the arrays."""
        self._overlay[h] = pos

    @property
    def merge_due(self) -> bool:
        return len(self._overlay) >= OVERLAY_MERGE_AT

    async def merge(self) -> None:
        """Merge the overlay into the sorted arrays in a worker thread (numpy's sort and
        copies let go of the GIL), so lookups go on: at 10M cookies the re-sort takes most
        of a second. Ids added meanwhile stay in the overlay, which ``get`` reads first."""
        pending = dict(self._overlay)
        base = self._hashes
        empty = np.empty(0, dtype=np.uint64)
        merged = await asyncio.to_thread(_merged, base, self._positions, pending, empty, empty)
        if self._hashes is not base:
            return  # a load replaced the arrays meanwhile; the overlay is merged next time
        self._swap(merged)
        for h, pos in pending.items():
            if self._overlay.get(h) == pos:
                del self._overlay[h]

    def _swap(self, merged: tuple[U64, U64, npt.NDArray[np.uint32], int]) -> None:
        # All four at once: a search must never pair new hashes with old buckets.
        self._hashes, self._positions, self._buckets, self._shift = merged

    def get(self, h: int) -> int | None:
        pos = self._overlay.get(h)
        if pos is not None:
            return pos
        if find_position is not None:  # the same search in C: numpy's costs ~1.3 us a call
            return find_position(self._hashes, self._positions, self._buckets, self._shift, h)
        hashes = self._hashes
        i = int(hashes.searchsorted(np.uint64(h), side="right")) - 1
        if i >= 0 and int(hashes[i]) == h:
            return int(self._positions[i])
        return None


def _merged(
    hashes: U64, positions: U64, overlay: dict[int, int], more_h: U64, more_p: U64
) -> tuple[U64, U64, npt.NDArray[np.uint32], int]:
    """The sorted arrays with the overlay and then ``more`` added (later entries win)."""
    overlay_h = np.fromiter(overlay.keys(), dtype=np.uint64, count=len(overlay))
    overlay_p = np.fromiter(overlay.values(), dtype=np.uint64, count=len(overlay))
    all_h = np.concatenate([hashes, overlay_h, more_h])
    all_p = np.concatenate([positions, overlay_p, more_p])
    order = np.argsort(all_h, kind="stable")  # stable: equal hashes keep their order
    sorted_h = all_h[order]
    return (sorted_h, all_p[order], *_buckets(sorted_h))


def _buckets(hashes: U64) -> tuple[npt.NDArray[np.uint32], int]:
    """(starts, shift): ``starts[k]`` is the first index whose hash >> shift is k or more.

    4 to 8 hashes a bucket (one or two cache lines), so 0.5 to 1 byte a cookie (8 MB at
    10M cookies); built in one pass (bincount), not by 2**bits searches.
    """
    n = len(hashes)
    if n == 0 or n >= 1 << 32:
        return np.empty(0, dtype=np.uint32), 64  # the C search then reads the whole array
    bits = max(1, min(28, n.bit_length() - 3))
    shift = 64 - bits
    counts = np.bincount((hashes >> np.uint64(shift)).astype(np.int64), minlength=1 << bits)
    starts = np.zeros((1 << bits) + 1, dtype=np.uint32)
    np.cumsum(counts, out=starts[1:], dtype=np.uint32)
    return starts, shift


@dataclass
class PartitionIndex:
    """One partition's memberships; swapped whole when the partition is reloaded."""

    index: BitMap64 = field(default_factory=BitMap64)
    slot_names: list[str] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)
    populations: dict[str, int] = field(default_factory=dict)
    # slot -> rank under one AnswerPlan, rebuilt when the plan changes or a slot is added;
    # _rank_table is the same as uint32 values for the C builder.
    _ranks: list[int] = field(default_factory=list, init=False, repr=False)
    _rank_table: bytes = field(default=b"", init=False, repr=False)
    _ranks_plan: AnswerPlan | None = field(default=None, init=False, repr=False)
    # Load-time values under one high 32 bits (add_chunk), gathered in a 32-bit bitmap and
    # joined to ``index`` by finish_load: pyroaring fills a BitMap 3x faster than a BitMap64.
    _filling: BitMap | None = field(default=None, init=False, repr=False)
    _filling_high: int = field(default=-1, init=False, repr=False)
    # The C builder reads the BitMap64 itself, not through pyroaring's iterator (0013).
    _direct: ClassVar[bool] = reads_bitmaps()

    def slot(self, segment_id: str) -> int:
        slot = self.slots.get(segment_id)
        if slot is None:
            slot = len(self.slot_names)
            if slot >= MAX_SLOTS:
                raise OverflowError(f"more than {MAX_SLOTS} base segments")
            self.slots[segment_id] = slot
            self.slot_names.append(segment_id)
        return slot

    def add_chunk(self, members: Iterable[tuple[str, npt.NDArray[np.uint32]]]) -> None:
        """Load-time add of memberships known to be new: every segment's locals of one
        chunk, say; call finish_load() once every chunk is in. Sorted first, so the bitmap is
        built in order, appended to rather than inserted into, and handed over as one
        buffer, not a Python int per value (docs/decisions/0013, 0014)."""
        slots, arrays = [], []
        for segment_id, locals_ in members:
            slot = self.slot(segment_id)
            if len(locals_):
                slots.append(slot)
                arrays.append(locals_)
                self.populations[segment_id] = self.populations.get(segment_id, 0) + len(locals_)
        if not arrays:
            return
        low = min(int(a.min()) for a in arrays)
        high = max(int(a.max()) for a in arrays)
        bucket = (low << SLOT_BITS) >> 32
        if bucket == (high << SLOT_BITS | (MAX_SLOTS - 1)) >> 32:
            # Under one high 32 bits, so relative to the first cookie's value they fit in 32
            # bits too, and the low words go to a 32-bit bitmap as they are.
            if interleave is not None:
                # A counting sort in C (0014): sorted output needs the parts in slot order.
                parts = sorted(zip(slots, arrays, strict=True), key=lambda part: part[0])
                rel = np.empty(sum(len(a) for a in arrays), dtype=np.uint32)
                interleave(parts, low, high - low + 1, SLOT_BITS, rel)
            else:
                # Half the bytes of the 64-bit values to sort: numpy sorts them 2x faster.
                rel = np.concatenate(
                    [
                        ((a - low).astype(np.uint32) << SLOT_BITS) | slot
                        for a, slot in zip(arrays, slots, strict=True)
                    ]
                )
                rel.sort()
            rel += np.uint32((low << SLOT_BITS) & 0xFFFFFFFF)  # no carry: one bucket
            self._fill(bucket, rel)
            return
        values = np.concatenate(
            [
                (a.astype(np.uint64) << np.uint64(SLOT_BITS)) | np.uint64(slot)
                for a, slot in zip(arrays, slots, strict=True)
            ]
        )
        values.sort()
        buffer = array("Q")
        buffer.frombytes(values.data.cast("B"))  # pyroaring reads an array('Q') in one call
        self.index.update(buffer)

    def _fill(self, bucket: int, low_words: npt.NDArray[np.uint32]) -> None:
        if bucket != self._filling_high:
            self.finish_load()
            self._filling, self._filling_high = BitMap(), bucket
        assert self._filling is not None
        buffer = array("I")
        buffer.frombytes(low_words.data.cast("B"))
        self._filling.update(buffer)

    @property
    def loading(self) -> bool:
        """add_chunk() gathered values that finish_load() has not joined to ``index`` yet."""
        return self._filling is not None

    def finish_load(self) -> None:
        """Join what add_chunk gathered to ``index``.

        Through the 64-bit portable format: a count of high words, then each high word
        and the 32-bit bitmap under it, which is what BitMap.serialize writes.
        """
        if self._filling is None:
            return
        if self._filling:
            head = struct.pack("<QI", 1, self._filling_high)
            self.index |= BitMap64.deserialize(head + self._filling.serialize())
        self._filling, self._filling_high = None, -1

    def add(self, segment_id: str, locals_: Iterable[int]) -> list[int]:
        """Add memberships; returns the locals that were not members yet."""
        slot = self.slot(segment_id)
        index = self.index
        added = []
        for local in locals_:
            value = local << SLOT_BITS | slot
            if value not in index:
                index.add(value)
                added.append(local)
        self.populations[segment_id] = self.populations.get(segment_id, 0) + len(added)
        return added

    def remove(self, segment_id: str, locals_: Iterable[int]) -> list[int]:
        slot = self.slots.get(segment_id)
        if slot is None:
            return []
        index = self.index
        removed = []
        for local in locals_:
            value = local << SLOT_BITS | slot
            if value in index:
                index.discard(value)
                removed.append(local)
        self.populations[segment_id] = self.populations.get(segment_id, 0) - len(removed)
        return removed

    def _ranks_for(self, plan: AnswerPlan) -> list[int]:
        ranks = self._ranks
        if self._ranks_plan is not plan or len(ranks) != len(self.slot_names):
            ranks = self._ranks = [plan.rank(name) for name in self.slot_names]
            self._rank_table = rank_table(ranks)
            self._ranks_plan = plan
        return ranks

    def answer_at(self, local: int, plan: AnswerPlan) -> tuple[tuple[str, ...], bytes]:
        """The cookie's answer (composites included, in rule-file order) and its JSON."""
        builder = plan.builder
        if builder is None:
            names = tuple(plan.answer(self.ranks_at(local, plan)))
            return names, orjson.dumps(names)
        self._ranks_for(plan)
        start = local << SLOT_BITS
        if self._direct:
            return builder.build_at(self.index.raw_pointer, start, self._rank_table)
        return builder.build(self.index.iter_equal_or_larger(start), start, self._rank_table)

    def ranks_at(self, local: int, plan: AnswerPlan) -> list[int]:
        """Sorted ranks of the active base segments the cookie at ``local`` is in."""
        ranks = self._ranks_for(plan)
        start = local << SLOT_BITS
        end = start + MAX_SLOTS
        found = []
        for value in self.index.iter_equal_or_larger(start):
            if value >= end:
                break
            found.append(ranks[value - start])
        found.sort()
        if found and found[-1] >= INACTIVE:
            del found[bisect_left(found, INACTIVE) :]
        return found

    def segments_at(self, local: int) -> list[str]:
        start = local << SLOT_BITS
        end = start + MAX_SLOTS
        names = self.slot_names
        found = []
        for value in self.index.iter_equal_or_larger(start):
            if value >= end:
                break
            found.append(names[value - start])
        return found


# A full answer cache drops this fraction of its entries, oldest first (Replica._evict_oldest).
CACHE_EVICT_PARTS = 64
INACTIVE = 1 << 30  # the rank of a slot whose segment is paused or gone: sorts last
check_limits(MAX_SLOTS, INACTIVE)


class AnswerPlan:
    """One rule version's answer shape, compiled once: ranks, names and composites.

    A segment's rank is its place in the rule file, so sorting ranks gives the answer's
    order. Composites become one generated Python function of the set of ranks a cookie
    holds (tests of small ints, in dependency order), which costs a few microseconds for
    a cookie in dozens of segments where walking the rule trees cost twenty
    (docs/decisions/0007).
    """

    def __init__(self, rules: CompiledRules, *, compiled: bool = True) -> None:
        segments = rules.ruleset.segments
        self.names = [s.id for s in segments]
        active = {s.id: n for n, s in enumerate(segments) if s.status == "active"}
        # Base segments only: composites are never stored, they are derived here.
        self.base_ranks = {s.id: active.get(s.id, INACTIVE) for s in segments if s.of is None}
        composites = [s for s in topological_order(segments) if s.of is not None]
        self.expand = _compile_composites(composites, active)
        # The same answers in C (dmp/answer_build.py); None: the Python above answers.
        self.builder = (
            AnswerBuilder(
                self.names,
                [orjson.dumps(n) for n in self.names],
                composite_program(composites, active),
            )
            if compiled and AnswerBuilder is not None
            else None
        )

    def rank(self, segment_id: str) -> int:
        return self.base_ranks.get(segment_id, INACTIVE)

    def answer(self, ranks: list[int]) -> list[str]:
        """Names of the active segments held, given the sorted base ranks (ranks_at)."""
        if not ranks:
            return []
        held = set(ranks)
        before = len(held)
        self.expand(held)
        if len(held) != before:
            ranks = sorted(held)
        return list(map(self.names.__getitem__, ranks))


def _compile_composites(
    composites: Sequence[Segment], active: dict[str, int]
) -> Callable[[set[int]], None]:
    """``expand(ranks)``: adds to ``ranks`` every active composite they satisfy."""

    def expr(node: Composite) -> str:
        if isinstance(node, SegmentRef):
            rank = active.get(node.segment_id)
            return "False" if rank is None else f"{rank} in s"
        if isinstance(node, Not):
            return f"not ({expr(node.part)})"
        joiner = " and " if isinstance(node, All) else " or "
        return joiner.join(f"({expr(part)})" for part in node.parts)

    lines = ["def expand(s):", "    add = s.add"]
    for comp in composites:
        if comp.id in active and comp.of is not None:
            lines.append(f"    if {expr(comp.of)}:")
            lines.append(f"        add({active[comp.id]})")
    lines.append("    return None")
    namespace: dict[str, Any] = {}
    # The source holds only integers and operators, never text from the rule file.
    exec(compile("\n".join(lines), "<composites>", "exec"), namespace)
    expand: Callable[[set[int]], None] = namespace["expand"]
    return expand


def _document_head(uid: str) -> bytes:
    return b'{"uid":' + orjson.dumps(uid) + b',"segments":'


class Replica:
    def __init__(
        self,
        rules: CompiledRules,
        cache_size: int = DEFAULT_CACHE_SIZE,
        shard: Shard | None = None,
        *,
        compiled: bool = True,
    ) -> None:
        self.rules = rules
        # Only this shard's partitions are loaded (dmp/change_follower.py); None: every one.
        self.shard = shard
        self.ids = IdIndex()
        self.partitions: dict[int, PartitionIndex] = {}
        # compiled=False: answers built by the Python alone (tests hold the two equal); the
        # id search is the C one whenever the extension is built.
        self._compiled = compiled
        self._plan = AnswerPlan(rules, compiled=compiled)
        self._cache_size = cache_size
        # The answer cache, three dicts by uid inserted together: the lookup's JSON document,
        # the answer, the position. No tuple per entry, and the compiled builder's answers
        # are untracked: the cyclic collector has nothing of the cache to walk (walking it
        # stalled lookups 65 ms as lists in 0008, 15-40 ms as fresh tuples in 0012).
        self._cache: dict[str, bytes] = {}
        self._cached_names: dict[str, tuple[str, ...]] = {}
        self._cached_pos: dict[str, int] = {}
        self._cached_uid: dict[int, str] = {}  # position -> uid, to evict on change
        # Positions that missed once lately: an answer is cached on its second miss, so the
        # Zipf tail's one-off cookies neither push out the head nor pay for an insertion
        # (simulated on the load test's traffic: misses 40 % -> 33 %, insertions 13x fewer).
        self._seen_once: dict[int, None] = {}
        self._evict_batch = max(1, cache_size // CACHE_EVICT_PARTS)

    def set_rules(self, rules: CompiledRules) -> None:
        """Swap the rule set (composites, paused segments) in one step."""
        plan = AnswerPlan(rules, compiled=self._compiled)
        self.rules = rules
        self._plan = plan
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache = {}
        self._cached_names = {}
        self._cached_pos = {}
        self._cached_uid = {}
        self._seen_once = {}

    def partition(self, partition: int) -> PartitionIndex:
        view = self.partitions.get(partition)
        if view is None:
            view = self.partitions[partition] = PartitionIndex()
        return view

    def replace_partition(self, partition: int, view: PartitionIndex) -> None:
        if view.loading:
            raise ValueError("PartitionIndex.finish_load() was not called after add_chunk()")
        self.partitions[partition] = view
        self.clear_cache()

    def add_ids(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Learn (position, uid hash) pairs; a later position for the same hash wins."""
        for pos, h in pairs:
            known = self.ids.get(h)
            if known == pos:
                # Seen already: a partition loaded from its bitmaps while its stream was
                # followed can read the same new ids from both (counted once, not twice).
                continue
            if known is not None:
                self.clear_cache()  # a known cookie re-numbered: rare, so no finer eviction
            self.ids.add(h, pos)
            self._evict(pos)

    def add(self, segment_id: str, positions: Iterable[int]) -> int:
        """Apply absolute adds; returns how many were new."""
        return self._change(segment_id, positions, add=True)

    def remove(self, segment_id: str, positions: Iterable[int]) -> int:
        return self._change(segment_id, positions, add=False)

    def _change(self, segment_id: str, positions: Iterable[int], *, add: bool) -> int:
        by_partition: dict[int, list[int]] = {}
        for pos in positions:
            by_partition.setdefault(pos >> LOCAL_BITS, []).append(pos & LOCAL_MASK)
            self._evict(pos)
        changed = 0
        for partition, locals_ in by_partition.items():
            view = self.partition(partition)
            done = view.add(segment_id, locals_) if add else view.remove(segment_id, locals_)
            changed += len(done)
        return changed

    def _evict(self, pos: int) -> None:
        uid = self._cached_uid.pop(pos, None)
        if uid is not None:
            self._drop(uid)

    def _drop(self, uid: str) -> None:
        self._cache.pop(uid, None)
        self._cached_names.pop(uid, None)
        self._cached_pos.pop(uid, None)

    def position(self, uid: str) -> int | None:
        return self.ids.get(uid_hash(uid))

    def base_segments(self, uid: str) -> list[str]:
        pos = self.position(uid)
        if pos is None:
            if self.shard is not None:
                self.shard.check(uid)
            return []
        view = self.partitions.get(pos >> LOCAL_BITS)
        return view.segments_at(pos & LOCAL_MASK) if view is not None else []

    def segments(self, uid: str) -> list[str]:
        """Every active segment the cookie is in, composites included, in rule-file order.

        Repeated lookups of one cookie (several slots, several exchanges) hit a cache whose
        entries are evicted when a change touches the cookie.
        """
        hit = self._cached_names.get(uid)
        if hit is not None:
            return list(hit)
        return list(self._answer(uid)[0])

    def document(self, uid: str) -> bytes:
        """``{"uid": uid, "segments": segments(uid)}`` as JSON: the lookup's body, the bytes
        ``orjson`` makes of it, built once per cached answer (a hit copies nothing)."""
        hit = self._cache.get(uid)
        if hit is not None:
            return hit
        return self._answer(uid)[1]

    def _answer(self, uid: str) -> tuple[tuple[str, ...], bytes]:
        pos = self.position(uid)
        if pos is None:
            if self.shard is not None:
                # Checked only for unknown cookies, off the hot path: one held elsewhere must
                # not look like a cookie in no segment (raises Misdirected).
                self.shard.check(uid)
            return (), _document_head(uid) + b"[]}"
        view = self.partitions.get(pos >> LOCAL_BITS)
        names, array = (
            view.answer_at(pos & LOCAL_MASK, self._plan) if view is not None else ((), b"[]")
        )
        document = _document_head(uid) + array + b"}"
        seen = self._seen_once
        if pos not in seen:
            if len(seen) >= self._cache_size:
                for old in list(itertools.islice(seen, self._evict_batch)):
                    del seen[old]
            seen[pos] = None
            return names, document
        del seen[pos]
        if len(self._cache) >= self._cache_size:
            self._evict_oldest()
        self._cache[uid] = document
        self._cached_names[uid] = names
        self._cached_pos[uid] = pos
        self._cached_uid[pos] = uid
        return names, document

    def _evict_oldest(self) -> None:
        """Drop the oldest 1/CACHE_EVICT_PARTS of a full cache (insertion order).

        Cheaper than LRU bookkeeping on every hit; and not the whole cache at once, whose
        freeing took ~30 ms at 100,000 entries, a stall in the p99.9 of every rate.
        """
        cached_pos, cached_uid = self._cached_pos, self._cached_uid
        for uid in list(itertools.islice(self._cache, self._evict_batch)):
            pos = cached_pos[uid]
            self._drop(uid)
            if cached_uid.get(pos) == uid:
                del cached_uid[pos]

    @property
    def membership_count(self) -> int:
        # Kept by every add and remove: len() of a big BitMap64 walks its containers (~5 ms
        # a partition at 10M cookies), a pause every lookup behind it would wait out.
        return sum(sum(v.populations.values()) for v in self.partitions.values())

    @property
    def cookie_count(self) -> int:
        return len(self.ids)

    def populations(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for view in self.partitions.values():
            for seg, n in view.populations.items():
                total[seg] = total.get(seg, 0) + n
        return total

    def bitmap_bytes(self, partition: int) -> int:
        """One partition's index size; walks every container (~12 ms at 2.5M cookies)."""
        view = self.partitions.get(partition)
        if view is None:
            return 0
        stats = view.index.get_statistics()
        return (
            stats["n_bytes_array_containers"]
            + stats["n_bytes_run_containers"]
            + stats["n_bytes_bitset_containers"]
        )
