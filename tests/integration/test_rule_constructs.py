"""Lapsed users, sequences and scores on the real stack, time moved by the ingest's clock.

As in test_time_rules.py: events carry timestamps in the past, then the clock handed to ingest
jumps to just before and just after each instant a membership must change. Ingest's due sweep
changes it with no new event; the lookup, following the store, answers the change. Just
before, an event no rule counts makes ingest re-evaluate each cookie: still no change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules, parse_rules
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import DAY, segments_of

# Long enough for a sweep (due every second of clock time, polled every 100 ms) to have run,
# its change to reach the store and the lookup's follower.
SETTLE = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class TimedStack:
    """Ingest on a settable clock, a lookup app, and a producer on the test's topic."""

    clock: Clock
    client: TestClient[Any, Any]
    producer: AIOKafkaProducer
    topic: str

    async def send(self, uid: str, ts: float, **event: Any) -> None:
        """One event; awaited, so the events of a cookie arrive in the order sent."""
        body = {"uid": uid, "ts": ts, **event}
        await self.producer.send_and_wait(self.topic, orjson.dumps(body), key=uid.encode())

    async def answers(self, uids: dict[str, list[str]]) -> dict[str, list[str]]:
        return {uid: await segments_of(self.client, uid) for uid in uids}

    async def becomes(self, want: dict[str, list[str]], timeout: float = 5.0) -> None:
        """Wait until every cookie's answer is what ``want`` says."""
        got: dict[str, list[str]] = {}
        try:
            async with asyncio.timeout(timeout):
                while (got := await self.answers(want)) != want:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"still {got}, wanted {want}") from None

    async def at(self, now: float, want: dict[str, list[str]]) -> None:
        """Move the clock to ``now``; the answers become ``want`` with no new event."""
        self.clock.now = now
        await self.becomes(want)

    async def still(self, now: float, want: dict[str, list[str]]) -> None:
        """Move the clock to ``now``; nothing changes, even for cookies re-evaluated then.

        Each cookie gets an impression (no rule here counts them), so ingest evaluates it at
        ``now`` besides sweeping what is due.
        """
        self.clock.now = now
        for uid in want:
            await self.send(uid, now, type="impression")
        await asyncio.sleep(SETTLE)
        assert await self.answers(want) == want


StartTimed = Callable[[str], Awaitable[TimedStack]]


@pytest.fixture
def timed_stack(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
) -> StartTimed:
    async def start(rules_text: str) -> TimedStack:
        rules = CompiledRules(parse_rules(rules_text, "constructs.yaml"))
        clock = Clock()
        s = replace(settings, ingest=replace(settings.ingest, max_future_seconds=400 * DAY))
        await start_ingest(s, rules, clock)
        app = create_lookup_app(s, rules)
        client = await aiohttp_client(app)
        await wait_lookup_ready(app, 10)
        return TimedStack(clock, client, producer, settings.kafka.topic)

    return start


LAPSED = """segments:
  - id: lapsed_buyer
    rule: {not_seen_within: 3d, seen_within: 10d, where: {field: type, equals: conversion}}
"""


async def test_lapsed_user_enters_and_leaves_without_new_events(timed_stack: StartTimed) -> None:
    stack = await timed_stack(LAPSED)
    start = stack.clock.now
    lapsed = ["lapsed_buyer"]
    await stack.send("lapsing", start - DAY, type="conversion")
    await stack.send("rebuyer", start - DAY, type="conversion")
    await stack.send("early", start - 5 * DAY, type="conversion")
    await stack.send("browser", start - 5 * DAY, type="page_view")
    # Bought 12 days ago: beyond seen_within, never lapsed (just gone).
    await stack.send("gone", start - 12 * DAY, type="conversion")
    await stack.send("gone", start - 12 * DAY + 60, type="page_view")
    want = {"lapsing": [], "rebuyer": [], "early": lapsed, "browser": [], "gone": []}
    await stack.becomes(want)

    # The last conversion turns 3 days old: in, with no event arriving.
    await stack.still(start + 2 * DAY - 1, want)
    want |= {"lapsing": lapsed, "rebuyer": lapsed}
    await stack.at(start + 2 * DAY + 0.5, want)

    # A new conversion ends the lapse at once; three days later it lapses again.
    await stack.send("rebuyer", start + 2 * DAY, type="conversion")
    want["rebuyer"] = []
    await stack.becomes(want)

    # early's conversion turns 10 days old (seen_within): out; rebuyer's new one turns 3 days
    # old: in again. Both on time.
    await stack.still(start + 5 * DAY - 1, want)
    want |= {"early": [], "rebuyer": lapsed}
    await stack.at(start + 5 * DAY + 0.5, want)
    await stack.still(start + 9 * DAY - 1, want)
    want["lapsing"] = []
    await stack.at(start + 9 * DAY + 0.5, want)


SEQUENCE = """segments:
  - id: model_then_dealer
    rule:
      sequence:
        - {field: url, path_prefix: /models/}
        - {field: url, path_prefix: /dealers}
      then_within: 2d
      within: 7d
"""
MODEL = "https://cars.example/models/equinox"
DEALER = "https://cars.example/dealers?zip=90012"


async def test_sequence_a_then_b_within_t(timed_stack: StartTimed) -> None:
    stack = await timed_stack(SEQUENCE)
    start = stack.clock.now
    seq = ["model_then_dealer"]
    await stack.send("ordered", start - 3 * DAY, type="page_view", url=MODEL)
    await stack.send("ordered", start - 2 * DAY, type="page_view", url=DEALER)
    # B before A is no sequence.
    await stack.send("reversed", start - 3 * DAY, type="page_view", url=DEALER)
    await stack.send("reversed", start - 2 * DAY, type="page_view", url=MODEL)
    # B a minute after T, and a minute inside T.
    await stack.send("too_slow", start - 4 * DAY - 60, type="page_view", url=MODEL)
    await stack.send("too_slow", start - 2 * DAY, type="page_view", url=DEALER)
    await stack.send("in_time", start - 4 * DAY + 60, type="page_view", url=MODEL)
    await stack.send("in_time", start - 2 * DAY, type="page_view", url=DEALER)
    # Arrival order is not event order: A arrives late but happened first.
    await stack.send("late_a", start - DAY, type="page_view", url=DEALER)
    await stack.send("late_a", start - 1.5 * DAY, type="page_view", url=MODEL)
    # A alone, until B arrives live.
    await stack.send("only_a", start - DAY, type="page_view", url=MODEL)
    want = {
        "ordered": seq,
        "reversed": [],
        "too_slow": [],
        "in_time": seq,
        "late_a": seq,
        "only_a": [],
    }
    await stack.becomes(want)

    await stack.send("only_a", start, type="page_view", url=DEALER)
    want["only_a"] = seq
    await stack.becomes(want)

    # B (the last step) leaves the 7-day window: out on time, with no event arriving.
    await stack.still(start + 5 * DAY - 1, want)
    want |= {"ordered": [], "in_time": []}
    await stack.at(start + 5 * DAY + 0.5, want)
    await stack.still(start + 6 * DAY - 1, want)
    want["late_a"] = []
    await stack.at(start + 6 * DAY + 0.5, want)


SCORE = """segments:
  - id: engaged
    rule:
      score:
        - {points: 1, where: {field: type, equals: page_view}}
        - {points: 3, where: {field: type, equals: click}}
      at_least: 5
      within: 7d
  - id: fading_buyer
    rule:
      score:
        - {points: 8, where: {field: type, equals: conversion}}
      at_least: 4
      half_life: 1d
"""


async def test_score_weighted_points_threshold_window_and_decay(
    timed_stack: StartTimed,
) -> None:
    stack = await timed_stack(SCORE)
    start = stack.clock.now
    engaged, fading = ["engaged"], ["fading_buyer"]
    # 1 + 1 + 3 = 5 points within 7 days: in.
    await stack.send("engaged", start - 6 * DAY, type="page_view")
    await stack.send("engaged", start - 3 * DAY, type="page_view")
    await stack.send("engaged", start - DAY, type="click")
    # 3 + 1 = 4: one short.
    await stack.send("short", start - DAY, type="click")
    await stack.send("short", start - DAY, type="page_view")
    # Four page views are 4 points: the weights count, not the number of events.
    for n in range(4):
        await stack.send("viewer", start - DAY - n, type="page_view")
    # 8 points half a day ago: 8 / sqrt(2) = 5.7, over 4 until one half-life after the event.
    await stack.send("fading", start - 0.5 * DAY, type="conversion")
    # 8 points 1.5 days ago: 2.8 now.
    await stack.send("faded", start - 1.5 * DAY, type="conversion")
    # Each decays from its own time: 8 points 3.5 and 1.5 days ago are 0.7 + 2.8 = 3.5 now.
    await stack.send("twice", start - 3.5 * DAY, type="conversion")
    await stack.send("twice", start - 1.5 * DAY, type="conversion")
    want = {
        "engaged": engaged,
        "short": [],
        "viewer": [],
        "fading": fading,
        "faded": [],
        "twice": [],
    }
    await stack.becomes(want)

    await stack.send("short", start, type="page_view")
    want["short"] = engaged
    await stack.becomes(want)

    # The decaying score crosses 4 at exactly one half-life after the conversion.
    await stack.still(start + 0.5 * DAY - 1, want)
    want["fading"] = []
    await stack.at(start + 0.5 * DAY + 0.5, want)
    # The first page view leaves the window: 4 points left, out with no event arriving.
    await stack.still(start + DAY - 1, want)
    want["engaged"] = []
    await stack.at(start + DAY + 0.5, want)
