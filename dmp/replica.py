"""An in-memory replica of segment memberships, indexed user-major for bid-time lookups.

Per Kafka partition, one ``BitMap64`` holds ``local << SLOT_BITS | slot`` for every
membership, so a lookup reads one short contiguous run whatever the number of segments
(docs/decisions/0002). Cookie ids are found through their 64-bit hash in a sorted numpy
array (12 bytes a cookie) plus a small dict of cookies first seen since the load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pyroaring import BitMap64

from dmp.ids import LOCAL_BITS, uid_hash
from dmp.shards import Shard
from segment_rules import CompiledRules
from segment_rules.graph import evaluate_composite, refs, topological_order

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

    def __len__(self) -> int:
        return len(self._hashes) + len(self._overlay)

    def extend(self, hashes: U64, positions: U64) -> None:
        """Bulk add, in order: a later entry for the same hash wins over an earlier one."""
        if not len(hashes):
            return
        overlay_h = np.fromiter(self._overlay.keys(), dtype=np.uint64, count=len(self._overlay))
        overlay_p = np.fromiter(self._overlay.values(), dtype=np.uint64, count=len(self._overlay))
        all_h = np.concatenate([self._hashes, overlay_h, hashes])
        all_p = np.concatenate([self._positions, overlay_p, positions])
        order = np.argsort(all_h, kind="stable")  # stable: equal hashes keep their order
        self._hashes = all_h[order]
        self._positions = all_p[order]
        self._overlay = {}

    def add(self, h: int, pos: int) -> None:
        self._overlay[h] = pos
        if len(self._overlay) >= OVERLAY_MERGE_AT:
            self.extend(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64))

    def get(self, h: int) -> int | None:
        pos = self._overlay.get(h)
        if pos is not None:
            return pos
        hashes = self._hashes
        i = int(hashes.searchsorted(np.uint64(h), side="right")) - 1
        if i >= 0 and int(hashes[i]) == h:
            return int(self._positions[i])
        return None


@dataclass
class PartitionIndex:
    """One partition's memberships; swapped whole when the partition is reloaded."""

    index: BitMap64 = field(default_factory=BitMap64)
    slot_names: list[str] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)
    populations: dict[str, int] = field(default_factory=dict)

    def slot(self, segment_id: str) -> int:
        slot = self.slots.get(segment_id)
        if slot is None:
            slot = len(self.slot_names)
            if slot >= MAX_SLOTS:
                raise OverflowError(f"more than {MAX_SLOTS} base segments")
            self.slots[segment_id] = slot
            self.slot_names.append(segment_id)
        return slot

    def add_bulk(self, segment_id: str, locals_: Sequence[int] | npt.NDArray[np.uint32]) -> None:
        """Load-time add of positions known to be new (from a bitmap chunk)."""
        slot = np.uint64(self.slot(segment_id))
        values = (np.asarray(locals_, dtype=np.uint64) << np.uint64(SLOT_BITS)) | slot
        self.index.update(values)
        self.populations[segment_id] = self.populations.get(segment_id, 0) + len(values)

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


class _Composites:
    """Evaluates only the composites that can hold, given a cookie's base segments.

    A composite is refused at load when a cookie in none of its parts would satisfy it, so it
    can only hold when the cookie is in one of the segments it (transitively) refers to.
    """

    def __init__(self, rules: CompiledRules) -> None:
        segments = rules.ruleset.segments
        self.order = {s.id: n for n, s in enumerate(segments)}
        self.active = {s.id for s in segments if s.status == "active"}
        composites = [s for s in topological_order(segments) if s.of is not None]
        self.topo = {s.id: n for n, s in enumerate(composites)}
        self.by_id = {s.id: s for s in composites}
        reached: dict[str, set[str]] = {}
        for comp in composites:
            assert comp.of is not None
            for ref in refs(comp.of):
                reached.setdefault(ref.segment_id, set()).add(comp.id)
        # Close over composites of composites.
        self.candidates: dict[str, tuple[str, ...]] = {}
        for seg in segments:
            seen: set[str] = set()
            todo = list(reached.get(seg.id, ()))
            while todo:
                comp_id = todo.pop()
                if comp_id not in seen:
                    seen.add(comp_id)
                    todo.extend(reached.get(comp_id, ()))
            self.candidates[seg.id] = tuple(sorted(seen, key=self.topo.__getitem__))

    def expand(self, base: list[str]) -> list[str]:
        members = {s for s in base if s in self.active}
        pending: set[str] = set()
        for seg in members:
            pending.update(self.candidates.get(seg, ()))
        for comp_id in sorted(pending, key=self.topo.__getitem__):
            comp = self.by_id[comp_id]
            if (
                comp_id in self.active
                and comp.of is not None
                and evaluate_composite(comp.of, members)
            ):
                members.add(comp_id)
        # Segments no longer in the rule file are not reported.
        return sorted((s for s in members if s in self.order), key=self.order.__getitem__)


class Replica:
    def __init__(
        self, rules: CompiledRules, cache_size: int = DEFAULT_CACHE_SIZE, shard: Shard | None = None
    ) -> None:
        self.rules = rules
        # Only this shard's partitions are loaded (dmp/change_follower.py); None: every one.
        self.shard = shard
        self.ids = IdIndex()
        self.partitions: dict[int, PartitionIndex] = {}
        self._composites = _Composites(rules)
        self._cache_size = cache_size
        self._cache: dict[str, tuple[int, list[str]]] = {}  # uid -> (position, answer)
        self._cached_uid: dict[int, str] = {}  # position -> uid, to evict on change

    def set_rules(self, rules: CompiledRules) -> None:
        """Swap the rule set (composites, paused segments) in one step."""
        composites = _Composites(rules)
        self.rules = rules
        self._composites = composites
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache = {}
        self._cached_uid = {}

    def partition(self, partition: int) -> PartitionIndex:
        view = self.partitions.get(partition)
        if view is None:
            view = self.partitions[partition] = PartitionIndex()
        return view

    def replace_partition(self, partition: int, view: PartitionIndex) -> None:
        self.partitions[partition] = view
        self.clear_cache()

    def add_ids(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Learn (position, uid hash) pairs; a later position for the same hash wins."""
        for pos, h in pairs:
            if self.ids.get(h) is not None:
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
            self._cache.pop(uid, None)

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
        hit = self._cache.get(uid)
        if hit is not None:
            return hit[1]
        pos = self.position(uid)
        if pos is None:
            if self.shard is not None:
                # Checked only for unknown cookies, off the hot path: one held elsewhere must
                # not look like a cookie in no segment (raises Misdirected).
                self.shard.check(uid)
            return []
        view = self.partitions.get(pos >> LOCAL_BITS)
        base = view.segments_at(pos & LOCAL_MASK) if view is not None else []
        answer = self._composites.expand(base) if base else []
        if len(self._cache) >= self._cache_size:
            self.clear_cache()  # cheaper than LRU bookkeeping on every hit
        self._cache[uid] = (pos, answer)
        self._cached_uid[pos] = uid
        return answer

    @property
    def membership_count(self) -> int:
        return sum(len(v.index) for v in self.partitions.values())

    @property
    def cookie_count(self) -> int:
        return len(self.ids)

    def populations(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for view in self.partitions.values():
            for seg, n in view.populations.items():
                total[seg] = total.get(seg, 0) + n
        return total

    def bitmap_bytes(self) -> int:
        size = 0
        for view in self.partitions.values():
            stats = view.index.get_statistics()
            size += (
                stats["n_bytes_array_containers"]
                + stats["n_bytes_run_containers"]
                + stats["n_bytes_bitset_containers"]
            )
        return size
