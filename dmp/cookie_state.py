"""Per-cookie state kept in Redis: its position, event history per trait, memberships.

Stored as format 1 bytes (dmp/state_codec.py, docs/decisions/0019). A state format 1 cannot
carry is stored as JSON, ``{"l": local, "h": history, "m": members}``, the format every state
had before; both are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from dmp import state_codec
from segment_rules import History


@dataclass
class CookieState:
    local: int
    history: History = field(default_factory=dict)
    members: frozenset[str] = frozenset()

    def encode(self) -> bytes:
        members = sorted(self.members)
        try:
            return state_codec.encode(self.local, self.history, members)
        except state_codec.Unencodable:
            return orjson.dumps({"l": self.local, "h": self.history, "m": members})

    @classmethod
    def decode(cls, raw: bytes) -> CookieState:
        if raw[:1] == b"{":
            doc = orjson.loads(raw)
            return cls(local=doc["l"], history=doc["h"], members=frozenset(doc["m"]))
        local, history, members = state_codec.decode(raw)
        return cls(local=local, history=history, members=frozenset(members))
