"""Enrich across replica shards: each id answered by the shard that holds it, merged as one
replica holding every partition answers (docs/scaling.md, Replica sharding).

What one replica does (``Answerer.decide`` in bidder_adapter/answer.py): after the tmax and
GDPR checks it walks the request's ids in the partner's order of id sources (``cookie``:
user.id, then the ``uid`` parameter; ``eids``: the partner's eid sources, in request order;
``buyeruid``: through the match table) and takes the FIRST id that is in any segment. Its
answer is the partner's view of that one cookie: one Data object, never a union of several
users. An id in segments the partner may not see still wins, and the answer is empty.

The client cannot replay that walk itself: the order of sources and the eid sources are the
server's partner configuration, and a shard knows only its own cookies. It asks questions
whose answers pin the walk down, all at once within the deadline:

1. Probes. Each cookie id goes to its shard in a request holding only that id, followed in
   the same source by a *sentinel*, a made-up cookie of another shard. The shard reads the
   id first: in a segment, it stops there and answers 200 with the partner's view (a hit,
   maybe ``{}``); not, it reads on, reaches the sentinel and answers 421 (empty); the
   source is not the partner's, it skips both and answers 200 ``no_user`` (ignored). A
   buyeruid (only the match table knows its cookie) goes alone to every shard; the one
   holding its cookie answers 200, the others 421.
2. Merge (``merge``). No hit: ``{}``. One hit, or hits all in one source (whose order is
   the request's): the first one's answer. Otherwise the server orders them: the request
   with only the hits goes to each hit's shard, and only the shard of the first hit
   answers 200; the others read that first hit, a cookie they do not hold, and answer 421.

A request whose ids all live in one shard skips all this: that shard gets it whole.
A probe that fails (timeout, shard down) counts its id as in no segment: best effort, as a
failed shard's users get [] in a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Final, Literal

from bidder_adapter import jsonio
from bidder_adapter.openrtb import find_user_ids

Group = Literal["cookie", "eids", "buyeruid"]
Key = tuple[Group, str, str]
Fragment = dict[str, Any]
# Outcomes (X-Dmp-Outcome) decided before any id is read: the same for every probe.
BEFORE_IDS: Final = frozenset({"tmax", "gdpr"})
FOUND: Final = frozenset({"enriched", "no_segments"})  # the walk stopped at a cookie
SENTINEL_PREFIX: Final = "~dmp.shard-sentinel."  # '~' never starts a minted cookie id


@dataclass(frozen=True, slots=True)
class Slot:
    """One id of a request, where the server reads it."""

    group: Group
    value: str  # our cookie id; for a buyeruid, the partner's id
    source: str = ""  # eids: the eid's source
    query: bool = False  # cookie: the ``uid`` parameter, read after user.id

    @property
    def key(self) -> Key:
        # user.id and ``uid`` are one source: the same cookie there is one question.
        return (self.group, self.value, self.source)


def slots_of(request: object, uid: str | None) -> list[Slot]:
    """The request's ids in the server's order within each source (find_user_ids)."""
    ids = find_user_ids(request)
    slots = [Slot("cookie", ids.user_id)] if ids.user_id is not None else []
    if uid is not None:
        slots.append(Slot("cookie", uid, query=True))
    slots.extend(Slot("eids", value, source) for source, value in ids.eids)
    if ids.buyeruid is not None:
        slots.append(Slot("buyeruid", ids.buyeruid))
    return slots


_ID_KEYS: Final = ("id", "buyeruid", "eids")


def with_only(request: Mapping[str, Any], slots: Sequence[Slot]) -> tuple[bytes, str | None]:
    """The request (body, ``uid`` parameter) with ``slots`` as its only ids.

    Everything else stays as sent (tmax, regs, consent): the server's checks before the ids
    must see what they would see in the whole request.
    """
    user = request.get("user")
    kept = {k: v for k, v in user.items() if k not in _ID_KEYS} if isinstance(user, Mapping) else {}
    ext = kept.get("ext")
    if isinstance(ext, Mapping) and "eids" in ext:
        kept["ext"] = {k: v for k, v in ext.items() if k != "eids"}
    uid = None
    eids: list[dict[str, Any]] = []
    for slot in slots:
        if slot.group == "buyeruid":
            kept["buyeruid"] = slot.value
        elif slot.group == "eids":
            if eids and eids[-1]["source"] == slot.source:
                eids[-1]["uids"].append({"id": slot.value})
            else:
                eids.append({"source": slot.source, "uids": [{"id": slot.value}]})
        elif slot.query:
            uid = slot.value
        else:
            kept["id"] = slot.value
    if eids:
        kept["eids"] = eids
    return jsonio.dumps({**request, "user": kept}), uid


def probe_slots(slot: Slot, sentinel: str) -> list[Slot]:
    """The id, then a sentinel the server reads right after it, or not at all."""
    if slot.group == "cookie":
        # Wherever the id came from, user.id then ``uid`` keeps both in the cookie source.
        return [Slot("cookie", slot.value), Slot("cookie", sentinel, query=True)]
    if slot.group == "eids":
        return [slot, Slot("eids", sentinel, slot.source)]
    return [slot]  # a buyeruid: no other id shares its source, so none can follow it


@dataclass(frozen=True, slots=True)
class Reply:
    """A shard's answer to one enrich call: a 200's fragment and outcome, or a 421's
    owner; neither when the call failed."""

    fragment: Fragment | None = None
    outcome: str | None = None
    owner: int | None = None


class Seen(Enum):
    HIT = "hit"  # in a segment: the walk stops here
    MAYBE = "maybe"  # a buyeruid found, view empty: in no segment, or in none the partner sees
    EMPTY = "empty"  # in no segment: the walk reads on
    IGNORED = "ignored"  # not among the partner's sources (or an unknown buyeruid)
    BEFORE_IDS = "before_ids"  # tmax or GDPR: {} whatever the ids
    FAILED = "failed"  # no answer: read as EMPTY


@dataclass(frozen=True, slots=True)
class Probe:
    seen: Seen
    fragment: Fragment = field(default_factory=dict)
    shard: int | None = None  # the shard that answered 200 (a buyeruid's owner)


def read_probe(reply: Reply, sentinel_owner: int) -> Probe:
    """A cookie probe's reply: 421 from the sentinel's shard means the id was read past."""
    if reply.fragment is None:
        return Probe(Seen.EMPTY if reply.owner == sentinel_owner else Seen.FAILED)
    if reply.outcome in FOUND:
        return Probe(Seen.HIT, reply.fragment)
    return _not_found(reply)


def read_buyeruid(replies: Sequence[Reply]) -> Probe:
    """A buyeruid asked of every shard: the one that answers 200 holds its cookie (or it is
    unknown or suppressed, and every shard answers the same 200)."""
    for shard, reply in enumerate(replies):
        if reply.fragment is None:
            continue
        if reply.outcome == "enriched":
            return Probe(Seen.HIT, reply.fragment, shard)
        if reply.outcome == "no_segments":
            return Probe(Seen.MAYBE, reply.fragment, shard)
        return _not_found(reply)
    return Probe(Seen.FAILED)


def _not_found(reply: Reply) -> Probe:
    if reply.outcome in BEFORE_IDS:
        return Probe(Seen.BEFORE_IDS)
    return Probe(Seen.IGNORED if reply.outcome == "no_user" else Seen.FAILED)


@dataclass(frozen=True, slots=True)
class Rerank:
    """Hits in different sources: only the server knows which it reads first."""

    contenders: tuple[Slot, ...]  # the hits (and a MAYBE buyeruid), in request order


def merge(slots: Sequence[Slot], probes: Mapping[Key, Probe]) -> Fragment | Rerank:
    """The answer one replica would give, from the probes; or the hits the server must order."""
    seen = [probes[slot.key].seen for slot in slots]
    if Seen.BEFORE_IDS in seen:
        return {}
    hits = [slot for slot, s in zip(slots, seen, strict=True) if s is Seen.HIT]
    if not hits:
        # No id in a segment (a MAYBE buyeruid's view is empty anyway): the replica finds
        # at most a cookie with nothing the partner sees.
        return {}
    if Seen.MAYBE not in seen and len({slot.group for slot in hits}) == 1:
        return probes[hits[0].key].fragment  # within one source, request order is the walk's
    return Rerank(
        tuple(slot for slot, s in zip(slots, seen, strict=True) if s in (Seen.HIT, Seen.MAYBE))
    )


Ask = Callable[[int, bytes, str | None, float, Collection[int]], Awaitable[Reply]]


class ShardedEnrich:
    """The rounds of questions for one request; ``ask(shard, body, uid, seconds_left,
    expected_421_owners)`` is one enrich call in fragment mode."""

    def __init__(self, shard_count: int, shard_for: Callable[[str], int], ask: Ask) -> None:
        if shard_count < 2:
            raise ValueError("enrich across shards needs at least two shards")
        self.shard_count = shard_count
        self.shard_for = shard_for
        self.ask = ask
        self.sentinels = [self._sentinel(shard) for shard in range(shard_count)]
        # The shard named by the 421 a probe of ``shard`` gives when it reads past the id.
        self.sentinel_owners = [shard_for(sentinel) for sentinel in self.sentinels]

    def _sentinel(self, shard: int) -> str:
        """A valid cookie id another shard holds: ``shard`` reads it as "ask elsewhere"."""
        n = 0
        while self.shard_for(f"{SENTINEL_PREFIX}{n}") == shard:
            n += 1
        return f"{SENTINEL_PREFIX}{n}"

    def spans_shards(self, slots: Sequence[Slot]) -> bool:
        """Whether no single shard can answer alone: cookies in two shards, or a buyeruid
        (whose cookie only the match table knows) next to any cookie id."""
        owners = {self.shard_for(s.value) for s in slots if s.group != "buyeruid"}
        has_buyeruid = any(s.group == "buyeruid" for s in slots)
        return len(owners) > 1 or (bool(owners) and has_buyeruid)

    async def enrich(
        self, request: Mapping[str, Any], slots: Sequence[Slot], deadline: float
    ) -> Fragment:
        probes = await self._probe(request, slots, deadline)
        plan = merge(slots, probes)
        if not isinstance(plan, Rerank):
            return plan
        # A MAYBE buyeruid that is in no segment and read first is read past only by its own
        # shard, which then stops at a hit it does not hold: no 200 at all. The answer is
        # then the one without it, so both questions go out together. (None: no 200, which
        # is also what failed calls give; the answer without the buyeruid is the best left.)
        has_maybe = any(probes[slot.key].seen is Seen.MAYBE for slot in plan.contenders)
        without = merge(slots, {k: _maybe_as_empty(p) for k, p in probes.items()})
        if not has_maybe or not isinstance(without, Rerank):
            first = await self._order(request, plan, probes, deadline)
            fallback = without if has_maybe and not isinstance(without, Rerank) else {}
            return first if first is not None else fallback
        first, second = await asyncio.gather(
            self._order(request, plan, probes, deadline),
            self._order(request, without, probes, deadline),
        )
        if first is not None:
            return first
        return second if second is not None else {}

    async def _probe(
        self, request: Mapping[str, Any], slots: Sequence[Slot], deadline: float
    ) -> dict[Key, Probe]:
        unique = list({slot.key: slot for slot in slots}.values())
        everyone = range(self.shard_count)
        calls: list[Awaitable[Reply]] = []
        expected: list[int | None] = []  # per unique slot: its sentinel's owner (None: buyeruid)
        for slot in unique:
            if slot.group == "buyeruid":
                body, uid = with_only(request, [slot])
                calls.extend(self._call(s, body, uid, deadline, everyone) for s in everyone)
                expected.append(None)
                continue
            shard = self.shard_for(slot.value)
            owner = self.sentinel_owners[shard]
            body, uid = with_only(request, probe_slots(slot, self.sentinels[shard]))
            calls.append(self._call(shard, body, uid, deadline, (owner,)))
            expected.append(owner)
        replies = iter(await asyncio.gather(*calls))
        probes: dict[Key, Probe] = {}
        for slot, sentinel_owner in zip(unique, expected, strict=True):
            if sentinel_owner is None:
                probes[slot.key] = read_buyeruid([next(replies) for _ in everyone])
            else:
                probes[slot.key] = read_probe(next(replies), sentinel_owner)
        return probes

    async def _order(
        self,
        request: Mapping[str, Any],
        plan: Rerank,
        probes: Mapping[Key, Probe],
        deadline: float,
    ) -> Fragment | None:
        """The contenders together, to each one's shard: the first one's shard answers."""
        owners = sorted({self._holder(slot, probes) for slot in plan.contenders})
        body, uid = with_only(request, plan.contenders)
        replies = await asyncio.gather(
            *(self._call(shard, body, uid, deadline, owners) for shard in owners)
        )
        return next((r.fragment for r in replies if r.fragment is not None), None)

    def _holder(self, slot: Slot, probes: Mapping[Key, Probe]) -> int:
        if slot.group == "buyeruid":
            shard = probes[slot.key].shard
            assert shard is not None  # HIT and MAYBE buyeruids come from a 200
            return shard
        return self.shard_for(slot.value)

    def _call(
        self, shard: int, body: bytes, uid: str | None, deadline: float, owners: Collection[int]
    ) -> Awaitable[Reply]:
        return self.ask(shard, body, uid, deadline - time.monotonic(), owners)


def _maybe_as_empty(probe: Probe) -> Probe:
    return replace(probe, seen=Seen.EMPTY) if probe.seen is Seen.MAYBE else probe
