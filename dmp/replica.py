"""An in-memory replica of segment memberships, indexed user-major for bid-time lookups.

One ``BitMap64`` holds ``position << SLOT_BITS | slot`` for every membership, so a lookup
reads one short contiguous run whatever the number of segments (docs/decisions/0002).
"""

from __future__ import annotations

from collections.abc import Iterable

from pyroaring import BitMap64

from dmp.ids import uid_hash
from segment_rules import CompiledRules

SLOT_BITS = 12
MAX_SLOTS = 1 << SLOT_BITS


class Replica:
    def __init__(self, rules: CompiledRules) -> None:
        self.rules = rules
        self.positions: dict[int, int] = {}  # uid hash -> position
        self.index = BitMap64()
        self._slots: dict[str, int] = {}
        self._slot_names: list[str] = []

    def _slot(self, segment_id: str) -> int:
        slot = self._slots.get(segment_id)
        if slot is None:
            slot = len(self._slot_names)
            if slot >= MAX_SLOTS:
                raise OverflowError(f"more than {MAX_SLOTS} base segments")
            self._slots[segment_id] = slot
            self._slot_names.append(segment_id)
        return slot

    def add_ids(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Learn (position, uid hash) pairs; a later position for the same hash wins."""
        for pos, h in pairs:
            self.positions[h] = pos

    def add(self, segment_id: str, positions: Iterable[int]) -> None:
        slot = self._slot(segment_id)
        self.index.update([p << SLOT_BITS | slot for p in positions])

    def remove(self, segment_id: str, positions: Iterable[int]) -> None:
        slot = self._slots.get(segment_id)
        if slot is None:
            return
        for p in positions:
            self.index.discard(p << SLOT_BITS | slot)

    def base_segments(self, uid: str) -> list[str]:
        pos = self.positions.get(uid_hash(uid))
        if pos is None:
            return []
        start = pos << SLOT_BITS
        end = start + MAX_SLOTS
        names = self._slot_names
        found = []
        for value in self.index.iter_equal_or_larger(start):
            if value >= end:
                break
            found.append(names[value - start])
        return found

    def segments(self, uid: str) -> list[str]:
        """Every active segment the cookie is in, composites included, in rule-file order."""
        base = self.base_segments(uid)
        if not base:
            return []
        return self.rules.with_composites(base)

    @property
    def membership_count(self) -> int:
        return len(self.index)
