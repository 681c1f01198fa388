"""The suppression list in a lookup replica's memory, kept equal to Redis like the segments.

Loaded whole at start, then the privacy change stream is tailed; a replica whose cursor was
trimmed away reloads the list. Until the first load a replica blocks every cookie (fails
closed): an opted-out user must never be answered because a replica was still starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ResponseError

from dmp.privacy import changes_key, suppressed_key
from dmp.redis_client import REDIS_FAILURES
from dmp.redis_types import as_str

log = logging.getLogger(__name__)
READ_COUNT = 1000
SCAN_COUNT = 5000
GAP_CHECK_INTERVAL = 1.0


class SuppressionList:
    def __init__(self) -> None:
        self._uids: set[str] = set()
        self.loaded = False

    def __len__(self) -> int:
        return len(self._uids)

    def blocks(self, uid: str) -> bool:
        return not self.loaded or uid in self._uids

    def add(self, uid: str) -> None:
        self._uids.add(uid)

    def discard(self, uid: str) -> None:
        self._uids.discard(uid)

    def replace(self, uids: set[str]) -> None:
        self._uids = uids
        self.loaded = True


SUPPRESSION = web.AppKey("suppression", SuppressionList)


class SuppressedSegments:
    """Any segment source (a replica) with suppressed cookies answered as in no segment."""

    def __init__(self, source: Any, suppression: SuppressionList) -> None:
        self.source = source
        self.suppression = suppression

    def segments(self, uid: str) -> list[str]:
        if self.suppression.blocks(uid):
            return []
        segments: list[str] = self.source.segments(uid)
        return segments


class SuppressionFollower:
    """load_snapshot / follow, like the other followers (bidder_adapter.following)."""

    def __init__(
        self, client: aioredis.Redis, suppression: SuppressionList, *, prefix: str, block_ms: int
    ) -> None:
        self.client = client
        self.suppression = suppression
        self.prefix = prefix
        self.block_ms = block_ms
        self.ready = asyncio.Event()
        self.healthy = True
        self.reloads = 0
        self._cursor = b"0-0"
        self._seq = 0  # entries consumed up to the cursor
        self._gaps_checked_at = time.monotonic()

    async def _position(self) -> tuple[bytes, int, int]:
        try:
            info: Any = await self.client.xinfo_stream(changes_key(self.prefix))
        except ResponseError:
            return b"0-0", 0, 0  # no stream yet
        added = int(info["entries-added"])
        return info["last-generated-id"], added, added - int(info["length"])

    async def load_snapshot(self) -> None:
        # The stream position first: entries after it are replayed on top (idempotent).
        cursor, seq, _ = await self._position()
        uids: set[str] = set()
        async for uid in self.client.hscan_iter(suppressed_key(self.prefix), count=SCAN_COUNT):
            uids.add(as_str(uid[0] if isinstance(uid, tuple) else uid))
        self.suppression.replace(uids)
        self._cursor, self._seq = cursor, seq
        self.ready.set()
        log.info("suppression list loaded: %d cookies", len(uids))

    async def follow(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                if time.monotonic() - self._gaps_checked_at > GAP_CHECK_INTERVAL:
                    self._gaps_checked_at = time.monotonic()
                    _, _, removed = await self._position()
                    if removed > self._seq:
                        log.warning("suppression stream trimmed past our cursor; reloading")
                        self.reloads += 1
                        await self.load_snapshot()
                await self._read_once()
                self.healthy = True
                backoff = 0.1
            except REDIS_FAILURES as exc:
                self.healthy = False
                log.warning("suppression stream unreachable (%s); retry in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read_once(self) -> None:
        key = changes_key(self.prefix)
        reply: Any = await self.client.xread(
            {key: self._cursor}, count=READ_COUNT, block=self.block_ms
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                uid = as_str(fields[b"u"])
                if fields.get(b"op") == b"lift":
                    self.suppression.discard(uid)
                else:
                    self.suppression.add(uid)
                self._cursor = entry_id
                self._seq += 1
