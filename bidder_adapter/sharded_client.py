"""A bidder client for lookup replicas that own id shards (docs/scaling.md, Replica sharding).

    config = ShardedClientConfig(
        shard_urls=("http://dmp-shard-0:8080", "http://dmp-shard-1:8080"),
        partitions=16,  # DMP_KAFKA_PARTITIONS: the events topic's partition count
        api_key=KEY,
    )
    async with ShardedDmpClient(config) as dmp:
        ids = await dmp.segments("cookie-id")
        many = await dmp.segments_batch(["a", "b", "c"])  # split by shard, asked at once
        fragment = await dmp.enrich(bid_request)  # each id asked of its own shard

URL ``n`` is the replica started with ``DMP_LOOKUP_SHARD=n/len(shard_urls)``. A cookie goes to
the shard of the partition Kafka's default partitioner gives its events (dmp/shards.py), so
no directory is needed. A lookup that reaches the wrong shard anyway (a buyeruid, which only
the match table resolves; a client configured with the wrong partition count) gets 421
naming the owner, and is sent there once while the deadline allows. A bid request whose ids
live in several shards is answered as one replica holding them all would answer
(bidder_adapter/sharded_enrich.py). Each shard has its own connection pool and circuit
breaker: one shard down empties only its users' answers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from bidder_adapter import jsonio
from bidder_adapter.client import (
    BATCH_PATH,
    ClientConfig,
    ClientMetrics,
    DmpClient,
    Misdirected,
    batch_answers,
    batch_body,
    encode_request,
    enrich_path,
    partner_ids,
    user_path,
)
from bidder_adapter.sharded_enrich import Reply, ShardedEnrich, Slot, slots_of
from bidder_adapter.sync import valid_cookie_id
from dmp.shards import shard_of


@dataclass(frozen=True)
class ShardedClientConfig:
    shard_urls: tuple[str, ...]
    partitions: int
    api_key: str
    # Pool, deadline and breaker settings for each shard's client (base_url is replaced).
    client: ClientConfig | None = None
    max_batch_users: int = 1000  # the servers' DMP_PARTNER_MAX_BATCH_USERS

    def __post_init__(self) -> None:
        if not self.shard_urls:
            raise ValueError("shard_urls: at least one lookup replica URL")
        if len(self.shard_urls) > self.partitions:
            raise ValueError(
                f"{len(self.shard_urls)} shards need at least as many partitions, "
                f"got partitions={self.partitions}"
            )


class ShardedDmpClient:
    def __init__(self, config: ShardedClientConfig, metrics: ClientMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ClientMetrics.create()
        base = config.client or ClientConfig(base_url="", api_key=config.api_key)
        self.shards = [
            DmpClient(replace(base, base_url=url), self.metrics, shard=str(n))
            for n, url in enumerate(config.shard_urls)
        ]
        self._spread = itertools.cycle(range(len(self.shards)))  # ids we cannot route
        self._across = (
            ShardedEnrich(len(self.shards), self.shard_for, self._ask)
            if len(self.shards) > 1
            else None
        )

    async def __aenter__(self) -> ShardedDmpClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        for client in self.shards:
            await client.start()

    async def close(self) -> None:
        for client in self.shards:
            await client.close()

    def shard_for(self, uid: str) -> int:
        return shard_of(uid, self.config.partitions, len(self.shards))

    async def segments(
        self, user_id: str, *, id_type: str = "cookie", tmax_ms: float | None = None
    ) -> list[str]:
        """The partner's segment ids for one user, from the shard that holds it, or []."""
        shard = self.shard_for(user_id) if id_type == "cookie" else next(self._spread)
        path = user_path(user_id, id_type)
        doc = await self._routed(shard, "GET", path, None, self._budget(tmax_ms))
        return partner_ids(doc)

    async def segments_batch(
        self, user_ids: Sequence[str], *, id_type: str = "cookie", tmax_ms: float | None = None
    ) -> dict[str, list[str]]:
        """Each user's partner segment ids: one request per shard (and per full batch), all
        in flight at once, merged in the order asked. A failed shard's users get []."""
        if id_type != "cookie":
            # A buyeruid's shard is known only after the match table: ask one by one.
            found = await asyncio.gather(
                *(self.segments(u, id_type=id_type, tmax_ms=tmax_ms) for u in user_ids)
            )
            return dict(zip(user_ids, found, strict=True))
        budget = self._budget(tmax_ms)
        by_shard: dict[int, list[str]] = {}
        for uid in user_ids:
            by_shard.setdefault(self.shard_for(uid), []).append(uid)
        step = self.config.max_batch_users
        parts = [
            (shard, uids[i : i + step])
            for shard, uids in by_shard.items()
            for i in range(0, len(uids), step)
        ]
        docs = await asyncio.gather(
            *(
                self._routed(shard, "POST", BATCH_PATH, batch_body(uids, id_type), budget)
                for shard, uids in parts
            )
        )
        merged: dict[str, list[str]] = {}
        for (_, uids), doc in zip(parts, docs, strict=True):
            merged.update(batch_answers(uids, doc))
        return {uid: merged[uid] for uid in user_ids}

    async def enrich(
        self,
        request: Mapping[str, Any] | bytes,
        *,
        tmax_ms: float | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """The enrich fragment one replica holding every shard would give, or {}.

        Ids all in one shard: that shard is asked. Ids in several (or a buyeruid next to a
        cookie id): each id is asked of its own shard and the answers merged
        (bidder_adapter/sharded_enrich.py), all within the one deadline.
        """
        parsed = None if isinstance(request, bytes) else request
        body = encode_request(request)
        if body is None:
            self.shards[0].count("error")
            return {}
        budget = self.shards[0].budget(tmax_ms, parsed)
        slots: list[Slot] = []
        if self._across is not None and (doc := _readable(request, uid)) is not None:
            slots = slots_of(doc, uid)
            if self._across.spans_shards(slots):
                return await self._across.enrich(doc, slots, time.monotonic() + budget)
        # One shard holds every cookie id (a lone buyeruid: any shard, then the 421's owner).
        # Unreadable requests go anywhere too, to be refused there as DmpClient's would be.
        cookies = [s.value for s in slots if s.group != "buyeruid"]
        shard = self.shard_for(cookies[0]) if cookies else next(self._spread)
        found = await self._routed(shard, "POST", enrich_path(uid), body, budget)
        return found if isinstance(found, dict) else {}

    async def _ask(
        self, shard: int, body: bytes, uid: str | None, left: float, owners: Collection[int]
    ) -> Reply:
        """One call of a cross-shard enrich, where a 421 from ``owners`` is an answer."""
        answer = await self.shards[shard].call_answer(
            "POST", enrich_path(uid), body, left, expected_owners=owners
        )
        if isinstance(answer.doc, Misdirected):
            return Reply(owner=answer.doc.shard)
        if isinstance(answer.doc, dict):
            return Reply(answer.doc, answer.outcome)
        return Reply()

    def _budget(self, tmax_ms: float | None) -> float:
        return self.shards[0].budget(tmax_ms)

    async def _routed(
        self, shard: int, method: str, path: str, body: bytes | None, budget: float
    ) -> object:
        """One call to ``shard``; on 421, one more to the owner it names, in what time is left."""
        started = time.monotonic()
        doc = await self.shards[shard].call(method, path, body, budget)
        if isinstance(doc, Misdirected):
            owner = doc.shard
            if owner is None or owner == shard or not 0 <= owner < len(self.shards):
                return None  # misconfigured: the shard counts differ
            left = budget - (time.monotonic() - started)
            doc = await self.shards[owner].call(method, path, body, left)
            if isinstance(doc, Misdirected):
                return None
        return doc


def _readable(request: Mapping[str, Any] | bytes, uid: str | None) -> Mapping[str, Any] | None:
    """The request as the server will read it, or None when the server will refuse it
    (not a JSON object, or a ``uid`` that is not a cookie id: 400, whichever shard)."""
    if uid is not None and not valid_cookie_id(uid):
        return None
    if not isinstance(request, bytes):
        return request
    try:
        doc = jsonio.loads(request)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
