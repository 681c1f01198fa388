"""The ID-sync match table: a partner's user id -> our cookie id, kept 14 to 60 days.

Redis holds the truth (one key per partner id, expiring by itself, plus the reverse key our
cookie -> their id that exports use); every write also goes on the partner's change stream,
which lookup replicas tail into the in-memory `MatchTable`, so a bid-time `buyeruid`
resolves with no Redis round trip (OpenRTB 2.6 Appendix C, exchange-hosted table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from dmp.redis_types import as_bytes, as_str

MIN_TTL_DAYS: Final = 14
MAX_TTL_DAYS: Final = 60
DAY: Final = 86400
MAX_PARTNER_UID_LENGTH: Final = 256


@dataclass(frozen=True)
class MatchKeys:
    """One partner's keys share a hash tag: a sync's transaction stays in one cluster slot."""

    prefix: str
    partner_id: str

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{mt:{self.partner_id}}}"

    def forward(self, partner_uid: str) -> str:
        """Their id -> orjson [our cookie id, expires_at]; the key expires with the entry."""
        return f"{self.tag}:p:{partner_uid}"

    @property
    def forward_pattern(self) -> str:
        return f"{self.tag}:p:*"

    def partner_uid_of(self, forward_key: str) -> str:
        return forward_key[len(self.tag) + len(":p:") :]

    def reverse(self, cookie_id: str) -> str:
        """Our cookie id -> their id (the latest synced), for exports in their ids."""
        return f"{self.tag}:c:{cookie_id}"

    @property
    def changes(self) -> str:
        return f"{self.tag}:changes"


def match_partners_key(prefix: str) -> str:
    """Set of partner ids with a match table, so replicas know which streams to follow."""
    return f"{prefix}:mt:partners"


def check_ttl_days(days: int) -> int:
    if not MIN_TTL_DAYS <= days <= MAX_TTL_DAYS:
        raise ValueError(
            f"match table TTL must be {MIN_TTL_DAYS} to {MAX_TTL_DAYS} days, got {days}"
        )
    return days


def encode_forward(cookie_id: str, expires_at: float) -> bytes:
    return orjson.dumps([cookie_id, expires_at])


def decode_forward(raw: bytes) -> tuple[str, float]:
    cookie_id, expires_at = orjson.loads(raw)
    return str(cookie_id), float(expires_at)


class MatchTableStore:
    """Writes syncs to Redis; reads the reverse direction for exports (not on the bid path)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        ttl_days: int,
        stream_maxlen: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = check_ttl_days(ttl_days) * DAY
        self.stream_maxlen = stream_maxlen
        self.clock = clock

    async def record(self, partner_id: str, partner_uid: str, cookie_id: str) -> float:
        """Store (or refresh) their id -> our cookie id; returns when the entry expires."""
        keys = MatchKeys(self.prefix, partner_id)
        expires_at = self.clock() + self.ttl
        forward = keys.forward(partner_uid)
        entry = orjson.dumps({"u": partner_uid, "c": cookie_id, "x": expires_at})
        await self.client.sadd(match_partners_key(self.prefix), partner_id)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(forward)
                    old_raw = await pipe.get(forward)
                    stale_reverse = None
                    if old_raw is not None:
                        old_cookie, _ = decode_forward(as_bytes(old_raw))
                        if old_cookie != cookie_id:
                            # Their id moved to another of our cookies: the old cookie's
                            # reverse entry goes, unless it already names a newer id of theirs.
                            candidate = keys.reverse(old_cookie)
                            await pipe.watch(candidate)
                            named = await pipe.get(candidate)
                            if named is not None and as_str(named) == partner_uid:
                                stale_reverse = candidate
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() untyped
                    pipe.set(forward, encode_forward(cookie_id, expires_at), ex=self.ttl)
                    pipe.set(keys.reverse(cookie_id), partner_uid, ex=self.ttl)
                    if stale_reverse is not None:
                        pipe.delete(stale_reverse)
                    pipe.xadd(
                        keys.changes,
                        {"d": entry},
                        maxlen=self.stream_maxlen,
                        approximate=True,
                    )
                    await pipe.execute()
                    return expires_at
                except WatchError:
                    continue  # a concurrent sync of the same id: read again and redo

    async def partner_uids(self, partner_id: str, cookie_ids: Sequence[str]) -> list[str | None]:
        """Their id for each of our cookie ids (None: never synced, or expired)."""
        if not cookie_ids:
            return []
        keys = MatchKeys(self.prefix, partner_id)
        raws = await self.client.mget([keys.reverse(c) for c in cookie_ids])
        return [None if raw is None else as_str(raw) for raw in raws]


class MatchTable:
    """In memory: partner -> their id -> (our cookie id, expires_at). Plain dict reads."""

    def __init__(self) -> None:
        self._by_partner: dict[str, dict[str, tuple[str, float]]] = {}

    def put(self, partner_id: str, partner_uid: str, cookie_id: str, expires_at: float) -> None:
        self._by_partner.setdefault(partner_id, {})[partner_uid] = (cookie_id, expires_at)

    def resolve(self, partner_id: str, partner_uid: str, now: float) -> str | None:
        table = self._by_partner.get(partner_id)
        if table is None:
            return None
        found = table.get(partner_uid)
        if found is None or found[1] <= now:
            return None
        return found[0]

    def purge_expired(self, now: float) -> int:
        dropped = 0
        for table in self._by_partner.values():
            expired = [uid for uid, (_, expires_at) in table.items() if expires_at <= now]
            for uid in expired:
                del table[uid]
            dropped += len(expired)
        return dropped

    def partners(self) -> Iterator[str]:
        return iter(self._by_partner)

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_partner.values())
