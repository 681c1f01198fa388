"""Run in-memory followers (memberships, match table) as owned background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 2.0


class Follower(Protocol):
    ready: asyncio.Event

    async def load_snapshot(self) -> None: ...

    async def follow(self, stop: asyncio.Event) -> None: ...


async def load_then_follow(follower: Follower, stop: asyncio.Event) -> None:
    """Load with retries (Redis may still be starting), then tail until `stop`."""
    backoff = 0.2
    while not stop.is_set():
        try:
            await follower.load_snapshot()
            break
        except Exception as exc:
            log.warning("snapshot load failed (%s); retrying in %.1fs", exc, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, 5.0)
    await follower.follow(stop)


@contextlib.asynccontextmanager
async def following(*followers: Follower) -> AsyncIterator[None]:
    """Followers run while the block runs; on exit they stop, then stragglers are cancelled."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(load_then_follow(f, stop), name=f"follow-{type(f).__name__}")
        for f in followers
    ]
    try:
        yield
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        for task in pending:
            task.cancel("follower did not stop in time")
        if pending:
            await asyncio.wait(pending)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("follower %s failed", task.get_name(), exc_info=task.exception())
