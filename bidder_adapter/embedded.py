"""Embedded mode: the bidder process holds its own replica and answers in-process, no HTTP.

The same code as the lookup service keeps it current: `Replica` + `ChangeFollower` for
memberships, `MatchTable` + `MatchTableFollower` for buyeruid, and `Answerer` for the
partner's view. Memory is the price: the whole replica lives in each bidder process.

    async with EmbeddedDmp(settings, rules, profile) as dmp:
        async with asyncio.timeout(10):
            await dmp.wait_ready()
        fragment = dmp.enrich(bid_request)  # synchronous, microseconds
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bidder_adapter.answer import Answerer, IdType, id_type_allowed
from bidder_adapter.following import following
from bidder_adapter.profiles import PartnerProfile
from dmp.change_follower import ChangeFollower
from dmp.config import Settings
from dmp.match_table import MatchTable
from dmp.match_table_follower import MatchTableFollower, MatchTableMetrics
from dmp.metrics import LookupMetrics
from dmp.privacy_follow import SuppressedSegments, SuppressionFollower, SuppressionList
from dmp.redis_client import connect
from dmp.replica import Replica
from dmp.rule_versions import RuleVersions, RuleWatcher
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
RULES_POLL_SECONDS = 1.0


class RulesFollower:
    """Keeps the replica on the applied rule version, as the lookup service does: a segment a
    version pauses is hidden here too, though the bidder started from a file where it is live."""

    def __init__(self, watcher: RuleWatcher) -> None:
        self.watcher = watcher
        self.ready = asyncio.Event()

    async def load_snapshot(self) -> None:
        await self.watcher.poll()
        self.ready.set()

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RULES_POLL_SECONDS)
            try:
                await self.watcher.poll()
            except Exception as exc:  # keep answering under the version in force
                log.warning("rule version check failed (%s)", exc)


class EmbeddedDmp:
    def __init__(
        self,
        settings: Settings,
        rules: CompiledRules,
        profile: PartnerProfile,
        *,
        min_tmax_ms: int = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.min_tmax_ms = min_tmax_ms
        registry = registry or CollectorRegistry()
        self.replica = Replica(rules)
        self.matches = MatchTable()
        # Opted-out and erased cookies answer as in no segment here too (dmp/privacy_follow.py).
        self.suppression = SuppressionList()
        self.answerer = Answerer(SuppressedSegments(self.replica, self.suppression), self.matches)
        self._lookup_metrics = LookupMetrics.create(registry)
        self._match_metrics = MatchTableMetrics.create(registry)
        self._client: aioredis.Redis | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.change_follower: ChangeFollower | None = None
        self.match_follower: MatchTableFollower | None = None
        self.suppression_follower: SuppressionFollower | None = None
        self.rules_follower: RulesFollower | None = None

    async def __aenter__(self) -> EmbeddedDmp:
        s = self.settings
        stack = contextlib.AsyncExitStack()
        client = connect(s.redis)
        stack.push_async_callback(client.aclose)
        try:
            self.rules_follower = RulesFollower(
                RuleWatcher(
                    RuleVersions(client, s.redis.key_prefix),
                    self.replica.rules,
                    lambda rules, _: self.replica.set_rules(rules),
                )
            )
            self.change_follower = ChangeFollower(
                client,
                self.replica,
                self._lookup_metrics,
                prefix=s.redis.key_prefix,
                topic=s.kafka.topic,
                block_ms=s.lookup.follow_block_ms,
            )
            self.match_follower = MatchTableFollower(
                client,
                self.matches,
                self._match_metrics,
                prefix=s.redis.key_prefix,
                block_ms=s.lookup.follow_block_ms,
            )
            self.suppression_follower = SuppressionFollower(
                client,
                self.suppression,
                prefix=s.redis.key_prefix,
                block_ms=s.lookup.follow_block_ms,
            )
            await stack.enter_async_context(
                following(
                    self.rules_follower,
                    self.change_follower,
                    self.match_follower,
                    self.suppression_follower,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def ready(self) -> bool:
        return all(
            f is not None and f.ready.is_set()
            for f in (self.change_follower, self.match_follower, self.suppression_follower)
        )

    async def wait_ready(self) -> None:
        """Wait for both snapshots to load (answers before that are empty, not wrong);
        bound it with `asyncio.timeout`."""
        for follower in (
            self.rules_follower,
            self.change_follower,
            self.match_follower,
            self.suppression_follower,
        ):
            if follower is None:
                raise RuntimeError("use EmbeddedDmp as an async context manager first")
            await follower.ready.wait()

    def enrich(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Our `{"user": {"data": [...]}}` fragment for this bid request, or `{}`; never raises."""
        try:
            decision = self.answerer.decide(
                self.profile, dict(request), min_tmax_ms=self.min_tmax_ms
            )
        except Exception:
            log.exception("embedded enrich failed")
            return {}
        return {} if decision.data is None else {"user": {"data": [decision.data]}}

    def segments(self, user_id: str, id_type: IdType = "cookie") -> list[str]:
        """The partner's ids of one user's granted segments, or []."""
        if not id_type_allowed(self.profile, id_type):
            return []
        return self.answerer.view_of(
            self.profile, self.answerer.cookie_for(self.profile, user_id, id_type)
        )
