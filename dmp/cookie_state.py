"""Per-cookie state kept in Redis: its position, event history per trait, memberships."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from segment_rules import History


@dataclass
class CookieState:
    local: int
    history: History = field(default_factory=dict)
    members: frozenset[str] = frozenset()

    def encode(self) -> bytes:
        return orjson.dumps({"l": self.local, "h": self.history, "m": sorted(self.members)})

    @classmethod
    def decode(cls, raw: bytes) -> CookieState:
        doc = orjson.loads(raw)
        return cls(local=doc["l"], history=doc["h"], members=frozenset(doc["m"]))
