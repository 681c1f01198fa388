"""A user's rights: opt-out and erasure, kept in Redis and honoured by ingest.

Redis holds the suppression list (hash ``<prefix>:privacy:suppressed``: cookie id -> kind
and time) and a change stream of it that lookup replicas follow (dmp/privacy_follow.py).
Erasing what ingest stored for a cookie is done by ingest itself, since one consumer alone
writes a partition (its caches would otherwise write the cookie back): a request marks the
cookie in every partition's ``privacy-pending`` set, and the partition's next batch or due
sweep removes it from every bitmap, deletes its state (counters, history) and clears the
mark, all in the batch's one transaction.

- opt-out: permanent; events of the cookie are never used again.
- erasure: the same, until new consent is recorded (``dmp privacy consent``, or an event
  whose TCF consent was given after the erasure): a replay of old events cannot bring the
  cookie back, since their consent strings predate it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from dmp.config import Settings
from dmp.cookie_state import CookieState
from dmp.ids import position
from dmp.keys import PartitionKeys, partitions_key
from dmp.match_table import MatchKeys, decode_forward, match_partners_key
from dmp.redis_types import as_bytes, as_str
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
OPT_OUT = "opt_out"
ERASED = "erased"


def suppressed_key(prefix: str) -> str:
    return f"{prefix}:privacy:suppressed"


def changes_key(prefix: str) -> str:
    return f"{prefix}:privacy:changes"


@dataclass(frozen=True)
class Suppression:
    kind: str  # OPT_OUT or ERASED
    at: float

    def encode(self) -> bytes:
        return orjson.dumps({"k": self.kind, "t": self.at})

    @classmethod
    def decode(cls, raw: bytes | str) -> Suppression:
        doc = orjson.loads(raw)
        return cls(str(doc["k"]), float(doc["t"]))


class PrivacyStore:
    """The suppression list and erasure requests in Redis (used by CLI, admin API, ingest)."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, topic: str, stream_maxlen: int = 100_000
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = topic
        self.stream_maxlen = stream_maxlen

    @classmethod
    def from_settings(cls, client: aioredis.Redis, settings: Settings) -> PrivacyStore:
        return cls(
            client, settings.redis.key_prefix, settings.kafka.topic, settings.privacy.stream_maxlen
        )

    async def _partitions(self) -> list[PartitionKeys]:
        raw = await self.client.smembers(partitions_key(self.prefix, self.topic))
        return [PartitionKeys(self.prefix, self.topic, int(p)) for p in sorted(int(x) for x in raw)]

    async def suppress(self, uid: str, kind: str, now: float | None = None) -> Suppression:
        """Block the cookie everywhere: lookups (via the stream), ingest, then its stored data.

        Each step is idempotent; the order makes a crash between steps safe to retry: ingest
        and lookups block the cookie from the first step on.
        """
        entry = Suppression(kind, time.time() if now is None else now)
        await self.client.hset(suppressed_key(self.prefix), uid, entry.encode())
        await self._announce(uid, "add")
        for keys in await self._partitions():
            await self.client.sadd(keys.privacy_pending, uid)
        log.info("cookie suppressed (%s)", kind)
        return entry

    async def forget_matches(self, uid: str) -> list[str]:
        """Delete the cookie's ID-sync entries (their user id <-> ours); the partners named."""
        removed = []
        for raw in sorted(await self.client.smembers(match_partners_key(self.prefix))):
            keys = MatchKeys(self.prefix, as_str(raw))
            theirs = await self.client.get(keys.reverse(uid))
            if theirs is None:
                continue
            forward = keys.forward(as_str(theirs))
            current = await self.client.get(forward)
            if current is not None and decode_forward(as_bytes(current))[0] == uid:
                await self.client.delete(forward)
            await self.client.delete(keys.reverse(uid))
            removed.append(keys.partner_id)
        return removed

    async def lift(self, uid: str) -> bool:
        """New consent: the cookie may be segmented again from its next event on."""
        removed = int(await self.client.hdel(suppressed_key(self.prefix), uid))
        if removed:
            await self._announce(uid, "lift")
        return bool(removed)

    async def _announce(self, uid: str, op: str) -> None:
        await self.client.xadd(
            changes_key(self.prefix),
            {"u": uid, "op": op},
            maxlen=self.stream_maxlen,
            approximate=True,
        )

    async def suppressed_among(self, uids: Sequence[str]) -> dict[str, Suppression]:
        if not uids:
            return {}
        raws: Any = await self.client.hmget(suppressed_key(self.prefix), list(uids))
        return {uid: Suppression.decode(raw) for uid, raw in zip(uids, raws, strict=True) if raw}

    async def get(self, uid: str) -> Suppression | None:
        raw: Any = await self.client.hget(suppressed_key(self.prefix), uid)
        return Suppression.decode(raw) if raw else None

    async def pending(self, keys: PartitionKeys) -> set[str]:
        return {as_str(u) for u in await self.client.smembers(keys.privacy_pending)}

    async def report(self, uid: str, rules: CompiledRules | None = None) -> dict[str, object]:
        """What Redis holds for the cookie: per partition, its position, segments, counters."""
        found: list[dict[str, object]] = []
        pending: list[int] = []
        for keys in await self._partitions():
            raw = await self.client.get(keys.cookie(uid))
            if await self.client.sismember(keys.privacy_pending, uid):
                pending.append(keys.partition)
            if raw is None:
                continue
            state = CookieState.decode(as_bytes(raw))
            segments: Iterable[str] = state.members
            paused: list[str] = []
            if rules is not None:
                # Paused segments are stored (built for a backfill) but in force for no one:
                # listed apart, so the report is complete and never shows them as live.
                status = {s.id: s.status for s in rules.ruleset.base_segments}
                paused = sorted(m for m in state.members if status.get(m) == "paused")
                segments = rules.with_composites(
                    m for m in state.members if status.get(m) == "active"
                )
            found.append(
                {
                    "partition": keys.partition,
                    "position": position(keys.partition, state.local),
                    "segments": sorted(segments),
                    "paused_segments": paused,
                    "counters": {trait: _count(v) for trait, v in sorted(state.history.items())},
                }
            )
        suppression = await self.get(uid)
        return {
            "uid": uid,
            "suppressed": None if suppression is None else suppression.kind,
            "suppressed_at": None if suppression is None else suppression.at,
            "stored": found,
            "erasure_pending_in_partitions": pending,
        }


def _count(entry: object) -> int:
    return len(entry) if isinstance(entry, list | tuple | dict) else 1
