"""Keeps an in-memory MatchTable equal to Redis: load the live keys, then tail the streams.

The same shape as dmp.change_follower for memberships: the stream position is read before
the keys, so a sync written during the load is applied again on top, which is harmless
(each entry is an absolute "their id -> our cookie until t").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from dmp.match_table import MatchKeys, MatchTable, decode_forward, match_partners_key
from dmp.redis_client import REDIS_FAILURES, read_streams, scan_batches
from dmp.redis_types import as_bytes, as_str

log = logging.getLogger(__name__)
READ_COUNT = 1000
SCAN_BATCH = 1000
DISCOVER_INTERVAL = 1.0
PURGE_INTERVAL = 600.0


@dataclass(frozen=True)
class MatchTableMetrics:
    entries: Gauge
    changes_applied: Counter
    follow_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> MatchTableMetrics:
        r = registry or CollectorRegistry()
        return cls(
            entries=Gauge(
                "dmp_match_table_entries",
                "Partner ids held in the in-memory match table.",
                registry=r,
            ),
            changes_applied=Counter(
                "dmp_match_table_changes_applied_total",
                "Match-table stream entries applied in memory.",
                registry=r,
            ),
            follow_errors=Counter(
                "dmp_match_table_follow_errors_total",
                "Errors while following the match-table streams (Redis unreachable etc.).",
                registry=r,
            ),
        )


class MatchTableFollower:
    def __init__(
        self,
        client: aioredis.Redis,
        table: MatchTable,
        metrics: MatchTableMetrics,
        *,
        prefix: str,
        block_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.table = table
        self.metrics = metrics
        self.prefix = prefix
        self.block_ms = block_ms
        self.clock = clock
        self.cursors: dict[str, bytes] = {}  # stream key -> last applied entry id
        self._partner_of: dict[str, str] = {}  # stream key -> partner id
        self.ready = asyncio.Event()
        self.healthy = True

    async def load_snapshot(self) -> None:
        await self._discover()
        self.ready.set()
        log.info("match table loaded: %d partner ids", len(self.table))

    async def _discover(self) -> None:
        raw = await self.client.smembers(match_partners_key(self.prefix))
        for partner_id in sorted(as_str(p) for p in raw):
            keys = MatchKeys(self.prefix, partner_id)
            if keys.changes not in self.cursors:
                await self._load_partner(keys)
        self.metrics.entries.set(len(self.table))

    async def _load_partner(self, keys: MatchKeys) -> None:
        last: Any = await self.client.xrevrange(keys.changes, count=1)
        cursor = as_bytes(last[0][0]) if last else b"0-0"
        async for batch in scan_batches(self.client, keys.forward_pattern, SCAN_BATCH):
            values = await self.client.mget(batch)
            for key, raw in zip(batch, values, strict=True):
                if raw is not None:
                    cookie_id, expires_at = decode_forward(as_bytes(raw))
                    partner_uid = keys.partner_uid_of(as_str(key))
                    self.table.put(keys.partner_id, partner_uid, cookie_id, expires_at)
        self._partner_of[keys.changes] = keys.partner_id
        self.cursors[keys.changes] = cursor

    async def follow(self, stop: asyncio.Event) -> None:
        """Tail every partner's stream until `stop`; survive Redis outages with backoff."""
        backoff = 0.1
        discovered = 0.0
        purged = time.monotonic()
        while not stop.is_set():
            try:
                if time.monotonic() - discovered > DISCOVER_INTERVAL:
                    await self._discover()
                    discovered = time.monotonic()
                if time.monotonic() - purged > PURGE_INTERVAL:
                    self.table.purge_expired(self.clock())
                    purged = time.monotonic()
                if not self.cursors:
                    # No partner has synced yet: the discovery above is the only read, and
                    # it succeeded (a failure of it would have left through the except).
                    self.healthy = True
                    backoff = 0.1
                    await asyncio.sleep(self.block_ms / 1000)
                    continue
                reply = await read_streams(self.client, self.cursors, READ_COUNT, self.block_ms)
                for stream, entries in reply:
                    key = as_str(stream)
                    partner_id = self._partner_of[key]
                    for entry_id, fields in entries:
                        doc = orjson.loads(fields[b"d"])
                        self.table.put(partner_id, doc["u"], doc["c"], float(doc["x"]))
                        self.cursors[key] = entry_id
                        self.metrics.changes_applied.inc()
                self.metrics.entries.set(len(self.table))
                self.healthy = True
                backoff = 0.1
            except REDIS_FAILURES as exc:
                self.healthy = False
                self.metrics.follow_errors.inc()
                log.warning("match stream unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
