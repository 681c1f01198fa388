"""Enrich across shards (bidder_adapter/sharded_enrich.py): the merge, and the whole protocol
against in-process shards that answer with the server's own decision code (Answerer,
enrich_request, Shard.check), compared with one replica holding every cookie."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bidder_adapter import jsonio
from bidder_adapter.answer import Answerer
from bidder_adapter.openrtb import enrich_request
from bidder_adapter.profiles import PartnerProfile, UserIdSource, hash_api_key
from bidder_adapter.sharded_enrich import (
    Key,
    Probe,
    Reply,
    Rerank,
    Seen,
    ShardedEnrich,
    Slot,
    merge,
    read_buyeruid,
    read_probe,
    slots_of,
    with_only,
)
from bidder_adapter.sync import valid_cookie_id
from dmp.match_table import MatchTable
from dmp.privacy_follow import SuppressedSegments, SuppressionList
from dmp.shards import Misdirected, Shard, shard_of

MIN_TMAX_MS = 10
OURS = "dmp.example"
FRAG_A = {"user": {"data": [{"id": "a"}]}}
FRAG_B = {"user": {"data": [{"id": "b"}]}}


def _probes(**seen: Probe) -> dict[Key, Probe]:
    return {("cookie", name, ""): probe for name, probe in seen.items()}


def _slots(*names: str) -> list[Slot]:
    return [Slot("cookie", name) for name in names]


def test_no_hit_is_empty_whatever_else_was_seen() -> None:
    probes = _probes(
        a=Probe(Seen.EMPTY), b=Probe(Seen.IGNORED), c=Probe(Seen.FAILED), d=Probe(Seen.MAYBE)
    )
    assert merge(_slots("a", "b", "c", "d"), probes) == {}


def test_one_hit_is_its_own_answer_even_an_empty_view() -> None:
    # An id in segments the partner may not see still stops the replica's walk: {} it is,
    # not the answer of a later id that the partner could see.
    slots = [Slot("cookie", "a"), Slot("eids", "b", OURS)]
    probes = {slots[0].key: Probe(Seen.HIT, {}), slots[1].key: Probe(Seen.EMPTY)}
    assert merge(slots, probes) == {}
    probes[slots[0].key] = Probe(Seen.HIT, FRAG_A)
    assert merge(slots, probes) == FRAG_A


def test_hits_in_one_source_take_the_first_in_request_order() -> None:
    slots = [Slot("eids", "a", OURS), Slot("eids", "b", OURS)]
    probes = {slots[0].key: Probe(Seen.HIT, FRAG_A), slots[1].key: Probe(Seen.HIT, FRAG_B)}
    assert merge(slots, probes) == FRAG_A
    assert merge(slots[::-1], probes) == FRAG_B


def test_hits_in_two_sources_are_ordered_by_the_server() -> None:
    slots = [Slot("cookie", "a"), Slot("eids", "x", OURS), Slot("eids", "b", OURS)]
    probes = {
        slots[0].key: Probe(Seen.HIT, FRAG_A),
        slots[1].key: Probe(Seen.EMPTY),
        slots[2].key: Probe(Seen.HIT, FRAG_B),
    }
    assert merge(slots, probes) == Rerank((slots[0], slots[2]))


def test_a_maybe_buyeruid_next_to_a_hit_is_ordered_by_the_server() -> None:
    slots = [Slot("cookie", "a"), Slot("buyeruid", "theirs")]
    probes = {slots[0].key: Probe(Seen.HIT, FRAG_A), slots[1].key: Probe(Seen.MAYBE, {}, 1)}
    assert merge(slots, probes) == Rerank((slots[0], slots[1]))


def test_tmax_or_gdpr_answers_empty() -> None:
    probes = _probes(a=Probe(Seen.HIT, FRAG_A), b=Probe(Seen.BEFORE_IDS))
    assert merge(_slots("a", "b"), probes) == {}


def test_reading_a_probe() -> None:
    assert read_probe(Reply(owner=1), sentinel_owner=1).seen is Seen.EMPTY
    # A 421 from anyone else means the id itself was misrouted: no answer, not "empty".
    assert read_probe(Reply(owner=0), sentinel_owner=1).seen is Seen.FAILED
    assert read_probe(Reply(), sentinel_owner=1).seen is Seen.FAILED
    assert read_probe(Reply({}, "no_user"), 1).seen is Seen.IGNORED
    assert read_probe(Reply({}, "no_segments"), 1) == Probe(Seen.HIT, {})
    assert read_probe(Reply(FRAG_A, "enriched"), 1) == Probe(Seen.HIT, FRAG_A)
    assert read_probe(Reply({}, "gdpr"), 1).seen is Seen.BEFORE_IDS
    assert read_buyeruid([Reply(owner=1), Reply(FRAG_B, "enriched")]) == Probe(Seen.HIT, FRAG_B, 1)
    assert read_buyeruid([Reply({}, "no_segments"), Reply(owner=0)]) == Probe(Seen.MAYBE, {}, 0)
    assert read_buyeruid([Reply({}, "no_user"), Reply({}, "no_user")]).seen is Seen.IGNORED
    assert read_buyeruid([Reply(), Reply(owner=0)]).seen is Seen.FAILED


def test_with_only_keeps_everything_but_the_ids() -> None:
    request = {
        "id": "r",
        "tmax": 80,
        "regs": {"gdpr": 0},
        "user": {
            "id": "old",
            "buyeruid": "theirs",
            "consent": "C",
            "eids": [{"source": OURS, "uids": [{"id": "e1"}]}],
            "ext": {"eids": [{"source": OURS, "uids": [{"id": "e2"}]}], "keep": 1},
        },
    }
    slots = [
        Slot("cookie", "c1"),
        Slot("cookie", "c2", query=True),
        Slot("eids", "x", OURS),
        Slot("eids", "y", OURS),
        Slot("eids", "z", "other"),
    ]
    body, uid = with_only(request, slots)
    assert uid == "c2"
    assert orjson.loads(body) == {
        "id": "r",
        "tmax": 80,
        "regs": {"gdpr": 0},
        "user": {
            "consent": "C",
            "ext": {"keep": 1},
            "id": "c1",
            "eids": [
                {"source": OURS, "uids": [{"id": "x"}, {"id": "y"}]},
                {"source": "other", "uids": [{"id": "z"}]},
            ],
        },
    }
    assert slots_of(orjson.loads(body), uid) == slots


# --- the whole protocol, against shards answering with the server's decision code ---


@dataclass
class World:
    """Cookies and their segments, partners' match entries, opt-outs: one truth, sharded."""

    shards: int
    partitions: int
    segments: dict[str, list[str]]
    matches: MatchTable = field(default_factory=MatchTable)
    suppressed: SuppressionList = field(default_factory=SuppressionList)

    def shard_for(self, uid: str) -> int:
        return shard_of(uid, self.partitions, self.shards)


class FullReplica:
    def __init__(self, world: World) -> None:
        self.world = world

    def segments(self, uid: str) -> list[str]:
        return list(self.world.segments.get(uid, []))


class ShardReplica:
    """As dmp.replica.Replica with a shard: its own cookies, else Shard.check raises."""

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.shard = Shard(index, world.shards, world.partitions)

    def segments(self, uid: str) -> list[str]:
        if uid in self.world.segments and self.world.shard_for(uid) == self.shard.index:
            return list(self.world.segments[uid])
        self.shard.check(uid)
        return []


def _answer(answerer: Answerer, profile: PartnerProfile, body: bytes, uid: str | None) -> Reply:
    """bidder_adapter.routes.openrtb_enrich in fragment mode, minus HTTP."""
    assert uid is None or valid_cookie_id(uid), uid  # the server would answer 400
    try:
        decision = answerer.decide(
            profile, jsonio.loads(body), min_tmax_ms=MIN_TMAX_MS, first_party=uid
        )
    except Misdirected as exc:
        return Reply(owner=exc.owner)
    fragment = orjson.loads(enrich_request(body, decision.data, "fragment"))
    return Reply(fragment, decision.outcome)


class Cluster:
    def __init__(self, world: World, profile: PartnerProfile) -> None:
        self.world = world
        self.profile = profile
        clock = lambda: 0.0  # noqa: E731 - match entries never expire here
        self.full = Answerer(
            SuppressedSegments(FullReplica(world), world.suppressed), world.matches, clock
        )
        self.parts = [
            Answerer(SuppressedSegments(ShardReplica(world, n), world.suppressed), world.matches, clock)
            for n in range(world.shards)
        ]  # fmt: skip
        self.calls = 0
        self.across = ShardedEnrich(world.shards, world.shard_for, self.ask)

    async def ask(
        self, shard: int, body: bytes, uid: str | None, left: float, owners: Collection[int]
    ) -> Reply:
        self.calls += 1
        assert left > 0
        reply = _answer(self.parts[shard], self.profile, body, uid)
        assert reply.owner is None or reply.owner in owners, "a 421 nobody expected"
        return reply

    def unsharded(self, request: Mapping[str, Any], uid: str | None) -> Any:
        return _answer(self.full, self.profile, orjson.dumps(request), uid).fragment

    async def sharded(self, request: Mapping[str, Any], uid: str | None) -> Any:
        """What ShardedDmpClient.enrich does, with self.ask for HTTP."""
        slots = slots_of(request, uid)
        if self.across.spans_shards(slots):
            return await self.across.enrich(request, slots, time.monotonic() + 10)
        cookies = [s.value for s in slots if s.group != "buyeruid"]
        shard = self.world.shard_for(cookies[0]) if cookies else 0
        body = orjson.dumps(request)
        reply = _answer(self.parts[shard], self.profile, body, uid)
        if reply.owner is not None:  # a lone buyeruid held elsewhere: asked once more there
            reply = _answer(self.parts[reply.owner], self.profile, body, uid)
        return reply.fragment


def _profile(sources: tuple[UserIdSource, ...], granted: frozenset[str]) -> PartnerProfile:
    return PartnerProfile(
        partner_id="p",
        kind="dsp",
        api_key_sha256=hash_api_key("k"),
        granted_segments=granted,
        segment_id_map={},
        output_format="openrtb",
        segtax=600,
        data_provider_id=OURS,
        data_provider_name="Example DMP",
        max_segments=5,
        user_id_sources=sources,
        eids_sources=(OURS,),
    )


def _on_shard(world: World, shard: int, skip: int = 0) -> str:
    found = (f"user-{n}" for n in range(1000) if world.shard_for(f"user-{n}") == shard)
    for _ in range(skip):
        next(found)
    return next(found)


def _two_shards() -> World:
    world = World(2, 4, {})
    world.suppressed.replace(set())
    return world


def _eids(*uids: str) -> list[dict[str, Any]]:
    return [{"source": OURS, "uids": [{"id": u} for u in uids]}]


async def test_an_unknown_first_id_leaves_the_answer_to_the_other_shard() -> None:
    world = _two_shards()
    a, b = _on_shard(world, 0), _on_shard(world, 1)
    world.segments[b] = ["geo"]
    cluster = Cluster(world, _profile(("cookie", "eids"), frozenset({"geo"})))
    request = {"tmax": 100, "user": {"id": a, "eids": _eids(b)}}
    want = cluster.unsharded(request, None)
    assert want["user"]["data"][0]["segment"] == [{"id": "geo"}]
    assert await cluster.sharded(request, None) == want


async def test_a_first_id_in_segments_the_partner_cannot_see_wins_with_nothing() -> None:
    world = _two_shards()
    a, b = _on_shard(world, 0), _on_shard(world, 1)
    world.segments[a] = ["intent"]  # not granted to this partner
    world.segments[b] = ["geo"]
    cluster = Cluster(world, _profile(("cookie", "eids"), frozenset({"geo"})))
    request = {"tmax": 100, "user": {"id": a, "eids": _eids(b)}}
    assert cluster.unsharded(request, None) == {}
    assert await cluster.sharded(request, None) == {}
    # The other way round, b is read first and answers.
    request = {"tmax": 100, "user": {"id": b, "eids": _eids(a)}}
    assert cluster.unsharded(request, None) != {}
    assert await cluster.sharded(request, None) == cluster.unsharded(request, None)


@pytest.mark.parametrize("sources", [("cookie", "eids"), ("eids", "cookie")])
async def test_hits_in_two_shards_follow_the_partners_order_of_sources(
    sources: tuple[UserIdSource, ...],
) -> None:
    world = _two_shards()
    a, b = _on_shard(world, 0), _on_shard(world, 1)
    world.segments[a], world.segments[b] = ["intent"], ["geo"]
    cluster = Cluster(world, _profile(sources, frozenset({"geo", "intent"})))
    request = {"tmax": 100, "user": {"id": a, "eids": _eids(b)}}
    want = cluster.unsharded(request, None)
    first = "intent" if sources[0] == "cookie" else "geo"
    assert want["user"]["data"][0]["segment"] == [{"id": first}]
    assert await cluster.sharded(request, None) == want


async def test_an_empty_buyeruid_read_first_does_not_block_a_later_hit() -> None:
    world = _two_shards()
    theirs_cookie, a, b = _on_shard(world, 0), _on_shard(world, 1), _on_shard(world, 1, 1)
    world.matches.put("p", "theirs", theirs_cookie, 1e12)  # in no segment at all
    world.segments[a] = ["geo"]
    cluster = Cluster(world, _profile(("buyeruid", "cookie", "eids"), frozenset({"geo"})))
    request = {"tmax": 100, "user": {"buyeruid": "theirs", "id": a, "eids": _eids(b)}}
    want = cluster.unsharded(request, None)
    assert want["user"]["data"][0]["segment"] == [{"id": "geo"}]
    assert await cluster.sharded(request, None) == want
    # Now the buyeruid's cookie is in a segment this partner cannot see: it wins, with {}.
    world.segments[theirs_cookie] = ["intent"]
    assert cluster.unsharded(request, None) == {}
    assert await cluster.sharded(request, None) == {}


# Property: any request, any partner configuration, the same answer as one full replica.

NAMES = [f"ck-{n}" for n in range(10)]
SEGMENTS = ["geo", "intent", "auto"]
SOURCES: list[UserIdSource] = ["cookie", "buyeruid", "eids"]

cookie_ids = st.sampled_from(NAMES) | st.sampled_from(["never-seen", "x", "z"])
eid_lists = st.lists(
    st.tuples(st.sampled_from([OURS, "other.example"]), cookie_ids), max_size=3
).map(lambda pairs: [{"source": s, "uids": [{"id": u}]} for s, u in pairs])


@st.composite
def cases(draw: st.DrawFn) -> tuple[World, PartnerProfile, dict[str, Any], str | None]:
    shards, partitions = draw(st.sampled_from([(2, 2), (2, 4), (3, 4), (3, 8)]))
    segments = {
        name: draw(st.lists(st.sampled_from(SEGMENTS), unique=True, max_size=2)) for name in NAMES
    }
    world = World(shards, partitions, {k: v for k, v in segments.items() if v})
    world.suppressed.replace(set(draw(st.lists(st.sampled_from(NAMES), max_size=2))))
    for n in range(2):  # bu-2 is never matched
        world.matches.put("p", f"bu-{n}", draw(cookie_ids), 1e12)
    order = draw(st.permutations(SOURCES))
    if draw(st.booleans()):  # often first: a buyeruid read first is the hardest case
        order = ["buyeruid", *(s for s in order if s != "buyeruid")]
    sources = tuple(order[: draw(st.integers(1, 3))])
    granted = frozenset(draw(st.lists(st.sampled_from(SEGMENTS), unique=True, min_size=1)))
    user: dict[str, Any] = {}
    if draw(st.booleans()):
        user["id"] = draw(cookie_ids)
    if draw(st.integers(0, 3)):
        user["buyeruid"] = draw(st.sampled_from(["bu-0", "bu-1", "bu-2"]))
    user["eids"] = draw(eid_lists)
    if draw(st.booleans()):
        user["ext"] = {"eids": draw(eid_lists)}
    request: dict[str, Any] = {"id": "r", "user": user}
    request["tmax"] = draw(st.sampled_from([5, 100]))
    if draw(st.integers(0, 9)) == 0:
        request["regs"] = {"gdpr": 1}  # no consent string: nothing is added
    uid = draw(st.none() | st.sampled_from(NAMES))
    return world, _profile(sources, granted), request, uid


@settings(max_examples=600, deadline=None)
@given(cases())
def test_across_shards_equals_one_full_replica(
    case: tuple[World, PartnerProfile, dict[str, Any], str | None],
) -> None:
    world, profile, request, uid = case
    cluster = Cluster(world, profile)
    assert asyncio.run(cluster.sharded(request, uid)) == cluster.unsharded(request, uid)
